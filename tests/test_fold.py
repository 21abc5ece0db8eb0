"""attach() on torch's fused optimizers: the clip coefficient is handed to the
fused step as its grad_scale (one read pass for the norm, no rewrite of the
gradients), composed with a GradScaler's scale. Parameters after 20 steps must
equal "clip, then step" with torch's own clip, to rounding."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import gradclip
from gradclip.training import hook

STEPS = 20
OPTIMIZERS = {
    "Adam": (torch.optim.Adam, dict(lr=1e-2)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "SGD": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=1e-2)),
}
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch):
    """Run a test on both folded paths: 'host' (CPU: the numbers come to Python) and
    'device' (what CUDA gradients take: the norm, grad_scale and found_inf stay
    tensors, no host sync), the latter forced onto CPU tensors."""
    if request.param == "device":
        monkeypatch.setattr(hook, "_DEVICE_TYPES", ("cuda", "cpu"))
    return request.param


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def _loss(model, step):
    dtype = next(model.parameters()).dtype
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
    return model(x).float().square().sum() * (1 + step)


def _assert_params_close(a_model, b_model, dtype):
    for a, b in zip(a_model.parameters(), b_model.parameters()):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_folded_clip_equals_clip_then_step(name, dtype, path):
    cls, kwargs = OPTIMIZERS[name]
    ours, ref = _model(dtype), _model(dtype)
    opt = cls(ours.parameters(), fused=True, **kwargs)
    ref_opt = cls(ref.parameters(), fused=True, **kwargs)
    handle = gradclip.attach(opt, global_clipnorm=0.05, fold=True)  # bf16 on the CPU: not the default
    assert handle.fold
    for step in range(STEPS):
        opt.zero_grad()
        _loss(ours, step).backward()
        opt.step()
        ref_opt.zero_grad()
        _loss(ref, step).backward()
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        # torch rounds 16-bit per-tensor norms to 16 bits (README, differences): 3e-2 for bf16
        assert handle.last.total_norm == pytest.approx(float(ref_total), rel=3e-2 if dtype == torch.bfloat16 else 1e-5)
        assert handle.last.clipped
        # The fused step divides the gradients by the folded scale and writes
        # them back: after step() they read as the clipped gradients.
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, **TOLERANCE[dtype])
        # Nothing left behind: absent stays absent (GradScaler multiplies by
        # getattr(opt, "grad_scale", 1), which None would break).
        assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    _assert_params_close(ours, ref, dtype)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_folded_clip_composes_with_grad_scaler(name, path):
    cls, kwargs = OPTIMIZERS[name]
    ours, ref = _model(), _model()
    opt = cls(ours.parameters(), fused=True, **kwargs)
    ref_opt = cls(ref.parameters(), fused=True, **kwargs)
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = gradclip.attach(opt, global_clipnorm=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        scaler.scale(_loss(ours, step)).backward()
        scaler.step(opt)  # the scaler hands its scale to the fused step; attach folds the coefficient into it
        scaler.update()
        ref_opt.zero_grad()
        ref_scaler.scale(_loss(ref, step)).backward()
        ref_scaler.unscale_(ref_opt)
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        assert handle.last.total_norm == pytest.approx(float(ref_total), rel=1e-5)
        norms = handle.last.tensor_norms()
        assert sum(v * v for v in norms.values()) ** 0.5 == pytest.approx(float(ref_total), rel=1e-5)
    _assert_params_close(ours, ref, torch.float32)


def test_per_group_limits_and_fold_false_clip_as_before():
    for make in (lambda opt: gradclip.attach(opt, global_clipnorm=0.05, fold=False),
                 lambda opt: gradclip.attach(opt, global_clipnorm=0.05)):
        ours, ref = _model(), _model()
        groups = [{"params": ours[0].parameters()}, {"params": ours[2].parameters(), "global_clipnorm": 0.02}]
        opt = torch.optim.AdamW(groups, lr=1e-2, fused=True)
        ref_opt = torch.optim.AdamW([{"params": ref[0].parameters()}, {"params": ref[2].parameters()}], lr=1e-2,
                                    fused=True)
        make(opt)
        for step in range(5):
            opt.zero_grad()
            _loss(ours, step).backward()
            opt.step()
            ref_opt.zero_grad()
            _loss(ref, step).backward()
            torch.nn.utils.clip_grad_norm_(ref[0].parameters(), 0.05)
            torch.nn.utils.clip_grad_norm_(ref[2].parameters(), 0.02)
            ref_opt.step()
        _assert_params_close(ours, ref, torch.float32)


def test_fold_needs_a_fused_optimizer():
    model = _model()
    with pytest.raises(ValueError, match="fold=True: the coefficient can be folded only into a fused"):
        gradclip.attach(torch.optim.AdamW(model.parameters(), lr=1e-2), global_clipnorm=1.0, fold=True)
    assert not gradclip.attach(torch.optim.AdamW(model.parameters(), lr=1e-2), global_clipnorm=1.0).fold


def test_fold_is_the_default_where_it_is_faster():
    # torch's fused CPU step with a grad_scale is slower for bfloat16 than a rewrite first.
    for dtype, folds in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False)):
        opt = torch.optim.AdamW(_model(dtype).parameters(), lr=1e-2, fused=True)
        assert gradclip.attach(opt, global_clipnorm=1.0).fold is folds, dtype
    # Measuring in backward needs the fold, so it asks for it.
    opt = torch.optim.AdamW(_model(torch.bfloat16).parameters(), lr=1e-2, fused=True)
    assert gradclip.attach(opt, global_clipnorm=1.0, measure_in_backward=True).fold


@pytest.mark.parametrize("policy", ["skip", "error", "zero"])
def test_folded_nonfinite_policies(policy):
    ours, ref = _model(), _model()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    handle = gradclip.attach(opt, global_clipnorm=0.05, nonfinite=policy)
    _loss(ours, 0).backward()
    _loss(ref, 0).backward()
    ours[0].weight.grad[0, 0] = float("nan")
    ref[0].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in ours.parameters()]
    if policy == "error":
        with pytest.raises(gradclip.NonfiniteGradientError):
            opt.step()
    else:
        opt.step()
    if policy in ("skip", "error"):
        for a, b in zip(ours.parameters(), before):
            assert torch.equal(a, b)
        assert policy == "error" or handle.last.skipped
    else:  # the NaN is zeroed, then the rest is clipped and folded
        ref[0].weight.grad[0, 0] = 0.0
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        assert handle.last.zeroed_elements == 1
        _assert_params_close(ours, ref, torch.float32)


# What makes a device tensor's value travel to the host (a sync on CUDA).
_HOST_READS = {"__float__", "__bool__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"}


class _HostReads(TorchFunctionMode):
    """Records every torch call that would read a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", ["propagate", "skip"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
def test_device_path_reads_nothing_back(monkeypatch, policy, scaled):
    """The folded clip on CUDA gradients must not wait for the device: no tensor value
    is read on the host from the pre-hook to the end of the fused step, with or without
    a GradScaler (whose found_inf the host path reads). The record is made when read."""
    monkeypatch.setattr(hook, "_DEVICE_TYPES", ("cuda", "cpu"))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    handle = gradclip.attach(opt, global_clipnorm=0.05, nonfinite=policy)
    for step in range(3):
        opt.zero_grad()
        loss = _loss(model, step)
        (scaler.scale(loss) if scaled else loss).backward()
        if scaled:
            scaler.unscale_(opt) if step == 2 else None  # also once with the scale already divided out
        reads = _HostReads()
        with reads:
            if scaled:
                scaler.step(opt)
            else:
                opt.step()
        assert reads.seen == [], (step, reads.seen)
        assert handle._pending is not None
        if scaled:
            scaler.update()
        record = handle.last  # made now
        assert handle._pending is None
        assert record.step == step and record.clipped and not record.skipped
        assert record.total_norm == pytest.approx(
            sum(v * v for v in record.tensor_norms().values()) ** 0.5, rel=1e-6)


def test_a_planted_host_read_is_seen():
    """The check above can fail: a float() of a tensor inside the step is recorded."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    opt.register_step_pre_hook(lambda o, a, k: [float(next(model.parameters()).grad.sum())] and None)
    _loss(model, 0).backward()
    reads = _HostReads()
    with reads:
        opt.step()
    assert reads.seen == ["__float__"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_device_path_skip_leaves_parameters_and_state_alone(monkeypatch, name):
    """'skip' on the device path: a nonfinite total sets the fused step's found_inf,
    which leaves every parameter and its optimizer state (step counts, moments) as
    they were; the next finite step goes on as if the skipped one never ran, as on
    the host path, which cancels the step."""
    monkeypatch.setattr(hook, "_DEVICE_TYPES", ("cuda", "cpu"))
    cls, kwargs = OPTIMIZERS[name]
    ours, ref = _model(), _model()
    opt = cls(ours.parameters(), fused=True, **kwargs)
    ref_opt = cls(ref.parameters(), fused=True, **kwargs)
    handle = gradclip.attach(opt, global_clipnorm=0.05, nonfinite="skip")
    for step in range(6):
        opt.zero_grad()
        _loss(ours, step).backward()
        bad = step in (0, 3)  # skipped on the first step (made state or not) and on a later one
        if bad:
            ours[2].bias.grad[1] = float("inf")
            before = [p.detach().clone() for p in ours.parameters()]
            state = {k: v.clone() for p in ours.parameters() for k, v in opt.state[p].items()
                     if isinstance(v, torch.Tensor)} if step else {}
        opt.step()
        # SGD decides on the host until a step has made its momentum buffers (the
        # skipped first one did not: the second); the others' state is zeroed before
        # their kernel, or made at once.
        assert (handle._pending is not None) == (step > 1 or name != "SGD")
        assert handle.last.skipped == bad and handle.last.nonfinite_tensors == int(bad)
        assert getattr(opt, "found_inf", None) is None
        if bad:
            assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), before))
            after = {k: v for p in ours.parameters() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            assert all(torch.equal(after[k], v) for k, v in state.items())
            continue
        ref_opt.zero_grad()
        _loss(ref, step).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
    _assert_params_close(ours, ref, torch.float32)


def test_device_path_takes_a_scalers_one_element_tensors(monkeypatch):
    """ShardedGradScaler's found_inf has shape (1,); what a scaler set is put back as it was."""
    monkeypatch.setattr(hook, "_DEVICE_TYPES", ("cuda", "cpu"))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    handle = gradclip.attach(opt, global_clipnorm=0.05, nonfinite="skip")
    for step in range(2):
        opt.zero_grad()
        _loss(model, step).backward()
        scale, found = torch.full((1,), 4.0), torch.zeros(1)
        for p in model.parameters():
            p.grad.mul_(4.0)  # as scaled by the scaler
        opt.grad_scale, opt.found_inf = scale, found
        opt.step()
        assert opt.grad_scale is scale and opt.found_inf is found
        assert handle.last.clipped and not handle.last.skipped
        del opt.grad_scale, opt.found_inf
