"""Accuracy: exact cases, overflow and underflow rescue, NaN/inf at every lane,
chunk and tail position, and proof that the comparison helpers can fail."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import gradclip
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
    expected_scaled,
    make_numpy,
    make_torch,
    norm_rtol,
    ref_norm,
    result_dtype_of,
)

# --------------------------------------------------------------------------
# The helpers must be able to fail (planted mismatches)
# --------------------------------------------------------------------------


def _next_after(x, dtype, steps=1):
    """x moved `steps` ulps up in dtype (torch tensor or NumPy array, element 0)."""
    if isinstance(x, torch.Tensor):
        y = x.clone()
        flat = y.view(-1)
        v = flat[:1]
        for _ in range(steps):
            v = torch.nextafter(v, torch.tensor([INF], dtype=x.dtype))
        flat[0] = v[0]
        return y
    y = x.copy()
    for _ in range(steps):
        y.flat[0] = np.nextafter(y.flat[0], np.array(INF, dtype=y.dtype))
    return y


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_planted_one_ulp_mismatch_in_scaled_values_is_detected(dtype):
    original = make_torch(100, dtype, 1, scale=3.0)
    original[0] = 2.75  # positive, so "up" is away from the correct value
    norm = ref_norm([original], 2.0)
    good = torch.from_numpy(expected_scaled(original, min(1.0, 1.0 / (norm + EPS)))).to(dtype)
    assert_scaled(good, original, 1.0, norm, rtol=0.0)  # the exact answer passes
    with pytest.raises(AssertionError, match="outside the allowed bracket"):
        assert_scaled(_next_after(good, dtype), original, 1.0, norm, rtol=0.0)
    # With the norm known only to rtol, one ulp beyond the bracket still fails.
    rtol = norm_rtol(2.0)
    hi_coef = min(1.0, 1.0 / (norm * (1 - rtol) + EPS))
    edge = torch.from_numpy(expected_scaled(original, hi_coef)).to(dtype)
    assert_scaled(edge, original, 1.0, norm, rtol=rtol)
    with pytest.raises(AssertionError, match="outside the allowed bracket"):
        assert_scaled(_next_after(edge, dtype), original, 1.0, norm, rtol=rtol)


def test_planted_mismatches_in_bitwise_and_norm_helpers_are_detected():
    a = np.array([1.0, 0.0, NAN], np.float32)
    assert_bitwise_equal(a, a.copy())
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bitwise_equal(a, np.array([1.0, -0.0, NAN], np.float32))  # sign of zero
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bitwise_equal(a, _next_after(a, np.float32))
    with pytest.raises(AssertionError, match="NaN at different positions"):
        assert_same_or_both_nan(a, np.array([NAN, 0.0, NAN], np.float32))
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_same_or_both_nan(a, np.array([1.0, -0.0, NAN], np.float32))
    ref = 10.0
    assert_norm_close(ref * (1 + 0.5 * norm_rtol(2.0)), ref, 2.0)
    with pytest.raises(AssertionError, match="not within rtol"):
        assert_norm_close(ref * (1 + 2 * norm_rtol(2.0)), ref, 2.0)
    with pytest.raises(AssertionError, match="not within rtol"):
        assert_norm_close(math.nextafter(ref, INF), ref, INF)  # inf-norms must be exact
    with pytest.raises(AssertionError, match="expected NaN"):
        assert_norm_close(1.0, NAN, 2.0)
    # float32 results: one float32 ulp away from the rounded reference fails
    r32 = float(np.float32(ref))
    assert_norm_close(torch.tensor(r32), ref, 2.0, torch.float32)
    with pytest.raises(AssertionError, match="not within rtol"):
        assert_norm_close(torch.tensor(float(np.nextafter(np.float32(r32), np.float32(INF)))), ref, 2.0, torch.float32)


def test_reference_matches_exact_rational_arithmetic():
    x = make_numpy(300, np.float64, 2, scale=7.0)
    exact_sq = sum((Fraction(float(v)) ** 2 for v in x), Fraction(0))
    # correctly rounded sqrt of an exact rational, via integer square roots
    scale = 2**200
    root = Fraction(math.isqrt(exact_sq.numerator * scale**2 // exact_sq.denominator), scale)
    assert abs(ref_norm([x], 2.0) - float(root)) <= 2 * math.ulp(float(root))
    exact_l1 = sum((abs(Fraction(float(v))) for v in x), Fraction(0))
    assert ref_norm([x], 1.0) == float(exact_l1)  # fsum is correctly rounded
    assert ref_norm([x], INF) == float(np.abs(x).max())


# --------------------------------------------------------------------------
# Exact answers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [-1074, -1040, -1000, -700, -540, -300, 0, 300, 511, 700, 1000, 1020])
def test_pythagorean_float64_exact_at_every_exponent(k):
    # |(3, 4) * 2^k| = 5 * 2^k exactly; squares overflow above k ~ 509 and
    # underflow below k ~ -540, where the power-of-two rescue must stay exact.
    x = np.array([3.0, -4.0, 0.0], np.float64) * 2.0**k if k > -1074 else np.array(
        [3 * 5e-324, -4 * 5e-324, 0.0], np.float64)
    expected = math.ldexp(5.0, k)
    assert gradclip.global_norm([x]) == expected
    assert gradclip.global_norm([x], 1.0) == math.ldexp(7.0, k)
    assert gradclip.global_norm([x], INF) == math.ldexp(4.0, k)
    assert gradclip.tensor_norms([x, x[:1].copy()]).tolist() == [expected, math.ldexp(3.0, k)]
    # mixed with an ordinary array: 5*2^k dominates or vanishes, still accurate
    y = np.array([1.0], np.float64)
    assert_norm_close(gradclip.global_norm([x, y]), math.hypot(expected, 1.0), 2.0)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_integer_valued_data_gives_exact_norms(dtype):
    n = 65536
    ones = torch.ones(n, dtype=dtype)
    assert float(gradclip.get_total_norm(ones)) == 256.0  # sqrt(65536)
    assert float(gradclip.get_total_norm(ones, 1.0)) == 65536.0
    assert float(gradclip.get_total_norm(ones, INF)) == 1.0
    ints = (torch.arange(200, dtype=torch.float64) % 17 - 8).to(dtype)
    s1 = float(torch.arange(200, dtype=torch.float64).remainder(17).sub(8).abs().sum())
    assert float(gradclip.get_total_norm(ints, 1.0)) == s1
    pyth = torch.tensor([3.0, 4.0], dtype=dtype)
    assert float(gradclip.get_total_norm([pyth, -pyth, pyth.clone(), -pyth])) == 10.0
    assert float(gradclip.get_total_norm([pyth, pyth, pyth])) == 5.0  # one tensor, counted once


# --------------------------------------------------------------------------
# Overflow and underflow
# --------------------------------------------------------------------------


@pytest.mark.parametrize("p", NORM_ORDERS + [1500.0], ids=NORM_IDS + ["L1500"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_norms_of_negative_zeros_are_positive_zero(p, dtype):
    # A norm is never negative: the sign of a zero element must not leak into
    # it, whether the zero lands in a SIMD lane, a scalar tail or the rescue's
    # largest |x| (torch gives +0 too). Sizes around the 16-lane width.
    tensors = [torch.full((n,), -0.0, dtype=dtype) for n in (1, 15, 16, 17, 40)]
    for norm in [*gradclip.tensor_norms(tensors, p).tolist(), float(gradclip.get_total_norm(tensors, p))]:
        assert norm == 0.0 and math.copysign(1.0, norm) == 1.0, f"norm {norm!r}"


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("value", [1e25, 3.0e38, -3.4028234663852886e38], ids=["1e25", "3e38", "-f32max"])
def test_fp32_huge_values_give_finite_exact_norms(p, value):
    n = 65537
    x = np.full(n, value, np.float32)
    x[::3] *= -1
    ref = ref_norm([x], p)
    assert math.isfinite(ref)
    assert_norm_close(gradclip.global_norm([x], p), ref, p)
    t = torch.from_numpy(x.copy())
    got = gradclip.get_total_norm(t, p)
    assert got.dtype == torch.float32
    if ref <= float(np.finfo(np.float32).max):
        assert_norm_close(got, ref, p, torch.float32)
    else:
        assert math.isinf(float(got))  # only the float32 *result* can overflow
    if p == 2.0 and value == 1e25:
        assert math.isinf(float(torch.nn.utils.get_total_norm(t)))  # torch's float32 overflow
    # clipping such grads must not produce NaN: scaled by the tiny coefficient
    before = x.copy()
    norm = gradclip.clip_by_global_norm_([x], 1.0, p)
    assert_scaled(x, before, 1.0, norm, 0.0)
    assert np.isfinite(x).all()


@pytest.mark.parametrize("p", NORM_ORDERS + [10.0, 40.0], ids=NORM_IDS + ["L10", "L40"])
@pytest.mark.parametrize("magnitude", [1e-300, 1e-200, 1e-160, 1e-100, 1e100, 1e160, 1e200, 1e300])
def test_fp64_extreme_magnitudes_are_rescued(p, magnitude):
    x = make_numpy(1000, np.float64, 3) * magnitude
    ref = ref_norm([x], p)
    assert 0 < ref < INF
    assert_norm_close(gradclip.global_norm([x], p), ref, p)
    assert_norm_close(gradclip.tensor_norms([x], p)[0], ref, p)
    before = x.copy()
    norm = gradclip.clip_by_global_norm_([x], ref / 8, p)
    assert_scaled(x, before, ref / 8, norm, 0.0)


@pytest.mark.parametrize("p", NORM_ORDERS + [10.0], ids=NORM_IDS + ["L10"])
def test_fp64_mixed_magnitudes_across_tensors(p):
    arrays = [
        make_numpy(100, np.float64, 4) * 1e200,
        make_numpy(100, np.float64, 5) * 1e-200,
        make_numpy(100, np.float32, 6),
        make_numpy(33, np.float64, 7) * 1e150,
    ]
    ref = ref_norm(arrays, p)
    assert_norm_close(gradclip.global_norm(arrays, p), ref, p)
    norms = gradclip.tensor_norms(arrays, p)
    for got, a in zip(norms, arrays):
        assert_norm_close(got, ref_norm([a], p), p)
    small_only = arrays[1:3]
    assert_norm_close(gradclip.global_norm(small_only, p), ref_norm(small_only, p), p)


@pytest.mark.parametrize("p", [3.0, 7.0, 10.0, 40.0])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-40, 1e30, 3e38])
def test_fp32_large_p_overflow_and_underflow(p, magnitude):
    # |x|^p in float64 overflows (1e30^11 > 1.8e308) or may lose precision to
    # underflow (p > 6: float32 values below ~2^-150/p) without the rescue.
    x = np.array([magnitude, -magnitude / 2, magnitude / 3, 0.0] * 9, np.float32)
    ref = ref_norm([x], p)
    assert_norm_close(gradclip.global_norm([x], p), ref, p)
    t = torch.from_numpy(x)
    assert_norm_close(gradclip.get_total_norm([t, t.flip(0).clone()], p), ref_norm([x, x], p), p, torch.float32)


@pytest.mark.parametrize("p", [1000.0, 1500.0, 3000.0, 1e5, 1e300], ids=["L1000", "L1500", "L3000", "L1e5", "L1e300"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_very_large_p_gives_the_finite_norm(p, dtype, scale):
    # The rescue divides by the largest |x| for a generic p (core/norm_rescue.h):
    # |x|^p of ordinary data overflows (1.5^p from p ~ 1750) or underflows to
    # zero (0.5^p from p ~ 1075), and scaling by a power of two alone cannot
    # avoid both. torch gives inf here (see the last assertion).
    x = (make_numpy(4000, np.float64, 17) * scale).astype(dtype)
    parts = [x[:1000], x[1000:1001], x[1001:]]
    assert_norm_close(gradclip.global_norm(parts, p), ref_norm(parts, p), p)
    for got, a in zip(gradclip.tensor_norms(parts, p), parts):
        assert_norm_close(got, ref_norm([a], p), p)
    t = torch.from_numpy(x)
    assert_norm_close(gradclip.get_total_norm([t], p), ref_norm([x], p), p, result_dtype_of([t]))
    if scale == 1.0 and p == 1500.0 and dtype == np.float64:
        assert torch.linalg.vector_norm(t, ord=p) == INF


def test_fp64_norm_beyond_float64_range_is_inf_but_just_below_is_finite():
    big = np.array([1e308, -1e308], np.float64)  # sqrt(2) * 1e308 < DBL_MAX
    assert_norm_close(gradclip.global_norm([big]), ref_norm([big], 2.0), 2.0)
    over = np.array([1.5e308, 1.5e308], np.float64)  # 2.1e308 > DBL_MAX
    assert gradclip.global_norm([over]) == INF
    assert gradclip.global_norm([over], INF) == 1.5e308


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_subnormals(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([tiny] * 4 + [0.0] * 13, dtype)
    assert gradclip.global_norm([x]) == 2 * float(tiny)
    assert gradclip.global_norm([x], 1.0) == 4 * float(tiny)
    assert gradclip.global_norm([x], INF) == float(tiny)
    assert_norm_close(gradclip.global_norm([x], 3.0), ref_norm([x], 3.0), 3.0)
    assert_norm_close(gradclip.global_norm([x], 0.5), ref_norm([x], 0.5), 0.5)


def test_bf16_near_max_does_not_overflow():
    # sqrt(1000) * 3.3e38 ~ 1e40: finite in float64 (tensor_norms); only the
    # documented float32 total of a 16-bit list rounds it to inf.
    x = torch.full((1000,), 3.3e38, dtype=torch.bfloat16)
    ref = ref_norm([x], 2.0)
    assert math.isfinite(ref) and ref > float(np.finfo(np.float32).max)
    assert_norm_close(gradclip.tensor_norms([x])[0], ref, 2.0)
    assert float(gradclip.global_norm([x])) == INF
    half = torch.full((1000,), 3.3e36, dtype=torch.bfloat16)
    assert_norm_close(gradclip.global_norm([half]), ref_norm([half], 2.0), 2.0, torch.float32)


# --------------------------------------------------------------------------
# NaN and inf at every lane / tail / chunk position
# --------------------------------------------------------------------------

POSITIONS = [0, 1, 15, 16, 17, 32767, 32768, 32769, 65535, 65536]
_BASE = {}


def _base(dtype):
    if dtype not in _BASE:
        _BASE[dtype] = make_torch(65537, dtype, 8)
    return _BASE[dtype].clone()


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_nan_and_inf_at_every_position(dtype, p, position):
    x = _base(dtype)
    x[position] = NAN
    assert math.isnan(float(gradclip.get_total_norm([x], p)))
    assert math.isnan(float(gradclip.tensor_norms([x], p)[0]))
    x[position] = -INF
    assert float(gradclip.get_total_norm([x], p)) == INF
    x[(position + 7) % x.numel()] = NAN  # inf and NaN together: NaN
    assert math.isnan(float(gradclip.get_total_norm([x], p)))


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_nan_in_one_tensor_inf_in_another(p):
    a, b, c = make_torch(40, torch.float32, 9), make_torch(40, torch.float64, 10), make_torch(40, torch.float16, 11)
    b[3] = INF
    assert float(gradclip.get_total_norm([a, b, c], p)) == INF
    c[5] = NAN
    assert math.isnan(float(gradclip.get_total_norm([a, b, c], p)))
    assert math.isnan(float(gradclip.get_total_norm([c, b, a], p)))
    norms = gradclip.tensor_norms([a, b, c], p)
    assert math.isfinite(norms[0]) and norms[1] == INF and math.isnan(norms[2])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_by_value_nan_and_inf_at_every_position(dtype, position):
    x = _base(dtype) * 3
    x[position] = NAN
    x[(position + 1) % x.numel()] = INF
    x[(position + 2) % x.numel()] = -INF
    expected = x.clone().clamp_(-1.0, 1.0)
    gradclip.clip_by_value_(x, 1.0)
    assert_same_or_both_nan(x, expected)
    assert torch.isnan(x[position])
    assert x[(position + 1) % x.numel()].item() == 1.0 and x[(position + 2) % x.numel()].item() == -1.0


# --------------------------------------------------------------------------
# Accuracy of the sums against exact arithmetic
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_l2_and_l1_against_exact_rationals(dtype):
    x = make_numpy(4097, dtype, 12, scale=5.0)
    exact_sq = sum((Fraction(float(v)) ** 2 for v in x), Fraction(0))
    scale = 2**120
    exact_l2 = float(Fraction(math.isqrt(exact_sq.numerator * scale**2 // exact_sq.denominator), scale))
    exact_l1 = float(sum((abs(Fraction(float(v))) for v in x), Fraction(0)))
    got2, got1 = gradclip.global_norm([x]), gradclip.global_norm([x], 1.0)
    assert abs(got2 - exact_l2) <= exact_l2 * norm_rtol(2.0)
    assert abs(got1 - exact_l1) <= exact_l1 * norm_rtol(1.0)
    # For this modest size the lanes keep the error to a few ulps of float64.
    assert abs(got2 - exact_l2) <= 4 * math.ulp(exact_l2)
    assert abs(got1 - exact_l1) <= 8 * math.ulp(exact_l1)


def test_more_accurate_than_torch_float32():
    x = make_torch(100_000, torch.float32, 13, scale=10.0) + 3.0  # biased: naive float32 sums drift
    ref = ref_norm([x], 2.0)
    ours = float(gradclip.tensor_norms([x])[0])
    theirs = float(torch.linalg.vector_norm(x))
    assert abs(ours - ref) <= ref * norm_rtol(2.0)
    assert abs(ours - ref) <= abs(theirs - ref)


def test_wide_dynamic_range_keeps_small_contributions():
    # 1e10 and a thousand ones: float32 accumulation loses the ones entirely.
    x = np.ones(1001, np.float32)
    x[0] = 1e10
    got = gradclip.global_norm([x], 1.0)
    assert got == 1e10 + 1000.0
    assert_norm_close(gradclip.global_norm([x]), math.sqrt(1e20 + 1000.0), 2.0)
