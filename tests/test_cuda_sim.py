"""The CUDA kernels, run on the host: gradclip._cuda_sim is csrc/cuda/kernels.cu
(kernels and launch code) built by the host compiler against
csrc/cuda_sim/simt.h, whose threads are fibers switched at barriers. These
tests need no GPU and run everywhere the module builds (Linux).

What this checks of the CUDA backend: every kernel's arithmetic, the launch
tables, blocks, segments, head/vector/tail walks, partial slots, the
finalize's folds and coefficients, the skip of unchanged tensors, the clamp's
change flags; that every barrier and shuffle is reached by all threads and
every 16-byte vector load and store is aligned (the simulator reports both);
that no shared slot is read before it is written (shared memory starts each
block as NaN bytes); and that results do not depend on how threads
interleave between barriers (five schedules compared). What it cannot check:
the GPU itself (timing, memory ordering between blocks, device pow rounding,
streams, graphs): tests/test_cuda.py does, on a GPU.

Memory is laid out as the GPU tests lay it: each tensor a view into its own
buffer with GUARD sentinel elements on both sides and ``shift`` elements
before it (shift > 0 puts its start off the 16-byte grid); the guards must
survive every call. The module fills outputs and workspace with NaN bytes
before each call, so a result the kernels do not write shows as NaN.

Tolerances: as in tests/test_cuda.py (the same kernels): a thread adds at most
34 elements of a segment, 256 thread sums are folded by a fixed tree, a
tensor's segments serially or by a warp, then the tensors: under 2200
additions of non-negative float64 terms per result, the bound behind
``conftest.norm_rtol``; inf norms are exact. Scaled values follow
``conftest.assert_scaled`` (float32 and 16-bit data times float32(coef)); a
coefficient the test knows exactly makes that comparison bitwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (
    EPS,
    INF,
    NAN,
    NORM_IDS,
    NORM_ORDERS,
    TORCH_DTYPE_IDS,
    TORCH_DTYPES,
    assert_bitwise_equal,
    assert_norm_close,
    assert_same_or_both_nan,
    assert_scaled,
    check_read_only_script,
    expected_scaled,
    make_torch,
    norm_rtol,
    ref_coef,
    kernel_names,
    ref_norm,
    require_cuda_sim,
    result_dtype_of,
)

_cuda_sim = require_cuda_sim()

CHUNK = _cuda_sim.chunk
LAUNCH_TENSORS = _cuda_sim.max_tensors_per_launch
# Around the vector widths and the chunk edges, and one of more than 8 blocks
# (the finalize folds such a tensor's partials with a warp, not one thread).
EDGE_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5, 9 * CHUNK + 3]
GUARD = 40
NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def sentinel(dtype: torch.dtype) -> float:
    return -12345.0 if dtype != torch.float16 else -1234.0


class Placed:
    """Tensors copied into guarded host buffers, as the kernels' inputs."""

    def __init__(self, tensors, shifts=None, groups=None):
        self.originals = [t.reshape(-1).clone() for t in tensors]
        self.shifts = list(shifts) if shifts is not None else [i % 8 for i in range(len(tensors))]
        self.groups = list(groups) if groups is not None else [0] * len(tensors)
        self.buffers, self.views = [], []
        for t, shift in zip(self.originals, self.shifts):
            buf = torch.full((t.numel() + 2 * GUARD + shift,), sentinel(t.dtype), dtype=t.dtype)
            view = buf[GUARD + shift : GUARD + shift + t.numel()]
            view.copy_(t)
            self.buffers.append(buf)
            self.views.append(view)

    def specs(self):
        return [(v.data_ptr(), v.numel(), NAMES[v.dtype], g) for v, g in zip(self.views, self.groups)]

    def run(self, job: str, **kw):
        kw.setdefault("out_f64", any(v.dtype == torch.float64 for v in self.views))
        return _cuda_sim.run(self.specs(), job, **kw)

    def assert_guards(self):
        for i, (buf, t, shift) in enumerate(zip(self.buffers, self.originals, self.shifts)):
            s = sentinel(buf.dtype)
            before, after = buf[: GUARD + shift], buf[GUARD + shift + t.numel() :]
            assert bool((before == s).all()) and bool((after == s).all()), f"tensor {i}: a guard element was written"

    def assert_unchanged(self, indices=None):
        for i in indices if indices is not None else range(len(self.views)):
            assert_bitwise_equal(self.views[i], self.originals[i], f"tensor {i}")


def kernels(result) -> list:
    return kernel_names(result["launches"])


# --------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_norms_match_reference(dtype, p):
    tensors = [make_torch(n, dtype, seed=i) for i, n in enumerate(EDGE_SIZES)]
    placed = Placed(tensors)
    r = placed.run("norms", p=p)
    rd = result_dtype_of(placed.views)
    for i, t in enumerate(tensors):
        assert_norm_close(r["per_tensor"][i], ref_norm([t], p), p, rd)
    assert_norm_close(r["total"], ref_norm(tensors, p), p, rd)
    assert_norm_close(r["per_group"][0], ref_norm(tensors, p), p, rd)
    assert kernels(r) == ["norm_kernel", "finalize_kernel"]
    placed.assert_unchanged()
    placed.assert_guards()


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_float64_outputs_of_float32_data(p):
    # The float64 output path (force_f64 in the bridge) gives the norm before
    # rounding to float32: the full accuracy of the float64 sum.
    tensors = [make_torch(n, torch.float32, seed=30 + i) for i, n in enumerate([5, CHUNK + 3, 3 * CHUNK])]
    r = Placed(tensors).run("norms", p=p, out_f64=True)
    assert_norm_close(r["total"], ref_norm(tensors, p), p, np.float64)


def test_outputs_not_asked_for_are_not_written():
    # The bridge passes null for results nobody wants; the kernels must skip them.
    tensors = [make_torch(n, torch.float32, seed=7 + i) for i, n in enumerate([CHUNK + 1, 9])]
    placed = Placed(tensors)
    r = placed.run("clip_global", limits=[0.5], outputs=["total"])
    assert r["per_tensor"] is None and r["per_group"] is None and r["flags"] == []
    assert_norm_close(r["total"], ref_norm(tensors, 2.0), 2.0, np.float32)
    r = placed.run("norms", outputs=["per_tensor"])
    assert r["total"] is None and len(r["per_tensor"]) == 2
    with pytest.raises(ValueError, match="outputs: .* got 'totals'"):
        placed.run("norms", outputs=["totals"])


def test_a_planted_mismatch_fails_the_comparison():
    tensors = [make_torch(CHUNK + 3, torch.float64, seed=3)]
    total = Placed(tensors).run("norms", p=2.0)["total"]
    assert_norm_close(total, ref_norm(tensors, 2.0), 2.0)
    with pytest.raises(AssertionError):
        assert_norm_close(total * (1 + 1e-11), ref_norm(tensors, 2.0), 2.0)


def test_mixed_dtypes_and_empty_tensors_in_one_call():
    rng = np.random.default_rng(5)
    tensors = []
    for i in range(60):
        dtype = TORCH_DTYPES[int(rng.integers(0, 4))]
        n = int(rng.choice([0, 1, 9, 100, CHUNK - 1, CHUNK + 1]))
        tensors.append(make_torch(n, dtype, seed=100 + i))
    placed = Placed(tensors, shifts=rng.integers(0, 8, size=60).tolist())
    for p in NORM_ORDERS:
        r = placed.run("norms", p=p)
        for i, t in enumerate(tensors):
            assert_norm_close(r["per_tensor"][i], ref_norm([t], p), p, np.float64)
        assert_norm_close(r["total"], ref_norm(tensors, p), p, np.float64)


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_no_tensors_and_only_empty_tensors(p):
    r = _cuda_sim.run([], "clip_global", p=p, limits=[1.0])
    assert r["total"] == 0.0 and r["per_tensor"] == []
    placed = Placed([torch.zeros(0), torch.zeros(0, dtype=torch.bfloat16)])
    r = placed.run("clip_global", p=p, limits=[1.0])
    assert r["total"] == 0.0 and r["per_tensor"] == [0.0, 0.0]


def test_more_tensors_than_one_launch_holds():
    rng = np.random.default_rng(11)
    n = LAUNCH_TENSORS + 500
    sizes = rng.choice([0, 1, 17, 300, 1000], size=n).tolist()
    tensors = [make_torch(s, torch.float32, seed=i) for i, s in enumerate(sizes)]
    placed = Placed(tensors)
    r = placed.run("clip_global", limits=[1.0])
    expected = ref_norm(tensors, 2.0)
    assert_norm_close(r["total"], expected, 2.0, np.float32)
    for i in (0, LAUNCH_TENSORS - 1, LAUNCH_TENSORS, n - 1):
        assert_norm_close(r["per_tensor"][i], ref_norm([tensors[i]], 2.0), 2.0, np.float32)
    assert kernels(r) == ["norm_kernel", "norm_kernel", "finalize_kernel", "scale_kernel", "scale_kernel"]
    for i in (0, LAUNCH_TENSORS - 1, LAUNCH_TENSORS, n - 1):
        assert_scaled(placed.views[i], tensors[i], 1.0, expected, norm_rtol(2.0))
    placed.assert_guards()


@settings(max_examples=40)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(0, 40), st.integers(CHUNK - 20, CHUNK + 20), st.integers(0, 3 * CHUNK)),
            st.sampled_from(range(4)),
            st.integers(0, 7),
        ),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from(NORM_ORDERS),
    st.integers(0, 2**31),
)
def test_random_lists_match_reference(tensors, p, seed):
    dtypes = [TORCH_DTYPES[d] for _, d, _ in tensors]
    data = [make_torch(n, dtype, seed=seed + i) for i, ((n, _, _), dtype) in enumerate(zip(tensors, dtypes))]
    placed = Placed(data, shifts=[shift for _, _, shift in tensors])
    r = placed.run("norms", p=p, out_f64=True)
    for i, t in enumerate(data):
        assert_norm_close(r["per_tensor"][i], ref_norm([t], p), p, np.float64)
    assert_norm_close(r["total"], ref_norm(data, p), p, np.float64)


# ---- overflow and underflow (the partials' rescue) ----


def test_float64_overflow_and_underflow_are_rescued():
    big = torch.full((3 * CHUNK + 1,), 1e200, dtype=torch.float64)
    tiny = torch.full((CHUNK + 7,), 3e-200, dtype=torch.float64)
    r = Placed([big, tiny]).run("norms", p=2.0)
    assert math.isclose(r["per_tensor"][0], 1e200 * math.sqrt(big.numel()), rel_tol=1e-12)
    assert math.isclose(r["per_tensor"][1], 3e-200 * math.sqrt(tiny.numel()), rel_tol=1e-12)
    assert math.isclose(r["total"], r["per_tensor"][0], rel_tol=1e-12)


@pytest.mark.parametrize("p", [2.0, 3.5], ids=["L2", "L3.5"])
def test_partials_that_overflow_only_when_added(p):
    # Each block's power sum is finite (just under float64's max for L2); their
    # sum is not, but the norm is.
    x = 1.3e154 if p == 2.0 else 1e88
    separate = [torch.tensor([x], dtype=torch.float64) for _ in range(3)]
    one = torch.zeros(2 * CHUNK + 1, dtype=torch.float64)
    one[0] = one[CHUNK] = one[2 * CHUNK] = x  # three blocks of one tensor
    expected = x * 3.0 ** (1.0 / p)
    for tensors in (separate, [one]):
        r = Placed(tensors).run("norms", p=p)
        assert math.isclose(r["total"], expected, rel_tol=1e-12), (len(tensors), r["total"])


@pytest.mark.parametrize("p", [1500.0, 1e5], ids=["L1500", "L1e5"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_very_large_p_gives_the_finite_norm(p, dtype, scale):
    # Blocks whose power sums overflow or underflow are redone divided by
    # their largest |x|; partials of different bases then meet in the folds
    # (one tensor over several blocks, and the total over tensors).
    tensors = [make_torch(n, dtype, seed=400 + i, scale=scale * (1 + i)) for i, n in
               enumerate([3 * CHUNK + 7, 100, CHUNK - 1])]
    r = Placed(tensors).run("norms", p=p, out_f64=True)
    for i, t in enumerate(tensors):
        assert_norm_close(r["per_tensor"][i], ref_norm([t], p), p, np.float64)
    assert_norm_close(r["total"], ref_norm(tensors, p), p, np.float64)


def test_generic_p_of_float32_is_rescued():
    x = torch.full((1000,), 1e38, dtype=torch.float32)  # |x|^10 overflows float64
    r = Placed([x]).run("norms", p=10.0, out_f64=True)
    assert math.isclose(r["total"], float(x[0]) * 1000**0.1, rel_tol=1e-12)


def test_float32_squares_beyond_float32_give_the_true_norm():
    x = torch.full((2 * CHUNK,), 1e25, dtype=torch.float32)
    r = Placed([x]).run("norms", p=2.0, out_f64=True)
    assert math.isclose(r["total"], float(x[0]) * math.sqrt(x.numel()), rel_tol=1e-12)


# ---- NaN and inf ----


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_nonfinite_norms(p):
    a = make_torch(CHUNK + 5, torch.float32, seed=1)
    b = a.clone()
    b[CHUNK + 2] = INF
    c = a.clone()
    c[3] = NAN
    r = Placed([a, b, c]).run("norms", p=p)
    assert math.isfinite(r["per_tensor"][0])
    assert r["per_tensor"][1] == INF
    assert math.isnan(r["per_tensor"][2]) and math.isnan(r["total"])


# --------------------------------------------------------------------------
# Clipping, normalising, scaling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_global_clip(dtype, p):
    tensors = [make_torch(n, dtype, seed=50 + i) for i, n in enumerate(EDGE_SIZES)]
    placed = Placed(tensors)
    max_norm = 0.25
    r = placed.run("clip_global", p=p, limits=[max_norm])
    total = ref_norm(tensors, p)
    rd = result_dtype_of(placed.views)
    assert_norm_close(r["total"], total, p, rd)
    for view, t in zip(placed.views, tensors):
        assert_scaled(view, t, max_norm, total, norm_rtol(p))
    assert kernels(r) == ["norm_kernel", "finalize_kernel", "scale_kernel"]
    placed.assert_guards()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_unclipped_call_leaves_every_bit(dtype):
    tensors = [make_torch(n, dtype, seed=70 + i) for i, n in enumerate(EDGE_SIZES)]
    tensors[3][0] = 0.0
    tensors[5][1] = -0.0
    placed = Placed(tensors)
    r = placed.run("clip_global", limits=[1e9])
    assert kernels(r) == ["norm_kernel", "finalize_kernel", "scale_kernel"]
    placed.assert_unchanged()
    placed.assert_guards()


_READ_ONLY_BODY = """
import mmap, torch
from gradclip import _cuda_sim
mm = mmap.mmap(-1, 1 << 20)
x = torch.frombuffer(mm, dtype=torch.float32)
x.copy_(torch.linspace(-1, 1, x.numel()))
n = x.numel() - 3
spec = [(x.data_ptr() + 4, n, "float32", 0)]  # misaligned: a head, vectors and a tail
protect(mm)
job, mode = sys.argv[2], sys.argv[1]
if job == "clip_global":
    _cuda_sim.run(spec, job, limits=[1e9 if mode == "no-write" else 1e-3])
else:
    _cuda_sim.run(spec, job, clamp_limit=2.0 if mode == "no-write" else 0.5)
print("no write")
"""


@pytest.mark.parametrize("job", ["clip_global", "clamp"])
@pytest.mark.parametrize("mode", ["no-write", "control"])
def test_nothing_to_do_makes_no_store(mode, job):
    # On read-only pages any store kills the process; the control call has
    # work to do and must die, which shows the pages really are read-only.
    check_read_only_script(_READ_ONLY_BODY, mode, job)


def test_per_tensor_clip():
    tensors = [make_torch(n, torch.float32, seed=90 + i, scale=s) for i, (n, s) in
               enumerate([(10, 1.0), (CHUNK + 3, 0.001), (300, 5.0), (0, 1.0), (2 * CHUNK, 0.01)])]
    placed = Placed(tensors)
    limit = 3.0
    r = placed.run("clip_per_tensor", limits=[limit])
    for i, t in enumerate(tensors):
        norm = ref_norm([t], 2.0)
        assert_norm_close(r["per_tensor"][i], norm, 2.0, np.float32)
        if ref_coef(limit, norm) == 1.0:
            placed.assert_unchanged([i])
        else:
            assert_scaled(placed.views[i], t, limit, norm, norm_rtol(2.0))
    placed.assert_guards()


def test_groups_clip_each_by_its_own_limit():
    sizes = [100, CHUNK + 1, 7, 5000, 33, 2 * CHUNK + 9]
    groups = [0, 1, 2, 1, 0, 2]
    limits = [0.5, 1e9, 2.0]
    tensors = [make_torch(n, torch.float32, seed=110 + i) for i, n in enumerate(sizes)]
    placed = Placed(tensors, groups=groups)
    r = placed.run("clip_global", limits=limits)
    group_norms = [ref_norm([t for t, g in zip(tensors, groups) if g == k], 2.0) for k in range(3)]
    for k in range(3):
        assert_norm_close(r["per_group"][k], group_norms[k], 2.0, np.float32)
    assert_norm_close(r["total"], ref_norm(tensors, 2.0), 2.0, np.float32)
    for i, (t, g) in enumerate(zip(tensors, groups)):
        if g == 1:
            placed.assert_unchanged([i])
        else:
            assert_scaled(placed.views[i], t, limits[g], group_norms[g], norm_rtol(2.0))


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_normalize_scales_up_and_leaves_a_zero_group_alone(dtype):
    a = make_torch(CHUNK + 11, dtype, seed=130, scale=0.01)
    zero = torch.zeros(50, dtype=dtype)
    placed = Placed([a, zero], groups=[0, 1])
    r = placed.run("normalize", limits=[4.0, 4.0])
    norm = ref_norm([a], 2.0)
    # normalize's coefficient is target / norm (no eps, no cap at 1).
    lo, hi = 4.0 / (norm * (1 + norm_rtol(2.0))), 4.0 / (norm * (1 - norm_rtol(2.0)))
    got = placed.views[0].double().numpy()
    e1, e2 = expected_scaled(a, lo), expected_scaled(a, hi)
    assert np.all((got >= np.minimum(e1, e2)) & (got <= np.maximum(e1, e2)))
    assert r["per_group"][1] == 0.0
    placed.assert_unchanged([1])
    placed.assert_guards()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_scale_by_a_known_coefficient_is_bitwise(dtype):
    tensors = [make_torch(n, dtype, seed=140 + i) for i, n in enumerate(EDGE_SIZES)]
    placed = Placed(tensors)
    coef = 0.3
    r = placed.run("scale", coef=coef)
    assert kernels(r) == ["scale_kernel"]
    for view, t in zip(placed.views, tensors):
        assert_bitwise_equal(view, torch.from_numpy(expected_scaled(t, coef)).to(dtype), "scaled")
    placed.assert_guards()
    assert kernels(placed.run("scale", coef=1.0)) == []  # nothing to launch


@pytest.mark.parametrize("norm_dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("norm_value", [2.5, 0.01, INF, NAN], ids=["clips", "no-clip", "inf", "nan"])
def test_scale_by_a_norm_in_device_memory(norm_dtype, norm_value):
    # clip_grads_with_norm_ with a tensor norm: the coefficient is computed on
    # the device, min(max_norm / (norm + eps), 1), as torch computes it.
    tensors = [make_torch(n, torch.float32, seed=160 + i) for i, n in enumerate([CHUNK + 5, 17])]
    placed = Placed(tensors)
    norm = torch.tensor([norm_value], dtype=norm_dtype)
    max_norm = 1.0
    placed.run("scale", norm=(norm.data_ptr(), NAMES[norm_dtype]), max_norm=max_norm, eps=EPS)
    coef = ref_coef(max_norm, float(norm[0]), EPS)
    for view, t in zip(placed.views, tensors):
        assert_same_or_both_nan(view, torch.from_numpy(expected_scaled(t, coef)).to(t.dtype), "scaled")
    if coef == 1.0:
        placed.assert_unchanged()


# --------------------------------------------------------------------------
# error_if_nonfinite: nothing is written, the results still are
# --------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["clip_global", "clip_per_tensor", "normalize"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_hold_writes_no_gradient(job, bad):
    a = make_torch(CHUNK + 1, torch.float32, seed=170)
    b = make_torch(300, torch.float32, seed=171)
    b[7] = bad
    placed = Placed([a, b])
    r = placed.run(job, limits=[1e-3], nonfinite="hold")
    placed.assert_unchanged()
    assert not math.isfinite(r["total"])
    # Without the hold, the same call writes (torch's behaviour without the flag).
    r = placed.run(job, limits=[1e-3])
    assert not torch.equal(placed.views[0], a)


def test_hold_on_a_total_that_overflows_float32_only():
    # Two finite float32 gradients whose float64 norm is finite but beyond
    # float32's range: the reported total is inf, so the call must hold.
    a = torch.tensor([3e38], dtype=torch.float32)
    placed = Placed([a, a.clone()])
    r = placed.run("clip_global", limits=[1.0], nonfinite="hold")
    assert r["total"] == INF
    placed.assert_unchanged()
    r = placed.run("clip_global", limits=[1.0], nonfinite="hold", out_f64=True)
    assert math.isfinite(r["total"])  # reported in float64 it is finite: the clip goes ahead
    assert not torch.equal(placed.views[0], a)


# --------------------------------------------------------------------------
# Value clipping and its change flags
# --------------------------------------------------------------------------


def value_data(dtype: torch.dtype, n: int, seed: int, bound: float) -> torch.Tensor:
    x = make_torch(n, dtype, seed=seed, scale=bound * 1.5)
    specials = torch.tensor([NAN, INF, -INF, 0.0, -0.0, bound, -bound], dtype=torch.float64).to(dtype)
    x[: min(n, specials.numel())] = specials[: min(n, specials.numel())]
    return x


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("clip_value", [0.1, 1.0, 65504.0 * 4], ids=["0.1", "1", "beyond-f16"])
def test_value_clip_bit_exact_with_torch(dtype, clip_value):
    tensors = [value_data(dtype, n, seed=200 + i, bound=min(clip_value, 2.0)) for i, n in enumerate(EDGE_SIZES)]
    placed = Placed(tensors)
    r = placed.run("clamp", clamp_limit=clip_value)
    assert kernels(r) == ["clamp_kernel"]
    for view, t in zip(placed.views, tensors):
        if dtype == torch.float16 and clip_value > 65504.0:
            # torch refuses the bound; rounded to float16 it is inf, so nothing is outside it.
            expected = t
        else:
            expected = t.clone().clamp_(-clip_value, clip_value)
        assert_same_or_both_nan(view, expected, f"clamp of {NAMES[dtype]}")
    placed.assert_guards()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_value_clip_keeps_nan_payloads(dtype):
    # NaN is never outside the bounds: its bits (sign, payload) stay, in the
    # scalar head and tail and inside a vector whose other lanes are clamped.
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty(0, dtype=dtype).element_size()]
    # Negative quiet NaNs with non-canonical payloads: 0xffc12345, 0xfff9876543210fed, 0xfe55, 0xffc5.
    payload = {torch.float32: 0xFFC12345 - 2**32, torch.float64: 0xFFF9876543210FED - 2**64,
               torch.float16: 0xFE55 - 2**16, torch.bfloat16: 0xFFC5 - 2**16}[dtype]
    x = torch.full((64,), 9.0, dtype=dtype)
    for i in (0, 9, 63):
        x[i : i + 1].view(int_type)[0] = payload
    assert bool(x.isnan().sum() == 3)
    placed = Placed([x], shifts=[1])
    placed.run("clamp", clamp_limit=1.0)
    got = placed.views[0]
    assert torch.equal(got.view(int_type)[[0, 9, 63]], x.view(int_type)[[0, 9, 63]]), "a NaN payload changed"
    others = [i for i in range(64) if i not in (0, 9, 63)]
    assert bool((got[others] == 1.0).all())


def test_change_flags_mark_exactly_the_blocks_that_changed():
    # Block b of the flat space holds elements [b * CHUNK, (b + 1) * CHUNK) of
    # the tensors laid end to end; a flag per block of every launch.
    sizes = [CHUNK // 2, 3 * CHUNK, CHUNK + 10, 5]
    tensors = [torch.zeros(n, dtype=torch.float32) for n in sizes]
    starts = np.cumsum([0] + sizes)
    changed_at = [int(starts[1]) + CHUNK + 5, int(starts[2]) + 1, int(starts[4]) - 1]  # flat positions
    where = []  # (tensor, index) of each
    for pos in changed_at:
        t = int(np.searchsorted(starts, pos, side="right")) - 1
        where.append((t, pos - int(starts[t])))
        tensors[t][pos - int(starts[t])] = 7.0
    placed = Placed(tensors)
    r = placed.run("clamp", clamp_limit=1.0)
    n_blocks = -(-int(starts[-1]) // CHUNK)
    assert r["flags"] == [int(b in {pos // CHUNK for pos in changed_at}) for b in range(n_blocks)]
    for t, i in where:
        assert float(placed.views[t][i]) == 1.0
    assert sum(int((v != 0).sum()) for v in placed.views) == len(changed_at)
    r = placed.run("clamp", clamp_limit=1.0)  # now within bounds everywhere
    assert r["flags"] == [0] * n_blocks


def test_change_flags_over_two_launches():
    n = LAUNCH_TENSORS + 10
    tensors = [torch.zeros(3, dtype=torch.float32) for _ in range(n)]
    tensors[-1][2] = -9.0
    r = Placed(tensors).run("clamp", clamp_limit=1.0)
    assert kernels(r) == ["clamp_kernel", "clamp_kernel"]
    assert all(f in (0, 1) for f in r["flags"]) and r["flags"][-1] == 1 and sum(r["flags"]) == 1


# --------------------------------------------------------------------------
# No races: results do not depend on the order threads run between barriers
# --------------------------------------------------------------------------

SCHEDULES = [("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2), ("warp_first", 0)]


@pytest.fixture
def schedule_restored():
    yield
    _cuda_sim.set_schedule("forward")


def race_inputs():
    # Mixed dtypes; tensors of one segment, of several, of more than the
    # finalize folds by one thread (8); float64 data that needs the rescue.
    sizes = [1, 9, CHUNK - 3, CHUNK + 5, 9 * CHUNK + 3, 40]
    tensors = [make_torch(n, TORCH_DTYPES[i % 4], seed=300 + i) for i, n in enumerate(sizes)]
    tensors.append(torch.full((CHUNK + 1,), 1e200, dtype=torch.float64))
    tensors.append(torch.full((33,), 1e-200, dtype=torch.float64))
    return tensors


RACE_JOBS = [
    ("norms", dict(p=1.0)),
    ("norms", dict(p=2.0)),
    ("norms", dict(p=INF)),
    ("norms", dict(p=3.0)),
    ("clip_global", dict(limits=[0.5, 1e9], groups=[0, 1, 0, 1, 0, 1, 0, 1])),
    ("clip_per_tensor", dict(limits=[2.0])),
    ("normalize", dict(limits=[3.0])),
    ("clamp", dict(clamp_limit=0.5)),
]


@pytest.mark.parametrize("job, kw", RACE_JOBS, ids=[f"{j}-{k.get('p', '')}" for j, k in RACE_JOBS])
def test_results_do_not_depend_on_the_thread_schedule(job, kw, schedule_restored):
    kw = dict(kw)
    groups = kw.pop("groups", None)
    results, seen = {}, {}
    for name, seed in SCHEDULES:
        _cuda_sim.set_schedule(name, seed)
        placed = Placed(race_inputs(), groups=groups)
        r = placed.run(job, **kw)
        del r["launches"]
        results[(name, seed)] = r
        seen[(name, seed)] = (repr(r), [bytes(v.view(torch.uint8).numpy()) for v in placed.views])
    if job == "norms":  # the common result must also be the right one
        r, tensors = results[SCHEDULES[0]], race_inputs()
        for i, t in enumerate(tensors):
            assert_norm_close(r["per_tensor"][i], ref_norm([t], kw["p"]), kw["p"], np.float64)
        assert_norm_close(r["total"], ref_norm(tensors, kw["p"]), kw["p"], np.float64)
    first = seen[SCHEDULES[0]]
    for key, value in seen.items():
        assert value[0] == first[0], f"results under the {key} schedule differ from thread order's"
        assert value[1] == first[1], f"data written under the {key} schedule differs from thread order's"


def test_a_planted_shared_memory_race_shows_across_schedules(schedule_restored):
    reads = set()
    for name, seed in SCHEDULES:
        _cuda_sim.set_schedule(name, seed)
        reads.add(tuple(_cuda_sim._race_probe()))
    assert len(reads) > 1, "the schedules did not expose the planted race"


# --------------------------------------------------------------------------
# The simulator's own checks are live
# --------------------------------------------------------------------------


@pytest.mark.parametrize("defect, message", [
    ("divergent_barrier", "128 threads wait at __syncthreads"),
    ("divergent_shuffle", "32 at a warp shuffle"),
    ("misaligned_vector", "misaligned 16-byte vector access in misaligned_vector_kernel"),
    ("misaligned_store", "misaligned 16-byte vector access in misaligned_store_kernel"),
    ("empty_grid", "cudaErrorInvalidConfiguration"),
])
def test_simulator_reports_planted_defects(defect, message):
    assert message in _cuda_sim._probe(defect)


def test_shared_memory_starts_every_block_unwritten():
    # On a GPU a block's shared memory holds garbage; here NaN bytes, filled
    # anew for each block (block 0 wrote the cell; block 1 must not see it).
    first, second = _cuda_sim._unwritten_shared_probe()
    assert first == 1.0 and math.isnan(second)


def test_a_refused_request_launches_nothing():
    x = make_torch(100, torch.float32, seed=9)
    placed = Placed([x], groups=[3])
    with pytest.raises(RuntimeError, match="group has no limit"):
        placed.run("clip_global", limits=[1e-3])
    assert _cuda_sim.launch_log() == []
    placed.assert_unchanged()
