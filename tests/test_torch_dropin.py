"""The torch drop-ins: clip_grad_norm_, get_total_norm, clip_grads_with_norm_ and
clip_grad_value_, against the float64 reference and against torch itself."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

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
    SIZES,
    TORCH_DTYPE_IDS,
    TORCH_DTYPES,
    TORCH_RTOL,
    TORCH_SCALED_RTOL,
    as_f64,
    assert_bitwise_equal,
    assert_norm_close,
    assert_same_or_both_nan,
    assert_scaled,
    make_param,
    make_torch,
    norm_rtol,
    ref_norm,
    result_dtype_of,
)


def grads_for(size: int, dtype: torch.dtype, seed: int, scale: float = 1.0):
    """A tensor of ``size`` elements plus two small ones of other shapes, so that
    every call covers several spans and a 2-d grad."""
    return [
        make_torch(size, dtype, seed, scale),
        make_torch((3, 5), dtype, seed + 1, scale),
        make_torch(7, dtype, seed + 2, scale),
    ]


def params_of(grads):
    return [make_param(g.clone()) for g in grads]


# --------------------------------------------------------------------------
# clip_grad_norm_: every dtype x norm x size against the float64 reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grad_norm_clips_to_reference(dtype, p, size):
    grads = grads_for(size, dtype, seed=size + 11)
    ref = ref_norm(grads, p)
    params = params_of(grads)
    max_norm = ref / 3.0
    total = gradclip.clip_grad_norm_(params, max_norm, norm_type=p)
    assert isinstance(total, torch.Tensor) and total.dim() == 0
    assert total.dtype == result_dtype_of(grads)
    assert total.device == grads[0].device
    assert_norm_close(total, ref, p, total.dtype)
    for param, g in zip(params, grads):
        assert param.grad.dtype == dtype and param.grad.shape == g.shape
        assert_scaled(param.grad, g, max_norm, ref, norm_rtol(p))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grad_norm_leaves_grads_bitwise_untouched_below_max(dtype, p, size):
    grads = grads_for(size, dtype, seed=size + 12)
    ref = ref_norm(grads, p)
    params = params_of(grads)
    total = gradclip.clip_grad_norm_(params, ref * 3.0 + 1.0, norm_type=p)
    assert_norm_close(total, ref, p, total.dtype)
    for param, g in zip(params, grads):
        assert_bitwise_equal(param.grad, g, "unclipped grad")


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grad_norm_untouched_also_matches_torch_bitwise(dtype):
    grads = grads_for(100, dtype, seed=5)
    ours, theirs = params_of(grads), params_of(grads)
    gradclip.clip_grad_norm_(ours, 1e6)
    torch.nn.utils.clip_grad_norm_(theirs, 1e6)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_exactly_at_coefficient_one_writes_nothing(dtype):
    # max_norm / (norm + eps) >= 1 exactly: coefficient 1, nothing written.
    grads = grads_for(40, dtype, seed=6)
    ref = ref_norm(grads, 2.0)
    params = params_of(grads)
    gradclip.clip_grad_norm_(params, ref * (1 + 1e-9) + EPS)
    for param, g in zip(params, grads):
        assert_bitwise_equal(param.grad, g)


# --------------------------------------------------------------------------
# Against torch itself (float32 / float64, where torch's norm is usable)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 17, 1000, 32769])
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_clip_grad_norm_matches_torch(dtype, p, size):
    grads = grads_for(size, dtype, seed=size + 13, scale=0.5)
    ours, theirs = params_of(grads), params_of(grads)
    expected_total = torch.nn.utils.clip_grad_norm_(theirs, 0.25, norm_type=p)
    total = gradclip.clip_grad_norm_(ours, 0.25, norm_type=p)
    assert total.dtype == expected_total.dtype == dtype
    rtol = 0.0 if p == INF else TORCH_RTOL[dtype]
    torch.testing.assert_close(total, expected_total, rtol=rtol, atol=0.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=TORCH_SCALED_RTOL[dtype], atol=0.0)
    # flash-attention style: gradclip is at least as accurate as torch (both against float64).
    ref = ref_norm(grads, p)
    assert abs(float(total) - ref) <= abs(float(expected_total) - ref) + ref * norm_rtol(p)


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_get_total_norm_matches_torch(dtype, p):
    tensors = grads_for(5000, dtype, seed=21)
    expected = torch.nn.utils.get_total_norm(tensors, norm_type=p)
    got = gradclip.get_total_norm(tensors, norm_type=p)
    assert got.dtype == expected.dtype and got.shape == expected.shape == ()
    torch.testing.assert_close(got, expected, rtol=0.0 if p == INF else TORCH_RTOL[dtype], atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_max_norm_zero_matches_torch_bitwise(dtype):
    grads = grads_for(50, dtype, seed=22)
    ours, theirs = params_of(grads), params_of(grads)
    gradclip.clip_grad_norm_(ours, 0.0)
    torch.nn.utils.clip_grad_norm_(theirs, 0.0)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)  # signed zeros


# --------------------------------------------------------------------------
# get_total_norm and clip_grads_with_norm_
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_get_total_norm_matches_reference(dtype, p, size):
    tensors = grads_for(size, dtype, seed=size + 31)
    before = [t.clone() for t in tensors]
    got = gradclip.get_total_norm(tensors, norm_type=p)
    assert got.dtype == result_dtype_of(tensors) and got.dim() == 0
    assert_norm_close(got, ref_norm(tensors, p), p, got.dtype)
    for t, b in zip(tensors, before):
        assert_bitwise_equal(t, b, "get_total_norm input")


def test_get_total_norm_reads_tensors_not_grads():
    p = make_param(torch.full((4,), 100.0))
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert float(gradclip.get_total_norm([p])) == 5.0
    assert float(gradclip.get_total_norm(p)) == 5.0


def test_get_total_norm_of_non_leaf_tensor_is_silent_and_matches_torch():
    # torch's get_total_norm never touches .grad; reading .grad of a non-leaf
    # tensor that requires grad emits a UserWarning (an error under this config).
    x = torch.linspace(-1, 1, 9, requires_grad=True)
    y = x * 3.0
    expected = torch.nn.utils.get_total_norm([y])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gradclip.get_total_norm([y])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)


def test_get_total_norm_empty_list_is_float32_zero_like_torch():
    got = gradclip.get_total_norm([])
    expected = torch.nn.utils.get_total_norm([])
    assert got.dtype == expected.dtype == torch.float32
    assert got.shape == () and float(got) == 0.0


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("total_kind", ["float", "tensor"])
def test_clip_grads_with_norm_uses_the_given_norm_exactly(dtype, total_kind):
    grads = grads_for(300, dtype, seed=41)
    total = 123.25
    given = total if total_kind == "float" else torch.tensor(total, dtype=torch.float64)
    params = params_of(grads)
    assert gradclip.clip_grads_with_norm_(params, 2.0, given) is None
    for param, g in zip(params, grads):
        assert_scaled(param.grad, g, 2.0, total, rtol=0.0)  # the norm is given: bitwise


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grads_with_norm_below_max_is_untouched(dtype):
    grads = grads_for(70, dtype, seed=42)
    params = params_of(grads)
    gradclip.clip_grads_with_norm_(params, 10.0, 9.0)
    for param, g in zip(params, grads):
        assert_bitwise_equal(param.grad, g)


def test_clip_grads_with_norm_float64_matches_torch_bitwise():
    # For float64 grads and a float64 total torch computes the same float64
    # coefficient and multiplies in float64: identical bits.
    grads = grads_for(500, torch.float64, seed=43)
    total = torch.nn.utils.get_total_norm(grads)
    ours, theirs = params_of(grads), params_of(grads)
    gradclip.clip_grads_with_norm_(ours, 0.5, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, total)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)


def test_get_total_norm_then_clip_grads_with_norm_equals_clip_grad_norm():
    grads = grads_for(1234, torch.float32, seed=44)
    a, b = params_of(grads), params_of(grads)
    t1 = gradclip.clip_grad_norm_(a, 0.3)
    t2 = gradclip.get_total_norm([p.grad for p in b])
    assert_bitwise_equal(t1, t2)
    # t2 is the float32-rounded norm, so the coefficient may differ by the
    # rounding of the norm to float32 (relative 2^-24).
    gradclip.clip_grads_with_norm_(b, 0.3, t2)
    for pa, pb, g in zip(a, b, grads):
        assert_scaled(pb.grad, g, 0.3, float(t2), rtol=0.0)
        torch.testing.assert_close(pa.grad, pb.grad, rtol=2.0**-23, atol=0.0)


# --------------------------------------------------------------------------
# clip_grad_value_: bit-exact with torch
# --------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, NAN, INF, -INF, 0.1, -0.1, 0.5, -0.5, 2.5, -2.5, 1e-8, -3.0, 3.0, 1.0 + 2.0**-10]


def value_grads(size: int, dtype: torch.dtype, seed: int):
    g = make_torch(size, dtype, seed, scale=2.0)
    if size:
        specials = torch.tensor(SPECIAL, dtype=torch.float64).to(dtype)
        idx = torch.randint(0, size, (min(size, 40),), generator=torch.Generator().manual_seed(seed))
        g[idx] = specials[torch.arange(idx.numel()) % specials.numel()]
    return [g, make_torch((4, 6), dtype, seed + 1, scale=2.0), torch.tensor(SPECIAL, dtype=torch.float64).to(dtype)]


@pytest.mark.parametrize("clip_value", [0.0, 0.1, 0.5, 1.0 + 2.0**-11 + 2.0**-40, 2.5, 1e4, INF])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grad_value_bit_exact_with_torch(dtype, size, clip_value):
    if dtype == torch.float16 and clip_value == 1e4:
        clip_value = 6e4  # torch refuses a float16 bound that overflows; 6e4 does not
    grads = value_grads(size, dtype, seed=size + 51)
    ours, theirs = params_of(grads), params_of(grads)
    assert gradclip.clip_grad_value_(ours, clip_value) is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(ours, theirs):
        # NaN stays NaN; torch rewrites NaN payloads (bf16 0x7fc0 -> 0xffff), so
        # NaN matches NaN and every other element must match bit for bit.
        assert_same_or_both_nan(a.grad, b.grad, "clip_grad_value_")


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grad_value_keeps_nan_and_unclipped_bits(dtype):
    g = torch.tensor([NAN, 0.25, -0.0, 7.0, -7.0], dtype=torch.float64).to(dtype)
    before = g.clone()
    p = make_param(g)
    gradclip.clip_grad_value_(p, 1.0)
    assert torch.isnan(p.grad[0])
    assert_bitwise_equal(p.grad[1:3], before[1:3])
    assert p.grad[3].item() == 1.0 and p.grad[4].item() == -1.0


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grad_value_rounds_bound_to_dtype_like_torch(dtype):
    # 0.1 is not representable; the bound is 0.1 rounded to the grad's dtype
    # (double -> float -> 16-bit, as torch's Scalar conversion).
    g = torch.tensor([1.0, -1.0], dtype=dtype)
    p = make_param(g.clone())
    gradclip.clip_grad_value_([p], 0.1)
    bound = torch.tensor(0.1, dtype=torch.float32).to(dtype) if dtype != torch.float64 else torch.tensor(0.1, dtype=dtype)
    assert_bitwise_equal(p.grad, torch.stack([bound, -bound]))


# --------------------------------------------------------------------------
# NaN and inf propagation, error_if_nonfinite
# --------------------------------------------------------------------------


def poisoned(dtype, value, seed):
    grads = grads_for(40, dtype, seed)
    grads[1][2, 3] = value
    return grads


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_propagates_like_torch(bad, dtype, p):
    grads = poisoned(dtype, bad, seed=61)
    ours, theirs = params_of(grads), params_of(grads)
    total = gradclip.clip_grad_norm_(ours, 1.0, norm_type=p)
    expected_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=p)
    if math.isnan(bad):
        assert math.isnan(float(total)) and math.isnan(float(expected_total))
        for a in ours:
            assert torch.isnan(a.grad).all(), "a NaN total must make every grad NaN"
    else:
        assert float(total) == INF == float(expected_total)
        for a, g in zip(ours, grads):
            finite = torch.isfinite(g)
            assert (a.grad[finite] == 0).all(), "an inf total zeroes finite elements"
            assert torch.isnan(a.grad[~finite]).all(), "inf * 0 is NaN"
    for a, b in zip(ours, theirs):
        assert_same_or_both_nan(a.grad, b.grad, "nonfinite propagation")


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_error_if_nonfinite_raises_before_touching_anything(dtype, bad, p):
    grads = poisoned(dtype, bad, seed=62)
    params = params_of(grads)
    with pytest.raises(RuntimeError, match=r"non-finite, so it cannot be clipped") as info:
        gradclip.clip_grad_norm_(params, 1e-3, norm_type=p, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as torch_info:
        torch.nn.utils.clip_grad_norm_(params_of(grads), 1e-3, norm_type=p, error_if_nonfinite=True)
    assert str(info.value) == str(torch_info.value)
    for param, g in zip(params, grads):
        assert_bitwise_equal(param.grad, g, "grad after error_if_nonfinite")
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.get_total_norm(grads, norm_type=p, error_if_nonfinite=True)


def test_error_if_nonfinite_with_finite_norm_clips_normally():
    grads = grads_for(100, torch.float32, seed=63)
    params = params_of(grads)
    ref = ref_norm(grads, 2.0)
    total = gradclip.clip_grad_norm_(params, ref / 2, error_if_nonfinite=True)
    assert_norm_close(total, ref, 2.0, torch.float32)
    for param, g in zip(params, grads):
        assert_scaled(param.grad, g, ref / 2, ref, norm_rtol(2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_error_if_nonfinite_on_a_total_beyond_float32(dtype):
    # Finite elements whose total (4.2e38 in float64) is inf as the float32 result:
    # torch raises; so must we, and before writing (the hold decision and the
    # error are taken on the same, reported value).
    grads = [torch.full((2,), 3e38, dtype=dtype), torch.ones(3, dtype=dtype)]
    params = params_of(grads)
    with pytest.raises(RuntimeError, match=r"non-finite, so it cannot be clipped"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"non-finite, so it cannot be clipped"):
        torch.nn.utils.clip_grad_norm_(params_of(grads), 1.0, error_if_nonfinite=True)
    for param, g in zip(params, grads):
        assert_bitwise_equal(param.grad, g, "grad after error_if_nonfinite")
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.get_total_norm(grads, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_by_global_norm_([g.float().numpy() for g in grads], 1.0, error_if_nonfinite=True)
    # Without the flag: the inf total is returned and the float64 total's
    # coefficient applied (torch's float32 inf would zero every gradient).
    total = gradclip.clip_grad_norm_(params, 1.0)
    assert float(total) == INF and total.dtype == torch.float32
    assert 0 < float(params[0].grad[0]) < 1.0
    # float64 gradients report a float64 total: finite, no error.
    wide = params_of([g.double() for g in grads])
    assert math.isfinite(float(gradclip.clip_grad_norm_(wide, 1.0, error_if_nonfinite=True)))


# --------------------------------------------------------------------------
# Argument forms: one tensor, lists, generators, None grads, foreach
# --------------------------------------------------------------------------


def test_single_parameter_and_tuple_and_generator_forms():
    grads = grads_for(64, torch.float32, seed=71)
    ref = ref_norm(grads[:1], 2.0)
    single = make_param(grads[0].clone())
    total = gradclip.clip_grad_norm_(single, ref / 4)
    assert_norm_close(total, ref, 2.0, torch.float32)
    assert_scaled(single.grad, grads[0], ref / 4, ref, norm_rtol(2.0))

    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    model(torch.randn(2, 5, generator=torch.Generator().manual_seed(0))).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    ref_m = ref_norm(before, 2.0)
    total = gradclip.clip_grad_norm_(model.parameters(), ref_m / 2)  # a generator
    assert_norm_close(total, ref_m, 2.0, torch.float32)
    for p, g in zip(model.parameters(), before):
        assert_scaled(p.grad, g, ref_m / 2, ref_m, norm_rtol(2.0))

    tup = tuple(params_of(grads))
    total = gradclip.clip_grad_norm_(tup, 1e9)
    assert_norm_close(total, ref_norm(grads, 2.0), 2.0, torch.float32)


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="`parameters` is an empty generator, no gradient clipping will occur"):
        total = gradclip.clip_grad_norm_((p for p in []), 1.0)
    assert total.dtype == torch.float32 and float(total) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)


def test_empty_list_and_all_none_grads_give_zero_without_warning():
    assert float(gradclip.clip_grad_norm_([], 1.0)) == 0.0
    params = [make_param(None), make_param(None)]
    total = gradclip.clip_grad_norm_(params, 1.0)
    assert float(total) == 0.0 and total.dtype == torch.float32
    assert all(p.grad is None for p in params)
    assert gradclip.clip_grad_value_(params, 1.0) is None
    gradclip.clip_grads_with_norm_(params, 1.0, 5.0)


def test_none_grads_are_skipped():
    grads = grads_for(30, torch.float32, seed=72)
    params = [make_param(None)] + params_of(grads) + [make_param(None)]
    ref = ref_norm(grads, 2.0)
    total = gradclip.clip_grad_norm_(params, ref / 3)
    assert_norm_close(total, ref, 2.0, torch.float32)
    assert params[0].grad is None and params[-1].grad is None
    for param, g in zip(params[1:-1], grads):
        assert_scaled(param.grad, g, ref / 3, ref, norm_rtol(2.0))


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_empty_grads_are_accepted(dtype):
    grads = [torch.empty(0, dtype=dtype), torch.empty((3, 0), dtype=dtype), make_torch(9, dtype, 73)]
    params = params_of(grads)
    ref = ref_norm(grads, 2.0)
    total = gradclip.clip_grad_norm_(params, ref / 2)
    assert_norm_close(total, ref, 2.0, total.dtype)
    assert params[0].grad.numel() == 0 and params[1].grad.shape == (3, 0)
    assert_scaled(params[2].grad, grads[2], ref / 2, ref, norm_rtol(2.0))
    only_empty = params_of([torch.empty(0, dtype=dtype)])
    total = gradclip.clip_grad_norm_(only_empty, 1.0)
    assert float(total) == 0.0 and total.dtype == result_dtype_of([grads[0]])


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted_and_ignored(foreach):
    grads = grads_for(333, torch.float32, seed=74)
    a, b = params_of(grads), params_of(grads)
    t1 = gradclip.clip_grad_norm_(a, 0.5)
    t2 = gradclip.clip_grad_norm_(b, 0.5, foreach=foreach)
    assert_bitwise_equal(t1, t2)
    for pa, pb in zip(a, b):
        assert_bitwise_equal(pa.grad, pb.grad)
    c = params_of(grads)
    gradclip.clip_grad_value_(c, 0.2, foreach=foreach)
    assert float(gradclip.get_total_norm(grads, foreach=foreach)) == float(gradclip.get_total_norm(grads))
    gradclip.clip_grads_with_norm_(c, 1.0, 0.5, foreach=foreach)


@pytest.mark.parametrize("norm_type", ["inf", INF, np.float64(INF)])
def test_norm_type_inf_spellings(norm_type):
    grads = grads_for(50, torch.float32, seed=75)
    total = gradclip.clip_grad_norm_(params_of(grads), 1e9, norm_type=norm_type)
    assert float(total) == ref_norm(grads, INF)


# --------------------------------------------------------------------------
# Deliberate differences from torch
# --------------------------------------------------------------------------


def test_fp16_norm_does_not_overflow_unlike_torch():
    # Four float16 grads of norm 51200 each: the total 102400 exceeds float16's
    # 65504. torch's float16 total is inf and every grad is zeroed.
    grads = [torch.full((4,), 25600.0, dtype=torch.float16) for _ in range(4)]
    theirs = params_of(grads)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isinf(float(torch_total)) and all((p.grad == 0).all() for p in theirs)

    ours = params_of(grads)
    total = gradclip.clip_grad_norm_(ours, 1.0)
    assert total.dtype == torch.float32 and float(total) == 102400.0
    for p, g in zip(ours, grads):
        assert_scaled(p.grad, g, 1.0, 102400.0, rtol=0.0)
        assert (p.grad != 0).all()


def test_bf16_total_is_float32():
    grads = [make_torch(100, torch.bfloat16, 76) for _ in range(3)]
    total = gradclip.get_total_norm(grads)
    assert total.dtype == torch.float32
    assert torch.nn.utils.get_total_norm(grads).dtype == torch.bfloat16
    assert_norm_close(total, ref_norm(grads, 2.0), 2.0, torch.float32)


def test_fp32_grads_of_1e25_give_finite_norm_unlike_torch():
    grads = [torch.full((10,), 1e25), torch.full((6,), -1e25)]
    assert math.isinf(float(torch.nn.utils.get_total_norm(grads)))
    ref = ref_norm(grads, 2.0)  # 4e25 up to float32 rounding of 1e25
    assert math.isfinite(ref)
    params = params_of(grads)
    total = gradclip.clip_grad_norm_(params, 1.0)
    assert_norm_close(total, ref, 2.0, torch.float32)
    for p, g in zip(params, grads):
        assert_scaled(p.grad, g, 1.0, ref, norm_rtol(2.0))


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_same_grad_twice_counted_once_and_scaled_once(dtype):
    g = make_torch((6, 7), dtype, 77)
    p = make_param(g.clone())
    other = make_param(make_torch(11, dtype, 78))
    other_before = other.grad.clone()
    ref = ref_norm([g, other_before], 2.0)
    total = gradclip.clip_grad_norm_([p, other, p], ref / 2)
    assert_norm_close(total, ref, 2.0, total.dtype)
    assert_scaled(p.grad, g, ref / 2, ref, norm_rtol(2.0))
    assert_scaled(other.grad, other_before, ref / 2, ref, norm_rtol(2.0))
    # torch counts it twice (documented difference)
    t = torch.nn.utils.get_total_norm([g, other_before, g])
    assert float(t) > float(total) * 1.1


def test_two_parameters_sharing_one_grad_tensor_and_a_transposed_alias():
    g = make_torch((8, 5), torch.float32, 79)
    shared = g.clone()
    p1, p2 = make_param(shared), make_param(torch.zeros(8, 5))
    p2.grad = shared  # same tensor object
    p3 = make_param(torch.zeros(5, 8))
    p3.grad = shared.t()  # another view of the same memory
    ref = ref_norm([g], 2.0)
    total = gradclip.clip_grad_norm_([p1, p2, p3], ref / 4)
    assert_norm_close(total, ref, 2.0, torch.float32)
    assert_scaled(shared, g, ref / 4, ref, norm_rtol(2.0))
    assert_bitwise_equal(gradclip.get_total_norm([shared, shared.t(), shared]), gradclip.get_total_norm([shared]))


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_transposed_grad(dtype):
    base = make_torch((33, 17), dtype, 80)
    gt = base.t()  # dense, not contiguous
    assert not gt.is_contiguous()
    p = make_param(torch.zeros(17, 33, dtype=dtype))
    p.grad = gt.clone().t().contiguous().t()  # same non-contiguous layout, own memory
    assert p.grad.stride() == gt.stride()
    ref = ref_norm([gt], 2.0)
    total = gradclip.clip_grad_norm_(p, ref / 5)
    assert_norm_close(total, ref, 2.0, total.dtype)
    assert_scaled(p.grad, gt, ref / 5, ref, norm_rtol(2.0))  # element positions kept

    q, r = make_param(torch.zeros(17, 33, dtype=dtype)), make_param(torch.zeros(17, 33, dtype=dtype))
    q.grad = (base * 3).t()
    r.grad = (base * 3).t()
    gradclip.clip_grad_value_(q, 0.5)
    torch.nn.utils.clip_grad_value_(r, 0.5)
    assert_same_or_both_nan(q.grad, r.grad)


def test_mixed_dtypes_in_one_call():
    grads = [make_torch(100, dt, 90 + i) for i, dt in enumerate(TORCH_DTYPES)] + [make_torch(17, torch.float16, 95)]
    for p in [1.0, 2.0, INF, 3.0, 0.5]:
        params = params_of(grads)
        ref = ref_norm(grads, p)
        total = gradclip.clip_grad_norm_(params, ref / 3, norm_type=p)
        assert total.dtype == torch.float64  # float64 present
        assert_norm_close(total, ref, p)
        for param, g in zip(params, grads):
            assert param.grad.dtype == g.dtype
            assert_scaled(param.grad, g, ref / 3, ref, norm_rtol(p))
    no_f64 = [g for g in grads if g.dtype != torch.float64]
    total = gradclip.get_total_norm(no_f64)
    assert total.dtype == torch.float32
    assert_norm_close(total, ref_norm(no_f64, 2.0), 2.0, torch.float32)


# --------------------------------------------------------------------------
# Negative-bit views
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_negative_bit_views_match_torch_on_the_resolved_tensor(dtype):
    stored = make_torch(50, dtype, 96, scale=2.0)
    view = torch._neg_view(stored)
    assert view.is_neg()
    logical = view.resolve_neg()  # what torch computes with
    for p in NORM_ORDERS:
        assert_bitwise_equal(gradclip.get_total_norm(view, norm_type=p), gradclip.get_total_norm(logical, norm_type=p))
        assert_norm_close(gradclip.global_norm(view, p), ref_norm([logical], p), p, result_dtype_of([logical]))

    # value clipping: the view's logical values are clipped exactly like torch
    # clips the resolved tensor
    v = torch._neg_view(stored.clone())
    expected = logical.clone()
    ep = make_param(expected)
    torch.nn.utils.clip_grad_value_(ep, 0.75)
    gradclip.clip_by_value_(v, 0.75)
    assert_same_or_both_nan(v, ep.grad, "neg-bit view clip_by_value_")

    # norm clipping: the view's logical values equal the resolved tensor clipped
    v = torch._neg_view(stored.clone())
    resolved = logical.clone()
    ref = ref_norm([logical], 2.0)
    n1 = gradclip.clip_by_global_norm_(v, ref / 3)
    n2 = gradclip.clip_by_global_norm_(resolved, ref / 3)
    assert_bitwise_equal(n1, n2)
    assert_bitwise_equal(v.resolve_neg(), resolved)
    assert_scaled(v, logical, ref / 3, ref, norm_rtol(2.0))


def test_negative_bit_grad_through_clip_grad_norm_and_value():
    stored = make_torch((4, 9), torch.float32, 97, scale=3.0)
    p = make_param(torch.zeros(4, 9))
    p.grad = torch._neg_view(stored.clone())
    logical = stored.neg()
    theirs = make_param(logical.clone())
    t1 = gradclip.clip_grad_norm_(p, 1.0)
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(t1, t2, rtol=TORCH_RTOL[torch.float32], atol=0.0)
    torch.testing.assert_close(p.grad.resolve_neg(), theirs.grad, rtol=TORCH_SCALED_RTOL[torch.float32], atol=0.0)

    p.grad = torch._neg_view(stored.clone())
    theirs = make_param(logical.clone())
    gradclip.clip_grad_value_(p, 1.5)
    torch.nn.utils.clip_grad_value_(theirs, 1.5)
    assert_bitwise_equal(p.grad, theirs.grad)


def test_conj_imag_view_of_one_element_is_a_dense_negative_view():
    z = torch.tensor([3.0 - 4.0j], dtype=torch.complex64)
    view = z.conj().imag  # logical value +4, stored -4
    assert view.is_neg()
    assert float(gradclip.get_total_norm(view)) == 4.0
    gradclip.clip_by_value_(view, 1.0)
    assert view.item() == 1.0 and z.imag.item() == -1.0


def test_conj_imag_view_of_many_elements_is_strided_and_refused():
    # .imag of a complex tensor has stride 2 (gaps): refused like any non-dense view.
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(98))
    view = z.conj().imag
    assert view.is_neg() and view.stride() == (2,)
    before = z.clone()
    with pytest.raises(ValueError, match=r"arrays\[0\]: is strided with gaps or overlaps"):
        gradclip.clip_by_value_([view], 0.1)
    assert_bitwise_equal(torch.view_as_real(z), torch.view_as_real(before))


def test_results_are_on_the_grads_device_and_as_float_tensors():
    grads = grads_for(10, torch.float32, seed=99)
    total = gradclip.clip_grad_norm_(params_of(grads), 1.0)
    assert total.device.type == "cpu" and not total.requires_grad
    assert as_f64(total).shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_norm_beyond_float32_range_returns_float32_inf_and_clips_correctly(dtype):
    # Finite float32 / bfloat16 grads whose float64 norm (~1e40) exceeds
    # float32's range: the internal norm is finite, so the grads are scaled by
    # max_norm / norm; the documented float32 result is that norm rounded to
    # float32, i.e. inf. In no case may the call raise after scaling the grads.
    grads = [torch.full((1000,), 3.0e38, dtype=dtype), torch.full((5,), -3.0e38, dtype=dtype)]
    ref = ref_norm(grads, 2.0)
    assert math.isfinite(ref) and ref > float(torch.finfo(torch.float32).max)
    params = params_of(grads)
    total = gradclip.clip_grad_norm_(params, 1.0)
    assert total.dtype == torch.float32
    assert_norm_close(total, ref, 2.0, torch.float32)  # float32(ref): inf
    for p, g in zip(params, grads):
        assert_scaled(p.grad, g, 1.0, ref, norm_rtol(2.0))
    assert_norm_close(gradclip.get_total_norm(grads), ref, 2.0, torch.float32)
    assert_norm_close(gradclip.global_norm(grads), ref, 2.0, torch.float32)


@pytest.mark.parametrize("p, second", [(1.0, 1e30), (2.0, 4e34), (INF, 1.0)], ids=["L1", "L2", "Linf"])
def test_norm_just_above_float32_max_rounds_to_float32_max_not_inf(p, second):
    # float32 max is 3.4028234664e38; float64 norms below 3.4028235678e38 (max
    # plus half an ulp) round to it under round-to-nearest, as np.float32() and
    # torch.tensor(..., dtype=torch.float32) do. Only larger norms become inf.
    f32max = float(torch.finfo(torch.float32).max)
    grads = [torch.tensor([f32max, second], dtype=torch.float32)]
    ref = ref_norm(grads, p)
    assert f32max <= ref < f32max + 2.0**103
    assert float(torch.tensor(ref, dtype=torch.float32)) == f32max
    assert float(gradclip.get_total_norm(grads, p)) == f32max
    assert float(gradclip.global_norm(grads, p)) == f32max
    params = params_of(grads)
    assert float(gradclip.clip_grad_norm_(params, 1.0, norm_type=p)) == f32max
    assert_scaled(params[0].grad, grads[0], 1.0, ref, norm_rtol(p))


@pytest.mark.parametrize("total", [NAN, INF, 0.0, 1e-300], ids=["nan", "inf", "zero", "tiny"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grads_with_norm_special_totals_like_torch(dtype, total):
    grads = grads_for(40, dtype, seed=100)
    grads[0][3] = INF
    ours, theirs = params_of(grads), params_of(grads)
    given = torch.tensor(total, dtype=torch.float64)
    gradclip.clip_grads_with_norm_(ours, 0.5, given)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, given)
    for a, b in zip(ours, theirs):
        assert_same_or_both_nan(a.grad, b.grad)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_max_norm_inf_never_clips_finite_grads(dtype):
    grads = grads_for(300, dtype, seed=101, scale=1e3)
    ours, theirs = params_of(grads), params_of(grads)
    total = gradclip.clip_grad_norm_(ours, INF)
    torch.nn.utils.clip_grad_norm_(theirs, INF)
    assert_norm_close(total, ref_norm(grads, 2.0), 2.0, total.dtype)
    for a, b, g in zip(ours, theirs, grads):
        assert_bitwise_equal(a.grad, g)
        if dtype in (torch.float32, torch.float64):
            assert_bitwise_equal(a.grad, b.grad)


# --------------------------------------------------------------------------
# Exception types against torch's: the README's table ("Semantics, and the
# differences from torch"), row by row. A row's gradclip cell says "aligned"
# exactly when gradclip's exception is an instance of torch's for every call.
# --------------------------------------------------------------------------

TORCH_213 = torch.__version__.startswith("2.13.")  # the version the table documents


def _holder(grad):
    """A parameter holding ``grad`` (a plain tensor where torch refuses a
    Parameter of that dtype, e.g. int64)."""
    like = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    try:
        param = torch.nn.Parameter(like)
    except RuntimeError:  # only floating point and complex tensors can require grad
        param = like
    param.grad = grad
    return param


def _big(seed=0, shape=(4, 5)):
    """A float32 gradient that any max_norm / clip_value below 1 would change."""
    return make_torch(shape, torch.float32, seed, scale=100.0)


def _odd(dtype):
    return (torch.arange(6).reshape(2, 3) % 3).to(dtype)


def _sparse():
    return torch.sparse_coo_tensor([[0, 2]], [3.0, 4.0], (5,), check_invariants=True)


def _overlapping():
    base = make_torch(10, torch.float32, 5, scale=100.0)
    return [base[:6], base[4:]]


def _with_bad(value):
    grads = [_big(0), _big(1, (7,))]
    grads[1][3] = value
    return grads


def _call(fn, grads_or_tensors, *args, params=True, **kwargs):
    """(function name, maker): the maker gives fresh inputs each time:
    (args, kwargs, the tensors that must be unchanged after an error)."""
    def make():
        items = grads_or_tensors()
        first = [_holder(g) for g in items] if params else items
        watched = [g for g in items if isinstance(g, torch.Tensor)]
        return (first, *args), dict(kwargs), watched
    return fn, make


NO_ERROR = None
# README row -> [(call, torch's exception, gradclip's exception)]
EXCEPTION_CASES = {
    "nonfinite total norm with `error_if_nonfinite=True`": [
        (_call("clip_grad_norm_", lambda: _with_bad(NAN), 1e-3, error_if_nonfinite=True), RuntimeError, RuntimeError),
        (_call("clip_grad_norm_", lambda: _with_bad(INF), 1e-3, error_if_nonfinite=True), RuntimeError, RuntimeError),
        (_call("get_total_norm", lambda: _with_bad(NAN), params=False, error_if_nonfinite=True),
         RuntimeError, RuntimeError),
    ],
    "negative or NaN `max_norm` / `clip_value`": [
        (_call("clip_grad_norm_", lambda: [_big()], -1.0), NO_ERROR, ValueError),
        (_call("clip_grads_with_norm_", lambda: [_big()], NAN, torch.tensor(1e3)), NO_ERROR, ValueError),
        (_call("clip_grad_value_", lambda: [_big()], -1.0), NO_ERROR, ValueError),
        (_call("clip_grad_value_", lambda: [_big()], NAN), NO_ERROR, ValueError),
    ],
    "`norm_type` 0, negative or NaN": [
        (_call("clip_grad_norm_", lambda: [_big()], 1e-3, norm_type=0), NO_ERROR, ValueError),
        (_call("clip_grad_norm_", lambda: [_big()], 1e-3, norm_type="-inf"), NO_ERROR, ValueError),
        (_call("get_total_norm", lambda: [_big()], params=False, norm_type=-1.0), NO_ERROR, ValueError),
        (_call("get_total_norm", lambda: [_big()], params=False, norm_type=NAN), NO_ERROR, ValueError),
    ],
    "`norm_type`, `max_norm` or `clip_value` of another type (`None`, a list)": [
        (_call("clip_grad_norm_", lambda: [_big()], None), TypeError, TypeError),
        (_call("clip_grad_norm_", lambda: [_big()], 1e-3, norm_type=None), TypeError, TypeError),
        (_call("get_total_norm", lambda: [_big()], params=False, norm_type=[2.0]), TypeError, TypeError),
        (_call("clip_grad_value_", lambda: [_big()], [1.0]), TypeError, TypeError),
        (_call("clip_grads_with_norm_", lambda: [_big()], None, torch.tensor(1e3)), TypeError, TypeError),
    ],
    "a string that is not a number (`norm_type='fro'`)": [
        (_call("clip_grad_norm_", lambda: [_big()], 1e-3, norm_type="fro"), ValueError, TypeError),
        (_call("get_total_norm", lambda: [_big()], params=False, norm_type="nuc"), ValueError, TypeError),
        (_call("clip_grad_value_", lambda: [_big()], "abc"), ValueError, TypeError),
    ],
    "integer, bool or float8 gradients": [
        (_call("clip_grad_norm_", lambda: [_big(), _odd(torch.int64)], 1e-3), RuntimeError, TypeError),
        (_call("get_total_norm", lambda: [_big(), _odd(torch.bool)], params=False), RuntimeError, TypeError),
        (_call("clip_grad_value_", lambda: [_big(), _odd(torch.int32)], 1e-3), RuntimeError, TypeError),
        (_call("clip_grads_with_norm_", lambda: [_big(), _odd(torch.int64)], 1e-3, torch.tensor(1e3)),
         RuntimeError, TypeError),
        (_call("clip_grad_norm_", lambda: [_big(), _odd(torch.float8_e4m3fn)], 1e-3), NotImplementedError, TypeError),
    ],
    "complex gradients": [
        (_call("clip_grad_norm_", lambda: [_big(), _odd(torch.complex64)], 1e-3), NO_ERROR, TypeError),
        (_call("get_total_norm", lambda: [_big(), _odd(torch.complex64)], params=False), NO_ERROR, TypeError),
        (_call("clip_grad_value_", lambda: [_big(), _odd(torch.complex64)], 1e-3), NotImplementedError, TypeError),
    ],
    "sparse, nested or meta tensors (also meta beside CPU tensors)": [
        (_call("clip_grad_norm_", lambda: [_big(), _sparse()], 1e-3), NotImplementedError, ValueError),
        (_call("clip_grad_value_", lambda: [_big(), _sparse()], 1e-3), NotImplementedError, ValueError),
        (_call("clip_grads_with_norm_", lambda: [_big(), _sparse()], 1e-3, torch.tensor(1e3)), NO_ERROR, ValueError),
        (_call("get_total_norm", lambda: [torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])], params=False),
         NotImplementedError, ValueError),
        (_call("clip_grad_norm_", lambda: [_big(), torch.ones(3, device="meta")], 1e-3),
         NotImplementedError, ValueError),
        (_call("clip_grad_value_", lambda: [_big(), torch.ones(3, device="meta")], 1e-3), NO_ERROR, ValueError),
    ],
    "gradients strided with gaps (`g[::2]`) or partially overlapping": [
        (_call("clip_grad_norm_", lambda: [_big(), make_torch(20, torch.float32, 4, 100.0)[::2]], 1e-3),
         NO_ERROR, ValueError),
        (_call("clip_grad_norm_", _overlapping, 1e-3), NO_ERROR, ValueError),
        (_call("clip_grad_value_", _overlapping, 1e-3), NO_ERROR, ValueError),
    ],
    "items that are not tensors (`[1.0, 2.0]`)": [
        (_call("clip_grad_norm_", lambda: [1.0, 2.0], 1e-3, params=False), AttributeError, TypeError),
        (_call("clip_grad_value_", lambda: [1.0, 2.0], 1e-3, params=False), AttributeError, TypeError),
        (_call("clip_grads_with_norm_", lambda: [1.0, 2.0], 1e-3, 5.0, params=False), AttributeError, TypeError),
        (_call("get_total_norm", lambda: [1.0, 2.0], params=False), AttributeError, TypeError),
    ],
    "`parameters` not iterable (`None`, a float)": [
        (("clip_grad_norm_", lambda: ((None, 1.0), {}, [])), TypeError, TypeError),
        (("get_total_norm", lambda: ((2.5,), {}, [])), TypeError, TypeError),
    ],
    "`get_total_norm` of NumPy arrays": [
        (("get_total_norm", lambda: (([np.ones(3, np.float32)],), {}, [])), TypeError, TypeError),
    ],
    "`clip_grads_with_norm_`: `total_norm` of shape (2,) / of shape (1,) / an integer tensor": [
        (_call("clip_grads_with_norm_", lambda: [_big()], 1e-3, torch.tensor([1e3, 1e3])), RuntimeError, ValueError),
        (_call("clip_grads_with_norm_", lambda: [_big()], 1e-3, torch.tensor([1e3])), RuntimeError, NO_ERROR),
        (_call("clip_grads_with_norm_", lambda: [_big()], 1e-3, torch.tensor(1000)), NO_ERROR, TypeError),
    ],
    "no gradients (`[]`, or every `.grad` None)": [
        (_call("clip_grad_value_", lambda: [], 1.0), RuntimeError, NO_ERROR),
        (("clip_grad_value_", lambda: (([torch.nn.Parameter(torch.zeros(3))], 1.0), {}, [])), RuntimeError, NO_ERROR),
        (_call("clip_grad_norm_", lambda: [], 1.0), NO_ERROR, NO_ERROR),
        (_call("get_total_norm", lambda: [], params=False), NO_ERROR, NO_ERROR),
        (_call("clip_grads_with_norm_", lambda: [], 1.0, torch.tensor(1.0)), NO_ERROR, NO_ERROR),
    ],
}


def _bits(t):
    if t.is_meta or t.is_nested:
        return None
    if t.layout != torch.strided:
        return _bits(t.coalesce().values())
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings on odd inputs (nested tensors) are not the subject here
        return fn(*args, **kwargs)


def _raised(fn, args, kwargs):
    try:
        _quietly(fn, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return e
    return None


def _exception_cases():
    for row, calls in EXCEPTION_CASES.items():
        for k, ((name, make), theirs, ours) in enumerate(calls):
            slug = re.sub(r"\W+", "-", row).strip("-")[:40]
            yield pytest.param(name, make, theirs, ours, id=f"{slug}-{k}-{name}")


@pytest.mark.parametrize("name, make, theirs, ours", list(_exception_cases()))
def test_exception_type_against_torch(name, make, theirs, ours):
    if TORCH_213:  # the torch column of the table: torch 2.13's behaviour
        args, kwargs, _ = _quietly(make)
        got = _raised(getattr(torch.nn.utils, name), args, kwargs)
        assert type(got) is (theirs or type(None)), f"torch.nn.utils.{name} raised {got!r}, table says {theirs}"
    args, kwargs, watched = _quietly(make)
    before = [_bits(t) for t in watched]
    got = _raised(getattr(gradclip, name), args, kwargs)
    assert type(got) is (ours or type(None)), f"gradclip.{name} raised {got!r}, table says {ours}"
    if ours is not None and theirs is not None and issubclass(ours, theirs):
        assert isinstance(got, theirs)  # aligned: `except <torch's type>` catches gradclip's
    if got is not None:
        for i, (t, b) in enumerate(zip(watched, before)):
            if b is not None:
                assert torch.equal(_bits(t), b), f"input {i} was modified although gradclip.{name} raised {got!r}"


def _readme_exception_table():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    header = "| case | torch 2.13 raises | gradclip raises |"
    assert header in text, "the README's exception table is gone"
    rows = {}
    for line in text[text.index(header):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"README exception table: a row without 3 cells: {line!r}"
        rows[cells[0]] = cells[1:]
    return rows


def test_readme_exception_table_agrees_with_these_cases():
    rows = _readme_exception_table()
    assert list(rows) == list(EXCEPTION_CASES), "README rows and EXCEPTION_CASES differ (names or order)"

    def names(cell):
        return set(re.findall(r"`(\w+(?:Error|Exception))`", cell))

    for row, (torch_cell, ours_cell) in rows.items():
        calls = EXCEPTION_CASES[row]
        for cell, column in ((torch_cell, 1), (ours_cell, 2)):
            types = [c[column] for c in calls]
            assert names(cell) == {t.__name__ for t in types if t is not None}, f"{row!r}: {cell!r} vs {types}"
            assert ("no error" in cell) == (None in types), f"{row!r}: {cell!r}: 'no error' iff a call raises none"
        aligned = all(t is not None and o is not None and issubclass(o, t) for _, t, o in calls)
        assert ("aligned" in ours_cell) == aligned, f"{row!r}: 'aligned' in {ours_cell!r} should be {aligned}"
