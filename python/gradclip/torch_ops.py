"""The torch drop-ins as torch custom ops, so that ``torch.compile`` traces them.

A call into the native module is opaque to Dynamo: a graph break, and a Python
float result would become a guard that recompiles every step. Registered as
custom ops (``torch.library.custom_op``) with fake implementations and the
gradients they write declared (``mutates_args``), the drop-ins trace into one
graph (``fullgraph=True`` works), compile once, and functionalization knows
which tensors change. The ops run the eager drop-ins; their results are
tensors, never Python floats.

Registration happens from Python and only where torch is imported (importing
gradclip without torch registers nothing): at ``import gradclip`` when torch is
already imported, else at the first eager call of a drop-in. Inside a compiled
region the drop-ins call ``torch.ops.gradclip.*``; without the ops (not yet
registered, or ``process_group=`` given) they run eagerly, a graph break.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, List, Optional

__all__ = ["compiling", "register"]

_registered = False
_is_compiling = None  # torch.compiler.is_compiling, once the ops are registered


def compiling() -> bool:
    """Whether torch.compile is tracing this call (False without torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def available() -> bool:
    return _registered


def register() -> bool:
    """Registers the ops once torch is imported; returns whether they exist."""
    global _registered, _is_compiling
    if _registered:
        return True
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(getattr(torch, "library", None), "custom_op"):
        return False
    _define(torch)
    _is_compiling = torch.compiler.is_compiling
    _registered = True
    return True


def _result_dtype(torch, tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _define(torch) -> None:
    from . import torch_api

    def as_params(grads):
        return [SimpleNamespace(grad=g) for g in grads]

    # Explicit schemas: this module's annotations are strings (PEP 563), which
    # custom_op's schema inference cannot evaluate here.
    @torch.library.custom_op("gradclip::clip_grad_norm_", mutates_args=("grads",),
                             schema="(Tensor(a!)[] grads, float max_norm, float norm_type, bool error_if_nonfinite)"
                                    " -> Tensor")
    def clip_grad_norm_(grads, max_norm, norm_type, error_if_nonfinite):
        return torch_api.clip_grad_norm_(as_params(grads), max_norm, norm_type, error_if_nonfinite)

    @clip_grad_norm_.register_fake
    def _(grads, max_norm, norm_type, error_if_nonfinite):
        if not grads:
            return torch.empty((), dtype=torch.float32)
        return torch.empty((), dtype=_result_dtype(torch, grads), device=grads[0].device)

    @torch.library.custom_op("gradclip::get_total_norm", mutates_args=(),
                             schema="(Tensor[] tensors, float norm_type, bool error_if_nonfinite) -> Tensor")
    def get_total_norm(tensors, norm_type, error_if_nonfinite):
        return torch_api.get_total_norm(tensors, norm_type, error_if_nonfinite)

    @get_total_norm.register_fake
    def _(tensors, norm_type, error_if_nonfinite):
        if not tensors:
            return torch.empty((), dtype=torch.float32)
        return torch.empty((), dtype=_result_dtype(torch, tensors), device=tensors[0].device)

    @torch.library.custom_op("gradclip::clip_grads_with_norm_", mutates_args=("grads",),
                             schema="(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()")
    def clip_grads_with_norm_(grads, max_norm, total_norm):
        torch_api.clip_grads_with_norm_(as_params(grads), max_norm, total_norm)

    @clip_grads_with_norm_.register_fake
    def _(grads, max_norm, total_norm):
        return None

    @torch.library.custom_op("gradclip::clip_grad_value_", mutates_args=("grads",),
                             schema="(Tensor(a!)[] grads, float clip_value) -> ()")
    def clip_grad_value_(grads, clip_value):
        torch_api.clip_grad_value_(as_params(grads), clip_value)

    @clip_grad_value_.register_fake
    def _(grads, clip_value):
        return None


# ---- what the drop-ins call while Dynamo traces them ----


def _tensors(items: Any) -> List[Any]:
    torch = sys.modules["torch"]
    return [items] if isinstance(items, torch.Tensor) else list(items)


def _grads(parameters: Any) -> List[Any]:
    return [p.grad for p in _tensors(parameters) if p.grad is not None]


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Any:
    torch = sys.modules["torch"]
    return torch.ops.gradclip.clip_grad_norm_(_grads(parameters), max_norm, norm_type, error_if_nonfinite)


def get_total_norm(tensors: Any, norm_type: float, error_if_nonfinite: bool) -> Any:
    torch = sys.modules["torch"]
    return torch.ops.gradclip.get_total_norm(_tensors(tensors), norm_type, error_if_nonfinite)


def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: Any) -> None:
    torch = sys.modules["torch"]
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(float(total_norm), dtype=torch.float64)  # read exactly, in host memory
    torch.ops.gradclip.clip_grads_with_norm_(_grads(parameters), max_norm, total_norm)


def clip_grad_value_(parameters: Any, clip_value: float) -> None:
    torch = sys.modules["torch"]
    torch.ops.gradclip.clip_grad_value_(_grads(parameters), clip_value)


def use_ops(process_group: Optional[Any] = None, replicated: Optional[Any] = None) -> bool:
    """Whether a drop-in should go through the ops: torch.compile is tracing,
    the ops exist, and nothing asks for the eager-only distributed path. (On
    every eager call: kept to one flag test and one call.)"""
    return _registered and _is_compiling() and process_group is None and replicated is None
