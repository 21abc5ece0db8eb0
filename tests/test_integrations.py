"""gradclip where users train: HF Trainer, accelerate and Lightning, for real
(tiny models built from configs, synthetic data, no downloads). Each run is
made twice, with gradclip.patch_torch() and without; gradclip must really be
called (counted), and the logged losses and gradient norms must equal the
unpatched run's to float32 rounding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradclip
from gradclip import torch_api

pytestmark = pytest.mark.slow

NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")


@pytest.fixture
def counted(monkeypatch):
    """Calls of gradclip's drop-ins by name, wherever patch_torch routes them."""
    calls = []
    for name in NAMES:
        real = getattr(torch_api, name)
        monkeypatch.setattr(torch_api, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    return calls


def _close_lists(ours, theirs, what):
    assert len(ours) == len(theirs) and ours, f"{what}: {ours} against {theirs}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=2e-6, abs=1e-7), f"{what}[{i}]: {a} against {b}"


def _hf_trainer(transformers, output_dir, max_steps: int, max_grad_norm: float):
    """A 2-layer GPT-2 built from its config on synthetic tokens: no download."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (32, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        max_grad_norm=max_grad_norm, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=data), model


def test_hf_trainer_clips_through_gradclip(tmp_path, counted):
    transformers = pytest.importorskip("transformers")

    def run(patched: bool):
        trainer, _ = _hf_trainer(transformers, tmp_path / ("patched" if patched else "plain"), 6, 0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if patched:
                with gradclip.patch_torch():
                    trainer.train()
            else:
                trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return [h["loss"] for h in logs], [float(h["grad_norm"]) for h in logs]

    loss_ours, norm_ours = run(patched=True)
    assert counted, "gradclip was never called"
    loss_torch, norm_torch = run(patched=False)
    _close_lists(norm_ours, norm_torch, "grad_norm")
    _close_lists(loss_ours, loss_torch, "loss")
    assert all(n > 0.05 for n in norm_ours)  # every step clipped


def test_accelerate_clips_through_gradclip(counted):
    accelerate = pytest.importorskip("accelerate")

    def run(patched: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = accelerate.Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        norms = []
        for step in range(4):
            x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            acc.backward(model(x).square().sum() * 10)
            if patched:
                with gradclip.patch_torch():
                    norms.append(float(acc.clip_grad_norm_(model.parameters(), 0.5)))
            else:
                norms.append(float(acc.clip_grad_norm_(model.parameters(), 0.5)))
            opt.step()
        return norms, [p.detach().clone() for p in model.parameters()]

    ours, ours_params = run(True)
    assert {"get_total_norm", "clip_grads_with_norm_"} <= set(counted) or "clip_grad_norm_" in counted
    theirs, their_params = run(False)
    _close_lists(ours, theirs, "accelerate's clip_grad_norm_")
    for a, b in zip(ours_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _lightning_module(L, attach_clip: bool):
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
            self.norms = []
            self.losses = []

        def training_step(self, batch, _):
            loss = self.net(batch).square().sum() * 10
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            if attach_clip:  # Lightning passes a closure to step(): attach runs it, then clips
                self.handle = gradclip.attach(opt, global_clipnorm=0.5, on_step=lambda r: self.norms.append(r.total_norm))
            return opt

        def train_dataloader(self):
            g = torch.Generator().manual_seed(3)
            return torch.utils.data.DataLoader(torch.randn(24, 8, generator=g), batch_size=6)

    return Module()


@pytest.mark.parametrize("route", ["patch_torch", "attach"])
def test_lightning_clips_through_gradclip(route, counted):
    L = pytest.importorskip("lightning")

    def run(use_gradclip: bool):
        module = _lightning_module(L, attach_clip=use_gradclip and route == "attach")
        clip_val = None if (use_gradclip and route == "attach") else 0.5
        trainer = L.Trainer(max_steps=4, gradient_clip_val=clip_val, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if use_gradclip and route == "patch_torch":
                with gradclip.patch_torch():
                    trainer.fit(module)
            else:
                trainer.fit(module)
        return module

    ours = run(True)
    theirs = run(False)
    if route == "patch_torch":
        assert "clip_grad_norm_" in counted
    else:
        assert len(ours.norms) == 4 and all(math.isfinite(n) for n in ours.norms)
    _close_lists(ours.losses, theirs.losses, "loss")
    for a, b in zip(ours.net.parameters(), theirs.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# The callbacks: clip with gradclip, log per-layer norms through the trainer
# --------------------------------------------------------------------------


def test_lightning_callback_clips_and_logs_per_layer_norms():
    L = pytest.importorskip("lightning")
    from gradclip import integrations

    def run(callback):
        module = _lightning_module(L, attach_clip=False)
        logged = []

        class Keep(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                logged.append(dict(trainer.callback_metrics))

        callbacks = [callback, Keep()] if callback else [Keep()]
        trainer = L.Trainer(max_steps=4, gradient_clip_val=None if callback else 0.5, accelerator="cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module)
        return module, logged

    callback = integrations.lightning_callback(top_k=3, global_clipnorm=0.5)
    ours, logged = run(callback)
    theirs, _ = run(None)
    _close_lists(ours.losses, theirs.losses, "loss")
    for a, b in zip(ours.net.parameters(), theirs.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    last = logged[-1]
    assert float(last["gradclip/total_norm"]) == pytest.approx(callback.last.total_norm, rel=1e-6)
    top = callback.last.largest(3)  # the last step's three largest, by name, as logged
    assert len(top) == 3 and all(name in dict(ours.named_parameters()) for name, _ in top)
    for name, norm in top:
        assert float(last[f"gradclip/norm/{name}"]) == pytest.approx(norm, rel=1e-6)
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        integrations.lightning_callback(global_clipnorm=1.0, nonfinite="skip")


def test_lightning_callback_refuses_a_second_clip():
    L = pytest.importorskip("lightning")
    from gradclip import integrations

    trainer = L.Trainer(max_steps=1, gradient_clip_val=0.5, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[integrations.lightning_callback(global_clipnorm=0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="leave Trainer\\(gradient_clip_val"):
            trainer.fit(_lightning_module(L, attach_clip=False))


def test_hf_callback_clips_and_logs_per_layer_norms(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gradclip import integrations

    def run(max_grad_norm, with_callback):
        trainer, model = _hf_trainer(transformers, tmp_path / str(with_callback), 5, max_grad_norm)
        if with_callback:
            integrations.add_hf_callback(trainer, top_k=4, global_clipnorm=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h], model

    ours, model = run(0.0, True)
    theirs, _ = run(0.05, False)
    _close_lists([h["loss"] for h in ours], [h["loss"] for h in theirs], "loss")
    _close_lists([float(h["grad_norm"]) for h in ours], [float(h["grad_norm"]) for h in theirs], "grad_norm")
    names = dict(model.named_parameters())
    for h in ours:
        assert h["gradclip/total_norm"] == float(h["grad_norm"]) and h["gradclip/clipped"] == 1.0
        layers = [k[len("gradclip/norm/"):] for k in h if k.startswith("gradclip/norm/")]
        assert len(layers) == 4 and all(name in names for name in layers)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        run(1.0, True)
