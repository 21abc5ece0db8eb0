"""attach(..., measure_in_backward=True): norms read during backward by
post-accumulate-grad hooks give the same training as the plain clip, and a
measurement that is no longer true is never used."""

from __future__ import annotations

import copy

import pytest
import torch

import gradclip
from gradclip.training import backward_norms

BIG = backward_norms.MIN_ELEMENTS  # a Linear(256, 128) weight has exactly 32768 elements


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # Two weights large enough to be hooked, biases and a small layer read at the step.
    m = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 512),
                            torch.nn.Tanh(), torch.nn.Linear(512, 3))
    return m.to(dtype)


def batch(step, dtype):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 256, generator=g).to(dtype)


def test_the_large_parameters_are_hooked():
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    handle = gradclip.attach(opt, global_clipnorm=1.0, measure_in_backward=True)
    assert handle._backward_norms.hooked == sum(p.numel() >= BIG for p in m.parameters()) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_training_equals_the_folded_clip_read_at_the_step(dtype, accumulate):
    plain, early = model(dtype), model(dtype)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True)
    opt_early = torch.optim.AdamW(early.parameters(), lr=1e-2, fused=True)
    h_plain = gradclip.attach(opt_plain, global_clipnorm=0.5, fold=True)  # bf16 folds only when asked
    h_early = gradclip.attach(opt_early, global_clipnorm=0.5, measure_in_backward=True)
    used = 0
    for step in range(20):
        for micro in range(accumulate):
            for m in (plain, early):
                (m(batch(step * 7 + micro, dtype)) * 10).square().mean().backward()
        # The measurements about to be used are of the final (accumulated) gradients.
        used += len(h_early._backward_norms._measured)
        opt_plain.step()
        opt_early.step()
        opt_plain.zero_grad()
        opt_early.zero_grad()
        a, b = h_plain.last, h_early.last
        assert b.total_norm == pytest.approx(a.total_norm, rel=1e-12)
        assert b.clip_coef == pytest.approx(a.clip_coef, rel=1e-12) and a.clipped and b.clipped
        assert b.tensor_norms() == pytest.approx(a.tensor_norms(), rel=1e-12)
    assert used == 2 * 20
    for p, q in zip(plain.parameters(), early.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_a_gradient_changed_after_backward_is_read_again():
    m = model()
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, fused=True)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, fused=True)
    h = gradclip.attach(opt, global_clipnorm=0.5, measure_in_backward=True)
    h_ref = gradclip.attach(opt_ref, global_clipnorm=0.5)
    for mm in (m, ref):
        mm(batch(0, torch.float32)).square().mean().backward()
    big = m[0].weight
    big.grad.mul_(4.0)  # in place after the hook measured it (as an all-reduce or unscale_ would)
    ref[0].weight.grad.mul_(4.0)
    m[2].weight.grad = m[2].weight.grad * 2.0  # a replaced gradient
    ref[2].weight.grad = ref[2].weight.grad * 2.0
    opt.step()
    opt_ref.step()
    assert h.last.total_norm == pytest.approx(h_ref.last.total_norm, rel=1e-12)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_a_step_without_a_new_backward_reads_the_gradients_itself():
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, fused=True)
    h = gradclip.attach(opt, global_clipnorm=1e9, measure_in_backward=True)
    m(batch(0, torch.float32)).square().mean().backward()
    opt.step()
    first = h.last.total_norm
    assert h._backward_norms._measured == {}  # used up
    opt.step()  # the same gradients (not clipped: the limit is huge), read at the step this time
    assert h.last.total_norm == pytest.approx(first, rel=1e-12)


def test_nonfinite_gradients_measured_in_backward_follow_the_policy():
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    gradclip.attach(opt, global_clipnorm=1.0, nonfinite="error", measure_in_backward=True,
                    named_parameters=m.named_parameters())
    (m(batch(1, torch.float32)) * float("nan")).sum().backward()  # NaN gradients, measured by the hooks
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(gradclip.NonfiniteGradientError, match="0.weight"):
        opt.step()
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


def test_refused_where_nothing_folds_and_with_zero():
    m = model()
    with pytest.raises(ValueError, match="measure_in_backward=True.*fused=True"):
        gradclip.attach(torch.optim.SGD(m.parameters(), lr=0.1), global_clipnorm=1.0, measure_in_backward=True)
    with pytest.raises(ValueError, match="nonfinite='zero'"):
        gradclip.attach(torch.optim.SGD(m.parameters(), lr=0.1, fused=True), global_clipnorm=1.0,
                        nonfinite="zero", measure_in_backward=True)
    # Over a process group the norm is combined at the step: local measurements cannot be.
    with pytest.raises(ValueError, match="measure_in_backward: with process_group= the norm is combined"):
        gradclip.attach(torch.optim.SGD(m.parameters(), lr=0.1, fused=True), global_clipnorm=1.0,
                        process_group=object(), measure_in_backward=True)
    # True, False, or the DistributedDataParallel model whose buckets are measured.
    with pytest.raises(TypeError, match="measure_in_backward: expected True, False or a torch "
                                        "DistributedDataParallel model, got Sequential"):
        gradclip.attach(torch.optim.SGD(m.parameters(), lr=0.1, fused=True), global_clipnorm=1.0,
                        measure_in_backward=m)


def test_remove_takes_the_hooks_away():
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    h = gradclip.attach(opt, global_clipnorm=1.0, measure_in_backward=True)
    h.remove()
    m(batch(0, torch.float32)).square().mean().backward()
    assert h._backward_norms._measured == {}


def test_refused_and_unused_among_several_ranks(monkeypatch):
    import torch.distributed as dist

    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    h = gradclip.attach(opt, global_clipnorm=0.5, measure_in_backward=True)
    m(batch(0, torch.float32)).square().mean().backward()
    assert h._backward_norms._measured
    # A process group of two ranks appears, and a gradient changes the way an all-reduce changes it:
    # in place, through .data, which leaves the version counter alone.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    big = m[0].weight
    version = big.grad._version
    big.grad.data.mul_(3.0)
    assert big.grad._version == version  # unseen by the version check
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]))
    opt.step()
    assert h.last.total_norm == pytest.approx(expected, rel=1e-6)  # read at the step, not the measurement
    with pytest.raises(ValueError, match="one of several ranks"):
        gradclip.attach(torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True), global_clipnorm=0.5,
                        measure_in_backward=True)
