"""GradBuffer: gradients as views of one flat tensor per (device, dtype). Training
with it gives the plain clip's results; it survives every way of zeroing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gradclip
from conftest import bits

DTYPE_TOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # Odd sizes: views start on 64-byte boundaries, so the flat tensor has padding to keep zero.
    m = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 7),
                            torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    return m.to(dtype)


def loss(m, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 13, generator=g).to(dtype)
    return (m(x) * 40).square().sum()  # large enough gradients that every step clips


def test_every_grad_is_a_view_of_the_flat_tensor():
    m = model()
    buf = gradclip.GradBuffer(m.parameters())
    (flat,) = buf.flat
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for p in m.parameters():
        assert start <= p.grad.data_ptr() < end and p.grad.shape == p.shape
        assert p.grad.data_ptr() % 64 == 0
    assert len(buf) == len(list(m.parameters())) and flat.abs().sum() == 0


def test_parameters_are_grouped_by_dtype_and_existing_grads_kept():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    a.grad = torch.arange(5.0)
    buf = gradclip.GradBuffer([a, b, frozen])
    assert [f.dtype for f in buf.flat] == [torch.float32, torch.float64]
    assert torch.equal(a.grad, torch.arange(5.0)) and torch.equal(b.grad, torch.zeros(3, dtype=torch.float64))
    assert frozen.grad is None and len(buf) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zeroing", ["buffer", "set_to_none=False"])
def test_training_equals_the_plain_clip(dtype, zeroing):
    steps = 20
    plain, buffered = model(dtype), model(dtype)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_buf = torch.optim.SGD(buffered.parameters(), lr=1e-3, momentum=0.9)
    buf = gradclip.GradBuffer(buffered.parameters())
    for step in range(steps):
        loss(plain, step, dtype).backward()
        total_plain = gradclip.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad()
        loss(buffered, step, dtype).backward()
        total_buf = buf.clip_grad_norm_(1.0)
        opt_buf.step()
        buf.zero_grad() if zeroing == "buffer" else opt_buf.zero_grad(set_to_none=False)
        assert total_buf.dtype == total_plain.dtype and total_buf.shape == ()
        # One span sums in another order than the per-tensor list: equal to float64 rounding,
        # then the float32 result (16-bit inputs: their products round in the dtype each step).
        assert float(total_buf) == pytest.approx(float(total_plain), rel=1e-6)
        assert float(total_plain) > 1.0  # every step clips
    for p, q in zip(plain.parameters(), buffered.parameters()):
        torch.testing.assert_close(q, p, rtol=DTYPE_TOL[dtype], atol=DTYPE_TOL[dtype])
    assert buf.repairs == 0


def test_set_to_none_and_reassigned_grads_are_brought_back():
    plain, buffered = model(), model()
    buf = gradclip.GradBuffer(buffered.parameters())
    opt = torch.optim.SGD(buffered.parameters(), lr=1e-2)
    loss(buffered, 0, torch.float32).backward()
    buf.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()  # set_to_none=True: every view dropped
    assert all(p.grad is None for p in buffered.parameters())
    loss(buffered, 1, torch.float32).backward()  # fresh gradients, outside the buffer
    expected = [p.grad.clone() for p in buffered.parameters()]
    with pytest.warns(UserWarning, match="made outside the buffer"):
        total = buf.clip_grad_norm_(1e9)  # nothing to clip: the norm of the fresh gradients
    assert float(total) == pytest.approx(float(torch.linalg.vector_norm(torch.cat([e.flatten() for e in expected]))),
                                         rel=1e-6)
    (flat,) = buf.flat
    for p, e in zip(buffered.parameters(), expected):
        assert torch.equal(p.grad, e)
        assert flat.data_ptr() <= p.grad.data_ptr() < flat.data_ptr() + flat.numel() * 4  # a view again
    assert buf.repairs == len(expected)
    # A second time warns no more; a reassigned .grad is copied in too.
    first = next(buffered.parameters())
    first.grad = torch.full_like(first, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf.get_total_norm()
    assert torch.equal(first.grad, torch.full_like(first, 2.0)) and buf.repairs == len(expected) + 1
    del plain


def test_a_parameter_without_gradient_adds_nothing_and_stays_without():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    buf = gradclip.GradBuffer([a, b])
    a.grad.fill_(3.0)
    b.grad.fill_(5.0)
    b.grad = None  # as zero_grad(set_to_none=True) leaves a parameter no loss reached
    assert float(buf.get_total_norm()) == pytest.approx(6.0)  # |(3,3,3,3)|: b's old 5s are gone
    assert b.grad is None
    buf.zero_grad()
    assert torch.equal(b.grad, torch.zeros(3))  # zero_grad binds every view again


def test_bad_parameters_and_mismatched_gradients_are_refused_with_their_index():
    with pytest.raises(TypeError, match=r"parameters\[1\]: a GradBuffer holds dense floating-point"):
        gradclip.GradBuffer([torch.nn.Parameter(torch.zeros(2)), torch.zeros(2, dtype=torch.complex64,
                                                                             requires_grad=True)])
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    buf = gradclip.GradBuffer([a, b])
    b.grad_dtype = None  # torch then accepts a gradient of another dtype, which the buffer cannot hold
    b.grad = torch.ones(3, dtype=torch.float64)
    a.grad.fill_(1.0)
    with pytest.raises(ValueError, match=r"parameters\[1\]\.grad is torch.float64"):
        buf.clip_grad_norm_(0.1)
    assert torch.equal(a.grad, torch.ones(4))  # nothing scaled


def test_value_clip_and_nonfinite_error_follow_torch():
    m, ref = model(), model()
    buf = gradclip.GradBuffer(m.parameters())
    loss(m, 3, torch.float32).backward()
    loss(ref, 3, torch.float32).backward()
    buf.clip_grad_value_(0.5)
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.5)
    for p, q in zip(m.parameters(), ref.parameters()):
        assert (bits(p.grad) == bits(q.grad)).all()
    first = next(m.parameters())
    first.grad[0, 0] = float("nan")
    before = [p.grad.clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="non-finite"):
        buf.clip_grad_norm_(1e-3, error_if_nonfinite=True)
    for p, b in zip(m.parameters(), before):
        assert (bits(p.grad) == bits(b)).all()  # nothing written before the error
    with pytest.raises(ValueError, match="max_norm"):
        buf.clip_grad_norm_(-1.0)


def test_padding_stays_zero_and_fused_adamw_steps_through_views():
    m = model()
    ref = copy.deepcopy(m)
    buf = gradclip.GradBuffer(m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    for step in range(5):
        loss(m, step, torch.float32).backward()
        loss(ref, step, torch.float32).backward()
        buf.clip_grad_norm_(0.5)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt_ref.step()
        buf.zero_grad()
        opt_ref.zero_grad()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    (flat,) = buf.flat
    assert flat.abs().sum() == 0  # zeroed, padding included
