"""Trainer callbacks that clip with gradclip and log what the clip saw through
the trainer's own logger: the total norm, the coefficient, how many gradients
were nonfinite, and the largest per-layer norms (NaN and inf first), from the
clip's own pass, so that a user sees which layer explodes.

* Lightning: ``Trainer(callbacks=[gradclip.integrations.lightning_callback(global_clipnorm=1.0)])``
  (leave ``gradient_clip_val`` unset); the fields go through ``LightningModule.log_dict``.
* HF Trainer: ``gradclip.integrations.add_hf_callback(trainer, global_clipnorm=1.0)`` with
  ``TrainingArguments(max_grad_norm=0)``; the fields join every log entry, ahead
  of the reporters (TensorBoard, W&B, ...).

Neither framework is imported until a callback is made. The options are those
of :func:`gradclip.clip_gradients_`; ``nonfinite='skip'`` is not available here
(a callback cannot cancel the trainer's step: use :func:`gradclip.attach`).
"""

from __future__ import annotations

import math
from typing import Any, Dict

from .training import StepRecord, clip_gradients_

__all__ = ["add_hf_callback", "hf_callback", "lightning_callback", "record_logs"]


def record_logs(record: StepRecord, top_k: int = 5, prefix: str = "gradclip/") -> Dict[str, float]:
    """A record as flat scalars for a logger: total norm, coefficient, clipped,
    nonfinite count, and the ``top_k`` largest per-tensor norms by name."""
    logs = {
        f"{prefix}total_norm": float(record.total_norm),
        f"{prefix}clip_coef": float(record.clip_coef),
        f"{prefix}clipped": float(record.clipped),
        f"{prefix}nonfinite_tensors": float(record.nonfinite_tensors),
    }
    for name, norm in record.largest(top_k):
        logs[f"{prefix}norm/{name}"] = float(norm)
    return logs


def _check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    if options.get("nonfinite") == "skip":
        raise ValueError("nonfinite='skip': a callback cannot cancel the trainer's optimizer step; use 'error' or "
                         "'zero' here, or gradclip.attach(optimizer, nonfinite='skip') in configure_optimizers")
    return options


def lightning_callback(top_k: int = 5, **options: Any):
    """A Lightning ``Callback`` that clips in ``on_before_optimizer_step`` (after
    backward and gradient unscaling, where Lightning would clip) and logs the
    record with ``pl_module.log_dict``."""
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the older package name
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    options = _check_options(options)

    class GradclipCallback(Callback):
        def __init__(self):
            self.last: StepRecord | None = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.gradient_clip_val:
                raise ValueError("gradclip's callback clips the gradients: leave Trainer(gradient_clip_val=...) "
                                 "unset, or Lightning clips them a second time")
            self.last = clip_gradients_(pl_module.parameters(), named_parameters=pl_module, **options)
            pl_module.log_dict(record_logs(self.last, top_k), on_step=True, on_epoch=False)

    return GradclipCallback()


def hf_callback(top_k: int = 5, **options: Any):
    """An HF ``TrainerCallback`` that clips in ``on_pre_optimizer_step`` and adds
    the record's fields (and its total as ``grad_norm``) to the next log entry.
    Needs ``TrainingArguments(max_grad_norm=0)``; add it with
    :func:`add_hf_callback` so that the reporters see the fields."""
    from transformers import TrainerCallback

    options = _check_options(options)

    class GradclipCallback(TrainerCallback):
        def __init__(self):
            self.last: StepRecord | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if args.max_grad_norm and args.max_grad_norm > 0:
                raise ValueError("gradclip's callback clips the gradients: set TrainingArguments(max_grad_norm=0), "
                                 "or the Trainer clips them first")

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.last = clip_gradients_(model.parameters(), named_parameters=model, **options)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.last is None or logs is None or "loss" not in logs:
                return
            fields = record_logs(self.last, top_k)
            if not math.isnan(self.last.total_norm) or "grad_norm" in logs:
                fields["grad_norm"] = float(self.last.total_norm)  # the norm the clip saw
            logs.update(fields)
            if state.log_history and state.log_history[-1] is not logs:
                state.log_history[-1].update(fields)  # the Trainer keeps a copy of the entry

    return GradclipCallback()


def add_hf_callback(trainer: Any, top_k: int = 5, **options: Any):
    """:func:`hf_callback` added first, ahead of the reporting callbacks, so
    that the fields it adds reach them; returns the callback."""
    callback = hf_callback(top_k, **options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
