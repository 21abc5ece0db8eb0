"""gradclip.attach / clip_gradients_: the optimizer hook, Keras-style limit
options, per-group limits, nonfinite policies, GradScaler and set_to_none, and
the monitoring records. Checked against the float64 reference and torch."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import gradclip
from conftest import INF, NAN, assert_bitwise_equal, assert_norm_close, assert_scaled, ref_coef, ref_norm
from gradclip import _core

RTOL = 1e-12  # gradclip norms vs the float64 reference (lists here are small; see conftest)


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    )


def backward(model: torch.nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=g)
    (model(x).pow(2).sum() * scale).backward()


def grads_of(model) -> list:
    return [p.grad.clone() for p in model.parameters()]


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def test_global_clipnorm_training_matches_torch_clip_grad_norm():
    ours, theirs = small_model(), small_model()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    handle = gradclip.attach(opt_a, global_clipnorm=0.5)
    for step in range(5):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            backward(model, seed=step, scale=10.0)
        expected_total = ref_norm([p.grad for p in ours.parameters()], 2.0)
        torch_total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        opt_a.step()
        opt_b.step()
        assert_norm_close(handle.last.total_norm, expected_total, 2.0)
        assert handle.last.total_norm == pytest.approx(float(torch_total), rel=1e-5)
        assert handle.last.clip_coef == pytest.approx(ref_coef(0.5, expected_total), rel=1e-12)
        assert handle.last.clipped and handle.last.step == step
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clipnorm_clips_each_tensor_on_its_own():
    model = small_model()
    backward(model, scale=3.0)
    before = grads_of(model)
    record = gradclip.clip_gradients_(model.parameters(), clipnorm=0.7, norm_type=3.0)
    for g0, p in zip(before, model.parameters()):
        n = ref_norm([g0], 3.0)
        assert_scaled(p.grad, g0, 0.7, n, rtol=RTOL)
    coefs = [ref_coef(0.7, ref_norm([g], 3.0)) for g in before]
    assert record.clip_coef == pytest.approx(min(coefs), rel=1e-12)
    assert_norm_close(record.total_norm, ref_norm(before, 3.0), 3.0)


def test_clipvalue_is_bitwise_torch_clip_grad_value():
    a, b = small_model(), small_model()
    backward(a, scale=5.0)
    backward(b, scale=5.0)
    record = gradclip.clip_gradients_(a.parameters(), clipvalue=0.3)
    torch.nn.utils.clip_grad_value_(b.parameters(), 0.3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_bitwise_equal(pa.grad, pb.grad)
    assert record.clipped and math.isnan(record.clip_coef)


def test_no_option_only_measures():
    model = small_model()
    backward(model)
    before = grads_of(model)
    record = gradclip.clip_gradients_(model.parameters(), named_parameters=model.named_parameters())
    assert not record.clipped and record.clip_coef == 1.0
    for g0, p in zip(before, model.parameters()):
        assert_bitwise_equal(p.grad, g0)
    assert set(record.tensor_norms()) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize(
    "kwargs",
    [dict(global_clipnorm=1.0, clipnorm=1.0), dict(clipnorm=1.0, clipvalue=1.0), dict(clipvalue=1.0, agc=0.01)],
)
def test_only_one_limit_option_as_keras_enforces(kwargs):
    opt = torch.optim.SGD(small_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"Only one of `global_clipnorm`, `clipnorm`, `clipvalue` and `agc`"):
        gradclip.attach(opt, **kwargs)
    assert "step" not in opt.__dict__ and not opt._optimizer_step_pre_hooks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_clipnorm=-1.0), "global_clipnorm must be >= 0"),
        (dict(clipvalue=NAN), "clipvalue must be >= 0"),
        (dict(agc=0.0), "agc must be > 0"),
        (dict(global_clipnorm=1.0, norm_type=0), "norm_type must be > 0"),
        (dict(global_clipnorm=1.0, nonfinite="ignore"), "nonfinite must be one of"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    opt = torch.optim.SGD(small_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        gradclip.attach(opt, **kwargs)


# --------------------------------------------------------------------------
# Per-group limits
# --------------------------------------------------------------------------


def grouped_optimizer(model, **head_options):
    body = list(model[0].parameters()) + list(model[2].parameters())
    return torch.optim.SGD([{"params": body}, {"params": model[4].parameters(), **head_options}], lr=0.0)


def test_group_limit_is_honoured_in_one_fused_call(monkeypatch):
    model = small_model()
    opt = grouped_optimizer(model, global_clipnorm=2.0)
    gradclip.attach(opt, global_clipnorm=0.1)
    calls = []
    real_clip = _core.clip
    monkeypatch.setattr(_core, "clip", lambda *a, **k: calls.append(1) or real_clip(*a, **k))
    backward(model, scale=4.0)
    body_before = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    head_before = [p.grad.clone() for p in opt.param_groups[1]["params"]]
    opt.step()
    assert len(calls) == 1
    # The body is clipped as one (joint norm, default limit), the head on its own.
    body_norm, head_norm = ref_norm(body_before, 2.0), ref_norm(head_before, 2.0)
    assert ref_coef(0.1, body_norm) < 1 and ref_coef(2.0, head_norm) < 1
    for g0, p in zip(body_before, opt.param_groups[0]["params"]):
        assert_scaled(p.grad, g0, 0.1, body_norm, rtol=RTOL)
    for g0, p in zip(head_before, opt.param_groups[1]["params"]):
        assert_scaled(p.grad, g0, 2.0, head_norm, rtol=RTOL)


def test_group_limit_none_leaves_the_group_unclipped_but_measured():
    model = small_model()
    opt = grouped_optimizer(model, global_clipnorm=None)
    handle = gradclip.attach(opt, global_clipnorm=0.01, named_parameters=model.named_parameters())
    backward(model)
    head_before = [p.grad.clone() for p in opt.param_groups[1]["params"]]
    opt.step()
    for g0, p in zip(head_before, opt.param_groups[1]["params"]):
        assert_bitwise_equal(p.grad, g0)
    assert "4.weight" in handle.last.tensor_norms()


def test_group_limits_are_read_every_step():
    model = small_model()
    opt = grouped_optimizer(model, clipvalue=1e-3)
    gradclip.attach(opt, clipvalue=10.0)
    backward(model)
    opt.step()
    # The bound is rounded to float32 first, as torch's clamp does.
    assert max(float(p.grad.abs().max()) for p in opt.param_groups[1]["params"]) == float(np.float32(1e-3))
    opt.param_groups[1]["clipvalue"] = 1e-5  # e.g. a schedule
    opt.step()
    assert max(float(p.grad.abs().max()) for p in opt.param_groups[1]["params"]) == float(np.float32(1e-5))
    assert max(float(p.grad.abs().max()) for p in opt.param_groups[0]["params"]) < 10.0


def test_bad_group_limit_names_the_group_and_writes_nothing():
    model = small_model()
    opt = grouped_optimizer(model, clipnorm=-2.0)
    gradclip.attach(opt, clipnorm=0.01)
    backward(model)
    before = grads_of(model)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['clipnorm'\] must be >= 0"):
        opt.step()
    for g0, p in zip(before, model.parameters()):
        assert_bitwise_equal(p.grad, g0)


def test_group_added_after_attach_is_clipped():
    model = small_model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.0)
    handle = gradclip.attach(opt, global_clipnorm=1e-3)
    opt.add_param_group({"params": model[4].parameters()})
    backward(model)
    opt.step()
    assert ref_norm([p.grad for g in opt.param_groups for p in g["params"]], 2.0) <= 1e-3 * (1 + 1e-6)
    assert len(handle.last.tensor_norms()) == 4


# --------------------------------------------------------------------------
# The hook in a training loop: set_to_none, GradScaler, schedulers, removal
# --------------------------------------------------------------------------


def test_zero_grad_set_to_none_and_frozen_parameters():
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle = gradclip.attach(opt, global_clipnorm=1.0, named_parameters=model.named_parameters())
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradient at all: nothing to clip, nothing raised
    assert handle.last.total_norm == 0.0 and handle.last.tensor_norms() == {}
    for p in model[0].parameters():
        p.requires_grad_(False)
    backward(model)
    opt.step()
    assert set(handle.last.tensor_norms()) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_hook_sees_unscaled_gradients_and_inf_steps_are_skipped():
    scaled_model, plain = small_model(), small_model()
    opt = torch.optim.SGD(scaled_model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    seen = []
    gradclip.attach(opt, global_clipnorm=0.5, nonfinite="error", on_step=seen.append)

    scaler.scale(scaled_model(torch.ones(2, 6)).pow(2).sum()).backward()
    plain(torch.ones(2, 6)).pow(2).sum().backward()
    true_norm = ref_norm([p.grad for p in plain.parameters()], 2.0)
    scaler.step(opt)  # unscales, then optimizer.step() runs the hook
    scaler.update()
    assert len(seen) == 1
    assert_norm_close(seen[0].total_norm, true_norm, 2.0)  # powers of two: unscaling is exact

    opt.zero_grad()
    scaler.scale(scaled_model(torch.ones(2, 6)).pow(2).sum()).backward()
    next(scaled_model.parameters()).grad[0, 0] = INF
    before = [p.detach().clone() for p in scaled_model.parameters()]
    scaler.step(opt)  # infs found: the scaler skips optimizer.step, so the hook never runs (and never raises)
    scaler.update()
    assert len(seen) == 1 and scaler.get_scale() == 2.0**11
    for b, p in zip(before, scaled_model.parameters()):
        assert_bitwise_equal(p.detach(), b)


def test_fused_optimizer_under_grad_scaler_without_folding_needs_unscale_first():
    # With fold=False the clip rewrites the gradients before the step, so they
    # must be unscaled first (with folding, the default, the scales compose:
    # tests/test_fold.py).
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = gradclip.attach(opt, global_clipnorm=0.5, fold=False)
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    with pytest.raises(RuntimeError, match=r"call scaler.unscale_\(optimizer\) before scaler.step"):
        scaler.step(opt)  # a fused optimizer would unscale inside its step, after the clip

    model, plain = small_model(), small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = gradclip.attach(opt, global_clipnorm=0.5)
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    plain(torch.ones(2, 6)).sum().backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    assert_norm_close(handle.last.total_norm, ref_norm([p.grad for p in plain.parameters()], 2.0), 2.0)


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_lr_scheduler_wrapping_in_either_order(scheduler_first):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if scheduler_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        handle = gradclip.attach(opt, global_clipnorm=1.0)
    else:
        handle = gradclip.attach(opt, global_clipnorm=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    backward(model)
    opt.step()
    sched.step()  # warnings are errors: no "scheduler.step() before optimizer.step()" warning
    assert handle.last.step == 0 and opt.param_groups[0]["lr"] == 0.05
    handle.remove()
    opt.step()
    sched.step()


def test_remove_restores_step_and_stops_clipping():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradclip.attach(opt, global_clipnorm=1e-6) as handle:
        assert "step" in opt.__dict__
    assert "step" not in opt.__dict__ and not opt._optimizer_step_pre_hooks
    backward(model)
    before = grads_of(model)
    opt.step()
    for g0, p in zip(before, model.parameters()):
        assert_bitwise_equal(p.grad, g0)
    assert handle.last is None
    handle.remove()  # twice is fine


@pytest.mark.parametrize("as_keyword", [False, True], ids=["positional", "keyword"])
def test_step_with_a_closure_runs_it_then_clips_then_steps(as_keyword):
    # Lightning's automatic optimisation always passes a closure (as a keyword):
    # it computes the gradients, so it runs first, then the clip, then the step,
    # and step returns its loss, as torch's optimizers do.
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    ours, ref = small_model(), small_model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    handle = gradclip.attach(opt, global_clipnorm=0.05)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ours(x).square().sum() * 10
        loss.backward()
        return loss

    with torch.no_grad():  # the closure still gets gradients, as in torch's optimizers
        loss = opt.step(closure=closure) if as_keyword else opt.step(closure)
    ref_opt.zero_grad()
    ref_loss = ref(x).square().sum() * 10
    ref_loss.backward()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    ref_opt.step()
    assert calls == [True] and loss.item() == ref_loss.detach().item()
    assert handle.last.clipped and handle.last.total_norm == pytest.approx(float(total), rel=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_closure_through_a_step_taken_before_attach_is_refused():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bare_step = opt.step
    gradclip.attach(opt, global_clipnorm=1.0)
    backward(model)
    with pytest.raises(RuntimeError, match="closure"):
        bare_step(lambda: model(torch.ones(1, 6)).sum())


def test_lbfgs_is_refused_by_name():
    model = small_model()
    with pytest.raises(ValueError, match="LBFGS calls its closure several times"):
        gradclip.attach(torch.optim.LBFGS(model.parameters()), global_clipnorm=1.0)


# --------------------------------------------------------------------------
# Nonfinite policies
# --------------------------------------------------------------------------


def poison(model, value=NAN):
    model[2].weight.grad[3, 4] = value
    model[2].weight.grad[0, 1] = INF


def test_propagate_matches_torch():
    a, b = small_model(), small_model()
    for m in (a, b):
        backward(m)
        poison(m)
    record = gradclip.clip_gradients_(a.parameters(), global_clipnorm=1.0)
    torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.isnan(pa.grad).all() and torch.isnan(pb.grad).all()
    assert math.isnan(record.total_norm) and record.nonfinite_tensors == 1


def test_error_names_the_layer_and_modifies_nothing():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gradclip.attach(opt, global_clipnorm=1.0, nonfinite="error", named_parameters=model.named_parameters())
    backward(model, scale=100.0)
    poison(model)
    grads, params = grads_of(model), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gradclip.NonfiniteGradientError, match=r"nonfinite.*1 gradients: 2\.weight") as info:
        opt.step()
    assert info.value.names == ["2.weight"]
    for g0, w0, p in zip(grads, params, model.parameters()):
        assert_bitwise_equal(p.grad, g0)
        assert_bitwise_equal(p.detach(), w0)


def test_skip_leaves_adam_with_weight_decay_untouched_then_resumes():
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    log = []
    handle = gradclip.attach(opt, global_clipnorm=1.0, nonfinite="skip", on_step=log.append)
    backward(model)
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    backward(model, seed=2)
    poison(model)
    grads_before = grads_of(model)
    assert opt.step() is None
    assert handle.last.skipped and log[-1] is handle.last and handle.last.nonfinite_tensors == 1
    for w0, g0, p in zip(params_before, grads_before, model.parameters()):
        assert_bitwise_equal(p.detach(), w0)  # not even weight decay was applied
        torch.testing.assert_close(p.grad, g0, equal_nan=True, rtol=0, atol=0)
    state_after = opt.state_dict()
    for k, s in state_before["state"].items():
        for name, value in s.items():
            assert_bitwise_equal(state_after["state"][k][name], value)
    opt.zero_grad()
    backward(model, seed=3)
    opt.step()
    assert not handle.last.skipped
    assert int(opt.state_dict()["state"][0]["step"]) == 2


@pytest.mark.parametrize("mode", ["global_clipnorm", "clipnorm", "clipvalue"])
def test_zero_treats_nonfinite_elements_as_zero(mode):
    model, reference = small_model(), small_model()
    for m in (model, reference):
        backward(m, scale=30.0)
        poison(m)
        m[4].bias.grad[1] = -INF
    for p in reference.parameters():  # what 'zero' must be equivalent to
        p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    expected_total = ref_norm([p.grad for p in reference.parameters()], 2.0)
    record = gradclip.clip_gradients_(model.parameters(), nonfinite="zero", **{mode: 0.5})
    if mode == "global_clipnorm":
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    elif mode == "clipnorm":
        for p in reference.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.5)
    else:
        torch.nn.utils.clip_grad_value_(reference.parameters(), 0.5)
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-6, atol=1e-7)
    assert record.zeroed_elements == 3 and record.nonfinite_tensors == 2
    assert_norm_close(record.total_norm, expected_total, 2.0)
    assert record.clipped


# --------------------------------------------------------------------------
# Monitoring
# --------------------------------------------------------------------------


def test_records_name_the_exploding_layer():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = gradclip.attach(opt, global_clipnorm=1.0, named_parameters=model)
    backward(model)
    model[2].bias.grad.mul_(1e6)
    norms = {n: ref_norm([p.grad], 2.0) for n, p in model.named_parameters()}
    opt.step()
    got = handle.last.tensor_norms()
    assert got.keys() == norms.keys()
    for name, n in norms.items():
        assert_norm_close(got[name], n, 2.0)
    assert handle.last.largest(1)[0][0] == "2.bias"
    assert [n for n, _ in handle.last.largest(10)] == sorted(norms, key=norms.get, reverse=True)


def test_unnamed_parameters_are_named_by_group_and_index():
    model = small_model()
    opt = grouped_optimizer(model)
    handle = gradclip.attach(opt)
    backward(model)
    opt.step()
    assert list(handle.last.tensor_norms())[-1] == "param_groups[1].params[1]"


def test_csv_logger_writes_one_row_per_step(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "clip.csv"
    logger = gradclip.CsvLogger(path)
    handle = gradclip.attach(opt, global_clipnorm=0.1, on_step=logger)
    for step in range(3):
        opt.zero_grad()
        backward(model, seed=step)
        opt.step()
    logger.close()
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(handle.last.as_dict())
    assert len(lines) == 4
    last = dict(zip(lines[0].split(","), lines[3].split(",")))
    assert float(last["total_norm"]) == handle.last.total_norm and last["clipped"] == "True"


class RecordingWriter:
    """The one SummaryWriter method the TensorBoard logger uses."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))


def test_tensorboard_logger_scalars_and_per_tensor_norms():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = RecordingWriter()
    gradclip.attach(opt, clipnorm=0.1, named_parameters=model, on_step=gradclip.TensorBoardLogger(writer, "clip", True))
    backward(model)
    bias_norm = ref_norm([model[0].bias.grad], 2.0)  # before the clip, as logged
    opt.step()
    tags = {t for t, _, s in writer.scalars if s == 0}
    assert {"clip/total_norm", "clip/clip_coef", "clip/clipped", "clip/norm/4.weight"} <= tags
    assert_norm_close(dict((t, v) for t, v, _ in writer.scalars)["clip/norm/0.bias"], bias_norm, 2.0)


def test_record_as_dict_is_flat_scalars():
    model = small_model()
    backward(model)
    d = gradclip.clip_gradients_(model.parameters(), global_clipnorm=1.0).as_dict()
    assert all(isinstance(v, (int, float, bool)) for v in d.values())
    assert {"step", "total_norm", "clip_coef", "clipped", "skipped", "nonfinite_tensors", "zeroed_elements"} <= set(d)


def test_clipnorm_group_limits_apply_per_tensor():
    model = small_model()
    opt = grouped_optimizer(model, clipnorm=0.05)
    gradclip.attach(opt, clipnorm=0.5)
    backward(model, scale=10.0)
    before = [(p.grad.clone(), limit) for g, limit in zip(opt.param_groups, (0.5, 0.05)) for p in g["params"]]
    opt.step()
    for (g0, limit), p in zip(before, [p for g in opt.param_groups for p in g["params"]]):
        assert_scaled(p.grad, g0, limit, ref_norm([g0], 2.0), rtol=RTOL)


def test_same_memory_in_two_groups_is_refused_before_any_write():
    a, b = np.full(4, 3.0), np.full(2, 5.0)
    before = a.copy()
    with pytest.raises(ValueError, match=r"grads\[2\]: the same memory as grads\[0\] but in another group"):
        _core.clip([a, b, a], kind="global", limits=[0.1, 1.0], group_of_item=np.array([0, 0, 1], np.int32),
                   order=2.0, eps=1e-6, nonfinite="propagate", argname="grads", grad_attr=False)
    assert_bitwise_equal(a, before)
    with pytest.raises(ValueError, match=r"group_of_item\[1\]: group 2 has no limit"):
        _core.clip([a, b], kind="global", limits=[0.1, 1.0], group_of_item=[0, 2], order=2.0, eps=1e-6,
                   nonfinite="propagate", argname="grads", grad_attr=False)


def test_attach_and_clip_gradients_share_one_declaration_of_the_options():
    import inspect

    from gradclip.training.options import clip_options

    options = list(inspect.signature(clip_options).parameters)
    for fn, own in ((gradclip.attach, ["optimizer", "named_parameters", "on_step", "fold", "measure_in_backward"]),
                    (gradclip.clip_gradients_, ["parameters", "named_parameters"])):
        params = inspect.signature(fn).parameters
        assert list(params) == own[:1] + options + own[1:], fn.__name__
        assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in options)
    model = small_model()
    with pytest.raises(TypeError, match="global_clipnorn"):
        gradclip.clip_gradients_(model.parameters(), global_clipnorn=1.0)
    with pytest.raises(TypeError, match="positional"):
        gradclip.clip_gradients_(model.parameters(), 1.0)
