"""torch.compile over the drop-ins (torch custom ops, gradclip.torch_ops), and
gradclip.patch_torch() routing torch's clipping functions to gradclip."""

from __future__ import annotations

import pytest
import torch

import gradclip
from gradclip import torch_api, torch_ops

dynamo_testing = pytest.importorskip("torch._dynamo.testing")

STEPS = 20


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _backward(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    (model(torch.randn(5, 8, generator=g).to(dtype)).square().sum() * (1 + step)).backward()


# Each case: (gradclip's function of the parameters, torch's); both return a tensor or None.
CASES = {
    "clip_grad_norm_": (lambda ps: gradclip.clip_grad_norm_(ps, 0.5),
                        lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5)),
    "clip_grad_norm_inf": (lambda ps: gradclip.clip_grad_norm_(ps, 0.5, norm_type="inf"),
                           lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5, norm_type="inf")),
    "get_total_norm": (lambda ps: gradclip.get_total_norm([p.grad for p in ps]),
                       lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps])),
    "total_then_clip_with_norm": (
        lambda ps: gradclip.clip_grads_with_norm_(ps, 0.5, gradclip.get_total_norm([p.grad for p in ps])),
        lambda ps: torch.nn.utils.clip_grads_with_norm_(ps, 0.5, torch.nn.utils.get_total_norm([p.grad for p in ps]))),
    "clip_grad_value_": (lambda ps: gradclip.clip_grad_value_(ps, 0.3),
                         lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.3)),
}


def _run(fn, compiled: bool, dtype=torch.float32):
    """STEPS steps of backward + fn + SGD; returns (results, parameters, frames compiled)."""
    model = _model().to(dtype)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")  # functionalizes, as inductor would
    call = torch.compile(lambda: fn(params), backend=counter, fullgraph=True) if compiled else (lambda: fn(params))
    results = []
    for step in range(STEPS):
        _backward(model, step)
        out = call()
        results.append(None if out is None else out.detach().clone())
        opt.step()
    return results, [p.detach().clone() for p in params], counter.frame_count


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_fullgraph_compiles_once_like_torch_and_matches_eager(case):
    ours, theirs = CASES[case]
    assert torch_ops.available()
    got, got_params, frames = _run(ours, compiled=True)
    eager, eager_params, _ = _run(ours, compiled=False)
    _, _, torch_frames = _run(theirs, compiled=True)
    assert frames == torch_frames == 1, f"{case}: {frames} graphs compiled (torch: {torch_frames})"
    for a, b in zip(got, eager):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
    for a, b in zip(got_params, eager_params):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in got_params)


def test_compiled_results_keep_the_result_dtype():
    # 16-bit gradients give a float32 total (the fake implementation says so too).
    got, _, frames = _run(CASES["clip_grad_norm_"][0], compiled=True, dtype=torch.bfloat16)
    assert frames == 1 and all(t.dtype == torch.float32 for t in got)


def _compiled_steps(with_attach: bool, compiled: bool):
    """STEPS of backward + a (compiled) foreach AdamW step, with or without attach;
    returns the parameters, the graphs compiled and the reasons of the graph breaks."""
    from torch._dynamo.utils import counters

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    if with_attach:
        gradclip.attach(opt, global_clipnorm=0.05)
    counters.clear()
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter) if compiled else opt.step
    for i in range(STEPS):
        _backward(model, i)
        step()
    return [p.detach().clone() for p in model.parameters()], counter.frame_count, list(counters["graph_break"])


# Dynamo tracing torch's AdamW._init_group touches torch.jit.script_method, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_optimizer_step_clips_inside_its_graphs():
    # torch 2.13's own optimizer step breaks its graph once, even without a hook (so fullgraph=True cannot
    # compile a step at all); attach's clip is traced as the clip_grad_norm_ op: no break of its own, one
    # graph more (the clip, before torch's break), and no recompilation from step to step.
    unclipped, plain_frames, plain_breaks = _compiled_steps(with_attach=False, compiled=True)
    got, frames, breaks = _compiled_steps(with_attach=True, compiled=True)
    eager, _, _ = _compiled_steps(with_attach=True, compiled=False)
    assert not [b for b in breaks if "gradclip" in b], breaks
    assert len(breaks) == len(plain_breaks) and frames == plain_frames + 1, (frames, plain_frames, breaks)
    # torch's compiled AdamW itself differs from its eager one by up to ~1e-6 here (other op order).
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-6)
    # ... while the clip moves the parameters by far more: it did clip inside the graph.
    assert max(float((a - b).abs().max()) for a, b in zip(got, unclipped)) > 1e-3


@pytest.mark.parametrize("op", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"])
def test_the_custom_ops_pass_torch_opcheck(op):
    # Schema (mutation declared), fake implementation against the real one, and
    # the dispatch torch.compile's AOT tracing uses.
    grads = [torch.randn(7), torch.randn(3, 5), torch.randn(0)]
    args = {
        "clip_grad_norm_": (grads, 0.5, 2.0, False),
        "get_total_norm": (grads, 2.0, False),
        "clip_grads_with_norm_": (grads, 0.5, torch.tensor(4.0)),
        "clip_grad_value_": (grads, 0.3),
    }[op]
    torch.library.opcheck(getattr(torch.ops.gradclip, op), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# --------------------------------------------------------------------------
# patch_torch
# --------------------------------------------------------------------------

NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")


def _torch_functions():
    import torch.nn.utils.clip_grad as clip_grad

    return {(m, n): getattr(mod, n) for m, mod in (("utils", torch.nn.utils), ("clip_grad", clip_grad))
            for n in NAMES if hasattr(mod, n)}


def test_patch_routes_both_modules_and_undo_restores():
    original = _torch_functions()
    assert len(original) >= 6  # all four in torch.nn.utils, the public ones of clip_grad
    with gradclip.patch_torch() as handle:
        for (module, name), fn in _torch_functions().items():
            assert fn is getattr(torch_api, name), f"{module}.{name} not routed"
        assert handle.active
    assert _torch_functions() == original


def test_patching_twice_is_harmless():
    original = _torch_functions()
    first = gradclip.patch_torch()
    second = gradclip.patch_torch()
    first.undo()
    assert torch.nn.utils.clip_grad_norm_ is torch_api.clip_grad_norm_  # the other handle still wants it
    second.undo()
    second.undo()
    assert _torch_functions() == original


def test_a_plain_loop_and_an_accelerate_style_call_reach_gradclip(monkeypatch):
    # accelerate calls get_total_norm and clip_grads_with_norm_ by name at call
    # time; a plain loop clip_grad_norm_. Counted where the patch points.
    calls = []
    for name in NAMES:
        real = getattr(torch_api, name)
        monkeypatch.setattr(torch_api, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    model, ref = _model(), _model()
    for step in range(3):
        _backward(model, step)
        _backward(ref, step)
        with gradclip.patch_torch():
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.1, norm)
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        torch.nn.utils.clip_grads_with_norm_(ref.parameters(), 0.1, torch.nn.utils.get_total_norm(
            [p.grad for p in ref.parameters()]))
        assert float(total) == pytest.approx(float(ref_total), rel=1e-6)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    assert calls == ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"] * 3
