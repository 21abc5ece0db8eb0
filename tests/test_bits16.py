"""Value clipping of float16 and bfloat16 on the raw 16-bit patterns
(csrc/cpu/bits16.h): every pattern of each dtype, on every ISA, bit for bit
against torch.clamp_, with NaN kept bit for bit (torch may rewrite NaN
payloads; gradclip never does), the sign of zero as a float compare gives it,
the returned 'changed' flag, and no store at all when nothing is outside."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradclip
from gradclip import _core
from conftest import assert_bitwise_equal, bits, check_read_only_script

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["f16", "bf16"]

# Per dtype: the inf pattern (larger magnitudes are NaN), the largest subnormal,
# the smallest normal and the largest finite pattern.
INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
MAX_SUBNORMAL = {torch.float16: 0x03FF, torch.bfloat16: 0x007F}
MIN_NORMAL = {torch.float16: 0x0400, torch.bfloat16: 0x0080}
MAX_FINITE = {torch.float16: 0x7BFF, torch.bfloat16: 0x7F7F}
ONE = {torch.float16: 0x3C00, torch.bfloat16: 0x3F80}

# Clip values named by pattern (exact in the dtype), plus values that must be
# rounded first: 0.1 (inexact), one that rounds up to inf in the dtype, one
# beyond float32.
PATTERN_BOUNDS = {
    "zero": lambda d: 0x0000,
    "min_subnormal": lambda d: 0x0001,
    "max_subnormal": lambda d: MAX_SUBNORMAL[d],
    "min_normal": lambda d: MIN_NORMAL[d],
    "one": lambda d: ONE[d],
    "max_finite": lambda d: MAX_FINITE[d],
    "inf": lambda d: INF_BITS[d],
}
# 65520 * 2^112 is a float32 value that both dtypes round up to inf.
VALUE_BOUNDS = {"0.1": 0.1, "rounds_to_inf": 65520.0 * 2**112, "1e300": 1e300}
BOUND_IDS = list(PATTERN_BOUNDS) + list(VALUE_BOUNDS)

# Offsets and lengths around the 16-lane (AVX2, scalar) and 32-lane (AVX-512)
# vector edges: every split into full vectors and a scalar tail, from unaligned
# starts.
OFFSETS = [0, 1, 3, 15, 16, 17, 31, 33]
LENGTHS = [0, 1, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97]


def from_bits(b: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of dtype holding exactly these 16-bit patterns (a copy: the
    tests keep `b` as the "before")."""
    return torch.from_numpy(np.array(b, dtype=np.uint16).view(np.int16)).view(dtype)


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    return from_bits(np.arange(1 << 16, dtype=np.uint16), dtype)


def shuffled_patterns(dtype: torch.dtype, copies: int = 1, seed: int = 0) -> torch.Tensor:
    """Every pattern `copies` times in a seeded random order, so that each vector
    mixes NaN, inside and outside elements."""
    b = np.tile(np.arange(1 << 16, dtype=np.uint16), copies)
    np.random.default_rng(seed).shuffle(b)
    return from_bits(b, dtype)


def pattern_value(pattern: int, dtype: torch.dtype) -> float:
    return float(from_bits(np.array([pattern]), dtype)[0])


def clip_value_of(name: str, dtype: torch.dtype) -> float:
    if name in PATTERN_BOUNDS:
        return pattern_value(PATTERN_BOUNDS[name](dtype), dtype)
    return VALUE_BOUNDS[name]


def rounded(clip_value: float, dtype: torch.dtype) -> float:
    """The bound as gradclip stores it: double -> float32 -> dtype, nearest even."""
    with np.errstate(over="ignore"):
        return float(torch.tensor(float(np.float32(clip_value)), dtype=torch.float32).to(dtype))


def expected_clamp16(x: torch.Tensor, clip_value: float) -> np.ndarray:
    """The specified result as raw patterns: torch.clamp_ with the rounded bound
    on every non-NaN element, and each NaN's own pattern."""
    b = rounded(clip_value, x.dtype)
    ref = bits(x.clone().clamp_(-b, b))
    return np.where(torch.isnan(x).numpy().ravel(), bits(x), ref)


def check_clamp(x: torch.Tensor, clip_value: float, what: str) -> None:
    """Runs gradclip on x in place and checks every bit and the flag."""
    want = expected_clamp16(x, clip_value)
    want_changed = bool((want != bits(x)).any())
    changed = gradclip.clip_by_value_(x, clip_value)
    assert_bitwise_equal(x, from_bits(want, x.dtype), what)
    assert changed is want_changed, f"{what}: returned {changed}, expected {want_changed}"


# --------------------------------------------------------------------------
# The comparison must be able to fail
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_planted_mismatches_are_caught(dtype):
    x = all_patterns(dtype)
    want = expected_clamp16(x, 1.0)
    # The reference itself: NaN kept, clamped lanes are the bound's pattern.
    nan = torch.isnan(x).numpy()
    assert np.array_equal(want[nan], bits(x)[nan])
    assert want[0x7000] == ONE[dtype] and want[0xF000] == ONE[dtype] | 0x8000
    good = from_bits(want, dtype)
    assert_bitwise_equal(good, from_bits(want, dtype))
    for index, delta in [(ONE[dtype] - 1, 1), (0x8000 + 5, 1), (INF_BITS[dtype] + 1, 2)]:
        # a 1-ulp difference, one on a negative subnormal, a different NaN payload
        planted = want.copy()
        planted[index] += delta
        with pytest.raises(AssertionError, match="differ bitwise"):
            assert_bitwise_equal(from_bits(planted, dtype), good)
    planted = want.copy()
    planted[0] = 0x8000  # -0.0 for +0.0: equal as floats, not as patterns
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bitwise_equal(from_bits(planted, dtype), good)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bounds_are_what_their_names_say(dtype):
    finfo = torch.finfo(dtype)
    assert clip_value_of("max_subnormal", dtype) < finfo.smallest_normal == clip_value_of("min_normal", dtype)
    assert clip_value_of("max_finite", dtype) == finfo.max and clip_value_of("inf", dtype) == float("inf")
    assert np.isfinite(np.float32(VALUE_BOUNDS["rounds_to_inf"]))
    assert rounded(VALUE_BOUNDS["rounds_to_inf"], dtype) == float("inf")
    assert 0.0 < rounded(0.1, dtype) != 0.1


# --------------------------------------------------------------------------
# Every pattern, every ISA
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bound", BOUND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_pattern_matches_torch_clamp(isa, dtype, bound):
    check_clamp(all_patterns(dtype), clip_value_of(bound, dtype), f"{isa} {bound}")


@pytest.mark.parametrize("bound", ["zero", "one", "max_finite", "inf", "0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_pattern_shuffled_matches_torch_clamp(isa, dtype, bound):
    check_clamp(shuffled_patterns(dtype, seed=7), clip_value_of(bound, dtype), f"{isa} {bound}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_odd_offsets_and_lengths_around_vector_edges(isa, dtype):
    # Views into one shuffled buffer: unaligned starts, every mix of full
    # vectors and tail, and nothing outside the view may change.
    base = shuffled_patterns(dtype, seed=11)
    for bound in ["one", "min_normal", "0.1"]:
        clip_value = clip_value_of(bound, dtype)
        for offset in OFFSETS:
            for length in LENGTHS:
                buf = base[: offset + length + 40].clone()
                before = bits(buf).copy()
                view = buf[offset : offset + length]
                want = expected_clamp16(view, clip_value)
                changed = gradclip.clip_by_value_(view, clip_value)
                what = f"{isa} {bound} offset {offset} length {length}"
                full = before.copy()
                full[offset : offset + length] = want
                assert_bitwise_equal(buf, from_bits(full, dtype), what)
                assert changed is bool((want != before[offset : offset + length]).any()), what


# --------------------------------------------------------------------------
# NaN, signed zeros, the flag
# --------------------------------------------------------------------------


def nan_patterns(dtype: torch.dtype) -> np.ndarray:
    """Every NaN pattern of the dtype, both signs: quiet and signalling payloads."""
    mags = np.arange(INF_BITS[dtype] + 1, 0x8000, dtype=np.uint16)
    return np.concatenate([mags, mags | 0x8000])


@pytest.mark.parametrize("bound", ["zero", "one", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_patterns_keep_their_bits_in_written_vectors(isa, dtype, bound):
    # Each NaN sits next to an element that must be clamped, so every vector
    # (and the tail) is stored: the NaN lanes are written back, and must come
    # back as they were. The widen-to-float32 path used to quiet the
    # signalling ones (0x7c01 -> 0x7e01, 0x7f81 -> 0x7fc1).
    nans = nan_patterns(dtype)
    assert ((nans & 0x7FFF) > INF_BITS[dtype]).all() and len(nans) > 100
    b = np.empty(2 * len(nans) + 5, dtype=np.uint16)
    b[: 2 * len(nans) : 2] = nans
    b[1 : 2 * len(nans) : 2] = np.where(np.arange(len(nans)) % 2 == 0, MAX_FINITE[dtype], MAX_FINITE[dtype] | 0x8000)
    b[-5:] = [nans[1], MAX_FINITE[dtype], nans[-1], 0x8000 | MAX_FINITE[dtype], nans[0]]  # tail
    x = from_bits(b, dtype)
    clip_value = clip_value_of(bound, dtype)
    check_clamp(x, clip_value, f"{isa} {bound}")
    got = bits(x)
    is_nan = ((b & 0x7FFF) > INF_BITS[dtype])
    assert np.array_equal(got[is_nan], b[is_nan])
    if bound != "inf":
        assert (got[~is_nan] != b[~is_nan]).all(), "the neighbours were clamped"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_only_nan_outside_the_range_is_no_change(isa, dtype):
    nans = nan_patterns(dtype)
    x = from_bits(np.concatenate([nans, [0, 0x8000, 0x8000]]), dtype)
    before = bits(x).copy()
    assert gradclip.clip_by_value_(x, 0.0) is False
    assert np.array_equal(bits(x), before)


SIGNED_ZERO_CASES = [
    # clip_value, bounds as patterns (lo, hi)
    (0.0, (0x8000, 0x0000)),   # lo = -0.0, hi = +0.0
    (-0.0, (0x0000, 0x8000)),  # -clip_value: lo = +0.0, hi = -0.0
]


@pytest.mark.parametrize("clip_value,lo_hi", SIGNED_ZERO_CASES, ids=["+0", "-0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_signed_zeros(isa, dtype, clip_value, lo_hi):
    # -0.0 and +0.0 are equal as floats: a zero element is never outside either
    # zero bound and keeps its own sign; anything above or below takes hi's or
    # lo's exact pattern. Zeros sit in vector blocks and in the tail.
    lo, hi = lo_hi
    one = ONE[dtype]
    cell = [0x0000, 0x8000, 0x0001, 0x8001, one, one | 0x8000, INF_BITS[dtype], INF_BITS[dtype] | 0x8000]
    b = np.array(cell * 9 + [0x8000, 0x0000, 0x0001], dtype=np.uint16)  # 75: vectors + tail
    x = from_bits(b, dtype)
    check_clamp(x, clip_value, f"{isa} clip_value {clip_value!r}")  # torch agrees
    got = bits(x)
    want = np.where((b & 0x7FFF) == 0, b, np.where((b & 0x8000) != 0, lo, hi))
    assert np.array_equal(got, want)
    # Only zeros: nothing is outside, nothing changes.
    z = from_bits(np.array([0x8000, 0x0000] * 40 + [0x8000], dtype=np.uint16), dtype)
    zb = bits(z).copy()
    assert gradclip.clip_by_value_(z, clip_value) is False
    assert np.array_equal(bits(z), zb)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_changed_flag_for_one_element_anywhere(isa, dtype):
    # One element outside, at every position of a 97-element tensor (vector
    # lanes and tail), the rest inside or exactly on a bound.
    one = ONE[dtype]
    for pos in range(97):
        b = np.full(97, one, dtype=np.uint16)
        b[::3] = one | 0x8000  # on the bounds: not outside
        b[pos] = one + 1 if pos % 2 else (one + 1) | 0x8000  # 1 ulp beyond
        x = from_bits(b, dtype)
        assert gradclip.clip_by_value_(x, 1.0) is True, pos
        want = b.copy()
        want[pos] = one if pos % 2 else one | 0x8000
        assert np.array_equal(bits(x), want), pos
        assert gradclip.clip_by_value_(x, 1.0) is False, pos


# --------------------------------------------------------------------------
# ISAs, threads
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_isa_and_thread_count_gives_the_same_bits(dtype, restore_threads):
    # 5 x 65536 elements > 2^18: the pooled path, chunks of 2^15 cut vectors
    # nowhere (2^15 is a multiple of 32), the odd total length leaves a tail.
    base = shuffled_patterns(dtype, copies=5, seed=3)[:-7]
    want = expected_clamp16(base, 0.5)
    before = _core.active_isa()
    try:
        for name in _core.supported_isas():
            _core.set_active_isa(name)
            for threads in (1, 2, 3):
                gradclip.set_num_threads(threads)
                x = base.clone()
                assert gradclip.clip_by_value_(x, 0.5) is True
                assert_bitwise_equal(x, from_bits(want, dtype), f"{name}, {threads} threads")
    finally:
        _core.set_active_isa(before)


# --------------------------------------------------------------------------
# Nothing outside: one read pass, no store
# --------------------------------------------------------------------------

# Every pattern (NaN included) in pages made read-only behind torch's back: any
# store, even of an unchanged value, kills the process with SIGSEGV.
_READ_ONLY_PATTERNS = r"""
import numpy as np
import torch
import gradclip
from gradclip import _core

N = 5 << 16  # > 2^18 elements: the threaded path as well
size = 4 * N + (1 << 16)
mm = mmap.mmap(-1, size)
parts = {}
for k, dtype in enumerate((torch.float16, torch.bfloat16)):
    t = torch.frombuffer(mm, dtype=dtype, count=N + 11, offset=k * (2 * N + 4096) + 2)  # unaligned start
    t.view(torch.int16).copy_(torch.arange(N + 11, dtype=torch.int32).to(torch.int16))
    parts[dtype] = t
    assert torch.unique(t.view(torch.int16)).numel() == 1 << 16  # every pattern
protect(mm)
if sys.argv[1] == "control":
    gradclip.clip_by_value_([parts[torch.bfloat16]], 1.0)  # must write: dies here
    print("not reached")
    sys.exit(0)
for name in _core.supported_isas():
    _core.set_active_isa(name)
    for threads in (1, 2):
        gradclip.set_num_threads(threads)
        for dtype, t in parts.items():
            # inf bounds: +-inf are on them, NaN is never outside
            assert gradclip.clip_by_value_([t], float("inf")) is False, (name, dtype)
            assert gradclip.clip_by_value_([t[: 1 << 10]], float("inf")) is False
print("no write")
"""


def test_nothing_outside_stores_nothing():
    check_read_only_script(_READ_ONLY_PATTERNS, "no-write")


def test_read_only_patterns_do_catch_a_write():
    # Positive control for the test above.
    check_read_only_script(_READ_ONLY_PATTERNS, "control")
