"""Adaptive gradient clipping (adaptive_clip_grad_, attach(agc=...)) against a
float64 unit-wise reference and a torch implementation of the same rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradclip
from conftest import (
    INF,
    NAN,
    NORM_IDS,
    NORM_ORDERS,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled,
    make_torch,
    norm_rtol,
    ref_norm,
)

# A row's coefficient is limit / ||g_row||; both norms carry the reference
# bound (conftest.norm_rtol), so the ratio carries at most twice that.


def coef_rtol(p: float) -> float:
    return 2 * norm_rtol(p) + 1e-15


def units(x: torch.Tensor) -> list:
    """The units of a tensor in torch layout: its rows, or the whole tensor when 0-d / 1-d."""
    # 0-d as a 1-element vector: conftest's expected_scaled wants arrays, not NumPy scalars.
    return [x.reshape(-1)] if x.dim() <= 1 else [x[r] for r in range(x.shape[0])]


def check_agc(param, grad_before, grad_after, clip_factor, eps, p) -> int:
    """Each row of grad_after must be grad_before's row scaled by
    min(clip_factor * max(||w_row||, eps) / ||g_row||, 1) (float64 reference
    norms), with the specified rounding. Returns the number of clipped rows."""
    clipped = 0
    for w_row, g0, g1 in zip(units(param.detach()), units(grad_before), units(grad_after)):
        limit = clip_factor * max(ref_norm([w_row], p), eps)
        gnorm = ref_norm([g0], p)
        # eps 0 in the rule: min(limit / gnorm, 1); a zero row stays.
        assert_scaled(g1, g0, limit, gnorm, rtol=coef_rtol(p), eps=0.0)
        clipped += gnorm > limit * (1 + coef_rtol(p))
    return clipped


def torch_agc_(parameters, clip_factor, eps, norm_type=2.0):
    """AGC written with torch ops (the widely used formulation), for comparison."""
    for p in parameters:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), norm_type, dim=dims, keepdim=True)
        g_norm = torch.linalg.vector_norm(p.grad, norm_type, dim=dims, keepdim=True)
        max_norm = w_norm.clamp(min=eps) * clip_factor
        clipped = p.grad * (max_norm / g_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(g_norm < max_norm, p.grad, clipped))


SHAPES = [(8, 3, 3, 3), (16, 33), (16,), (), (1, 5), (300, 17), (3, 40000)]  # last: rows span chunks


def make_params(dtype, seed=0, grad_scale=1.0):
    params = []
    for i, shape in enumerate(SHAPES):
        w = torch.nn.Parameter(make_torch(shape, dtype, seed + i, scale=0.1))
        w.grad = make_torch(shape, dtype, seed + 100 + i, scale=grad_scale)
        params.append(w)
    return params


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_agc_matches_float64_reference(dtype, p):
    params = make_params(dtype, grad_scale=0.02)
    before = [w.grad.clone() for w in params]
    record = gradclip.adaptive_clip_grad_(params, clip_factor=0.05, eps=1e-3, norm_type=p)
    clipped = sum(check_agc(w, g0, w.grad, 0.05, 1e-3, p) for w, g0 in zip(params, before))
    assert 0 < record.clipped_units and abs(record.clipped_units - clipped) <= 1  # a row at the limit may go either way
    assert_norm_close(record.total_norm, ref_norm(before, p), p, rtol=1e-9)
    for (name, norm), g0 in zip(record.tensor_norms().items(), before):
        assert_norm_close(norm, ref_norm([g0], p), p)


def test_agc_matches_torch_formulation():
    ours = make_params(torch.float32, seed=3, grad_scale=0.05)
    theirs = [torch.nn.Parameter(w.detach().clone()) for w in ours]
    for a, b in zip(ours, theirs):
        b.grad = a.grad.clone()
    gradclip.adaptive_clip_grad_(ours, 0.02, 1e-3)
    torch_agc_(theirs, 0.02, 1e-3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=1e-9)


def test_unclipped_rows_are_bitwise_untouched_and_zero_rows_stay_zero():
    w = torch.nn.Parameter(torch.zeros(4, 8))  # zero rows: the limit is clip_factor * eps
    w.grad = torch.zeros(4, 8)
    w.grad[1] = 1.0
    w.grad[2] = 1e-6
    before = w.grad.clone()
    gradclip.adaptive_clip_grad_([w], clip_factor=0.01, eps=1e-3)
    assert_bitwise_equal(w.grad[[0, 2, 3]], before[[0, 2, 3]])
    assert torch.linalg.vector_norm(w.grad[1]).item() == pytest.approx(1e-5, rel=1e-6)


def test_channels_last_weights_give_the_contiguous_result():
    a = make_params(torch.float32)[0]  # (8, 3, 3, 3)
    b = torch.nn.Parameter(a.detach().clone().to(memory_format=torch.channels_last))
    b.grad = a.grad.clone().to(memory_format=torch.channels_last)
    assert not b.is_contiguous()
    gradclip.adaptive_clip_grad_([a], 0.01)
    gradclip.adaptive_clip_grad_([b], 0.01)
    assert_bitwise_equal(b.grad, a.grad)


def test_rows_that_are_not_memory_blocks_are_refused_before_any_write():
    ok = torch.nn.Parameter(torch.ones(4, 5))
    ok.grad = torch.full((4, 5), 100.0)
    base = torch.randn(6, 4)
    transposed = torch.nn.Parameter(base.t())  # rows are strided
    transposed.grad = torch.randn(6, 4).t()
    before = ok.grad.clone()
    with pytest.raises(ValueError, match=r"parameters\[1\]\.grad: its rows \(first dimension, stride 1\) are not contiguous"):
        gradclip.adaptive_clip_grad_([ok, transposed], 0.01)
    assert_bitwise_equal(ok.grad, before)
    # A frozen parameter (no .grad) is not read at all, whatever its layout.
    frozen = torch.nn.Parameter(base.t())
    gradclip.adaptive_clip_grad_([ok, frozen], 0.01)
    assert torch.linalg.vector_norm(ok.grad[0]).item() == pytest.approx(0.01 * math.sqrt(5), rel=1e-6)


class ArrayWithGrad(np.ndarray):
    """A NumPy parameter with a .grad, to hand the native layer a mismatched pair
    (torch itself refuses to set a grad of another shape)."""


def test_gradient_of_another_shape_is_refused():
    w = np.ones((4, 6)).view(ArrayWithGrad)
    w.grad = np.ones((6, 4))
    with pytest.raises(ValueError, match=r"parameters\[0\]\.grad: 6 rows of 24 elements.*parameter has 4 rows"):
        gradclip.adaptive_clip_grad_([w], 0.01)


@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_clip_factor_must_be_positive_and_finite(bad):
    w = make_params(torch.float32)[2]
    with pytest.raises(ValueError, match="agc must be > 0 and finite"):
        gradclip.adaptive_clip_grad_([w], clip_factor=bad)


def test_nonfinite_policies():
    def fresh():
        ps = make_params(torch.float32, grad_scale=0.05)[:3]
        ps[1].grad[2, 5] = NAN
        return ps

    ps = fresh()
    gradclip.adaptive_clip_grad_(ps, 0.01)  # propagate: the NaN row becomes NaN, others clipped
    assert torch.isnan(ps[1].grad[2]).all() and not torch.isnan(ps[1].grad[3]).any()

    ps = fresh()
    before = [p.grad.clone() for p in ps]
    record = gradclip.adaptive_clip_grad_(ps, 0.01, nonfinite="skip")
    assert record.skipped and not record.clipped and record.nonfinite_tensors == 1
    for p, g0 in zip(ps, before):
        torch.testing.assert_close(p.grad, g0, rtol=0, atol=0, equal_nan=True)

    ps = fresh()
    with pytest.raises(gradclip.NonfiniteGradientError, match=r"parameters\[1\]"):
        gradclip.adaptive_clip_grad_(ps, 0.01, nonfinite="error")

    ps = fresh()
    before = [p.grad.clone() for p in ps]
    record = gradclip.adaptive_clip_grad_(ps, 0.01, nonfinite="zero")
    assert record.zeroed_elements == 1 and not torch.isnan(ps[1].grad).any()
    before[1][2, 5] = 0.0
    for p, g0 in zip(ps, before):
        check_agc(p, g0, p.grad, 0.01, 1e-3, 2.0)


def test_attach_agc_with_group_factors_and_an_unclipped_output_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 20), torch.nn.Linear(20, 4))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "agc": 0.1},
            {"params": model[3].parameters(), "agc": None},  # NFNets leave the classifier unclipped
        ],
        lr=0.0,
    )
    handle = gradclip.attach(opt, agc=0.01, named_parameters=model)
    (model(torch.randn(8, 10)).pow(2).sum() * 100).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        if name.startswith("3."):
            assert_bitwise_equal(p.grad, before[name])
        else:
            check_agc(p, before[name], p.grad, 0.01 if name.startswith("0.") else 0.1, 1e-3, 2.0)
    assert set(handle.last.tensor_norms()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert handle.last.clipped_units > 0


def test_a_parameter_listed_twice_is_clipped_once():
    once, twice = make_params(torch.float32, seed=7)[:2], make_params(torch.float32, seed=7)[:2]
    gradclip.adaptive_clip_grad_(once, 0.01)
    record = gradclip.adaptive_clip_grad_([twice[0], twice[1], twice[0]], 0.01)
    for a, b in zip(once, twice):
        assert_bitwise_equal(b.grad, a.grad)
    assert len(record.tensor_norms()) == 3  # one entry per list item, the repeat included
