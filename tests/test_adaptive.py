"""AutoClip and ZClip: thresholds against NumPy / a hand-worked reference, the
tensor path (same numbers, and no host read: it runs on meta tensors),
checkpoint round trips, and use through attach / clip_gradients_."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import gradclip
from conftest import NAN, assert_norm_close, assert_scaled, ref_coef, ref_norm


def norm_sequence(n: int = 60, seed: int = 0) -> list:
    """Gradient-norm-like values: a slow trend, noise and a few spikes."""
    rng = np.random.default_rng(seed)
    x = 1.0 + 0.3 * np.sin(np.arange(n) / 7.0) + 0.1 * rng.standard_normal(n)
    for i, factor in ((20, 8.0), (33, 20.0), (34, 5.0), (50, 12.0)):
        if i < n:
            x[i] *= factor
    return [float(v) for v in np.abs(x)]


# --------------------------------------------------------------------------
# AutoClip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("history_size", [None, 7])
@pytest.mark.parametrize("percentile", [0.0, 10.0, 50.0, 90.0, 100.0])
def test_autoclip_is_the_percentile_of_the_history(percentile, history_size):
    clip = gradclip.AutoClip(percentile, history_size)
    seen = []
    for norm in norm_sequence():
        seen.append(norm)
        window = seen if history_size is None else seen[-history_size:]
        assert clip.update(norm) == pytest.approx(np.percentile(window, percentile), rel=1e-14, abs=0)


@pytest.mark.parametrize("history_size", [None, 5])
def test_autoclip_tensor_path_matches_the_float_path(history_size):
    a, b = gradclip.AutoClip(25.0, history_size), gradclip.AutoClip(25.0, history_size)
    for norm in norm_sequence(40):
        expected = a.update(norm)
        got = b.update(torch.tensor(norm, dtype=torch.float32))
        assert isinstance(got, torch.Tensor)
        assert float(got) == pytest.approx(expected, rel=1e-6)  # the tensor norm was float32


@pytest.mark.parametrize("history_size", [None, 5])
def test_autoclip_tensor_path_never_reads_the_device(history_size):
    # Meta tensors have no data: any host read (.item(), bool(), float()) raises.
    clip = gradclip.AutoClip(10.0, history_size)
    for _ in range(20):
        threshold = clip.update(torch.empty((), device="meta"))
    assert threshold.device.type == "meta"


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("history_size", [None, 6])
def test_autoclip_checkpoint_resumes_exactly(as_tensor, history_size):
    norms = norm_sequence(30)
    wrap = (lambda v: torch.tensor(v, dtype=torch.float64)) if as_tensor else (lambda v: v)
    whole = gradclip.AutoClip(20.0, history_size)
    expected = [float(whole.update(wrap(v))) for v in norms]
    first = gradclip.AutoClip(20.0, history_size)
    for v in norms[:17]:
        first.update(wrap(v))
    resumed = gradclip.AutoClip()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert [float(resumed.update(wrap(v))) for v in norms[17:]] == expected[17:]


def test_autoclip_refuses_bad_settings_and_nonfinite_norms():
    with pytest.raises(ValueError, match="percentile must be in"):
        gradclip.AutoClip(101)
    with pytest.raises(ValueError, match="history_size must be >= 1"):
        gradclip.AutoClip(10, 0)
    with pytest.raises(ValueError, match="must be finite"):
        gradclip.AutoClip().update(NAN)


# --------------------------------------------------------------------------
# ZClip
# --------------------------------------------------------------------------


def test_zclip_worked_example():
    z = gradclip.ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=3, eps=0.0)
    assert [z.update(v) for v in (1.0, 2.0, 3.0)] == [math.inf] * 3  # warm-up: no max_norm, no clipping
    assert z.mean == 2.0 and z.var == pytest.approx(2.0 / 3.0, rel=1e-15)
    std = math.sqrt(2.0 / 3.0)
    zscore = (10.0 - 2.0) / std
    limit = 2.0 + 2.5 * std / (zscore / 2.5)  # a spike: pushed below mean + z_thresh * std
    assert z.update(10.0) == pytest.approx(limit, rel=1e-14) and z.spike
    mean = 0.9 * 2.0 + 0.1 * limit  # the EMAs see the clipped norm
    var = 0.9 * (2.0 / 3.0) + 0.1 * (limit - mean) ** 2
    assert z.mean == pytest.approx(mean, rel=1e-14) and z.var == pytest.approx(var, rel=1e-14)
    assert z.update(2.0) == math.inf and not z.spike  # z-score below the threshold: not clipped


def zclip_reference(norms, alpha, z_thresh, warmup, max_norm, clip_to, eps, skip_update_on_spike):
    """ZClip's rule restated over a whole sequence, in float64 NumPy."""
    w = np.array(norms[:warmup])
    mean, var = w.mean(), w.var()
    cap = math.inf if max_norm is None else max_norm
    out = [cap] * warmup
    for g in norms[warmup:]:
        std = np.sqrt(var)
        z = (g - mean) / (std + eps)
        if z > z_thresh:
            limit = mean + z_thresh**2 * std / z if clip_to == "adaptive" else mean
            out.append(min(limit, cap))
            if skip_update_on_spike:
                continue
            x = limit
        else:
            out.append(cap)
            x = g
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(clip_to="mean"),
        dict(max_norm=1.5),
        dict(skip_update_on_spike=True, z_thresh=2.0),
        dict(alpha=0.5, warmup_steps=5),
    ],
    ids=["default", "mean", "max_norm", "skip_update", "fast_ema"],
)
def test_zclip_matches_the_reference(settings):
    args = dict(alpha=0.97, z_thresh=2.5, warmup_steps=10, max_norm=None, clip_to="adaptive", eps=1e-6,
                skip_update_on_spike=False)
    args.update(settings)
    norms = norm_sequence(80)
    z = gradclip.ZClip(**args)
    got = [z.update(v) for v in norms]
    expected = zclip_reference(norms, args["alpha"], args["z_thresh"], args["warmup_steps"], args["max_norm"],
                               args["clip_to"], args["eps"], args["skip_update_on_spike"])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert sum(math.isfinite(t) for t in got[args["warmup_steps"]:]) >= 2 or args["max_norm"] is not None


def test_zclip_tensor_path_matches_and_never_reads_the_device():
    a, b = gradclip.ZClip(warmup_steps=5), gradclip.ZClip(warmup_steps=5)
    for v in norm_sequence(50):
        expected = a.update(v)
        got = b.update(torch.tensor(v, dtype=torch.float64))
        assert float(got) == pytest.approx(expected, rel=1e-12)
    meta = gradclip.ZClip(warmup_steps=3, max_norm=2.0)
    for _ in range(10):
        threshold = meta.update(torch.empty((), device="meta"))
    assert threshold.device.type == "meta"


@pytest.mark.parametrize("split", [3, 20])  # inside and after the warm-up
def test_zclip_checkpoint_resumes_exactly(split):
    norms = norm_sequence(40)
    whole = gradclip.ZClip(warmup_steps=8, clip_to="mean")
    expected = [whole.update(v) for v in norms]
    first = gradclip.ZClip(warmup_steps=8, clip_to="mean")
    for v in norms[:split]:
        first.update(v)
    resumed = gradclip.ZClip()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert [resumed.update(v) for v in norms[split:]] == expected[split:]


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(alpha=1.0), "alpha"), (dict(z_thresh=0), "z_thresh"), (dict(warmup_steps=0), "warmup_steps"),
     (dict(max_norm=-1.0), "max_norm"), (dict(clip_to="median"), "clip_to")],
)
def test_zclip_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradclip.ZClip(**kwargs)


# --------------------------------------------------------------------------
# Through the clip engine
# --------------------------------------------------------------------------


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.0)


def test_attach_with_autoclip_clips_to_the_percentile():
    model, opt = model_and_opt()
    handle = gradclip.attach(opt, global_clipnorm=gradclip.AutoClip(30.0))
    history = []
    for step in range(8):
        opt.zero_grad()
        (model(torch.randn(4, 5)).pow(2).sum() * (1 + 3 * (step % 3))).backward()
        before = [p.grad.clone() for p in model.parameters()]
        total = ref_norm(before, 2.0)
        history.append(total)
        opt.step()
        rec = handle.last
        assert_norm_close(rec.total_norm, total, 2.0)
        assert rec.threshold == pytest.approx(np.percentile(history, 30.0), rel=1e-12)
        for g0, p in zip(before, model.parameters()):
            assert_scaled(p.grad, g0, rec.threshold, total, rtol=1e-12)
        assert rec.clipped == (ref_coef(rec.threshold, total) < 1.0)


def test_clip_gradients_with_zclip_and_a_nonfinite_step():
    model, _ = model_and_opt()
    z = gradclip.ZClip(warmup_steps=2)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 5)).sum().backward()
        gradclip.clip_gradients_(model.parameters(), global_clipnorm=z)
    state = dict(z.state_dict())
    model[0].weight.grad[0, 0] = NAN
    record = gradclip.clip_gradients_(model.parameters(), global_clipnorm=z, nonfinite="skip")
    assert record.skipped and z.state_dict()["mean"] == state["mean"]  # a NaN norm never reaches the EMAs
    model.zero_grad()
    model(torch.randn(4, 5)).sum().backward()
    model[0].weight.grad[0, 0] = NAN
    record = gradclip.clip_gradients_(model.parameters(), global_clipnorm=z, nonfinite="zero")
    assert record.zeroed_elements == 1 and not math.isnan(record.threshold)  # the clipper saw the repaired norm
    assert z.state_dict()["mean"] != state["mean"]


def test_adaptive_limit_cannot_be_mixed_with_group_limits():
    model, _ = model_and_opt()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "global_clipnorm": 1.0}],
                          lr=0.0)
    gradclip.attach(opt, global_clipnorm=gradclip.ZClip())
    model(torch.randn(4, 5)).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['global_clipnorm'\]: per-group limits cannot"):
        opt.step()
