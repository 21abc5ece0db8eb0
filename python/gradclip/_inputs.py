"""Helpers shared by the torch drop-ins and the array API: argument checks and
turning native results (:class:`gradclip._core.Result`) into the caller's
framework types."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from . import _core

_F32_MAX = float(np.finfo(np.float32).max)


def as_list(items: Any) -> Sequence[Any]:
    """One tensor/array becomes a one-element list; other iterables (generators
    such as ``model.parameters()``) are materialised once."""
    if is_array_like(items):
        return [items]
    if isinstance(items, (list, tuple)):
        return items
    return list(items)


def is_array_like(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or hasattr(obj, "__dlpack__")


def norm_order(value: Any, argname: str) -> float:
    """float(value), so ``'inf'`` works as in torch; only p > 0 and inf are norms."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a number or 'inf', got {value!r}") from None
    if not p > 0:
        raise ValueError(f"{argname} must be > 0 or inf, got {value!r}")
    return p


def nonnegative(value: Any, argname: str) -> float:
    """A limit such as max_norm or clip_value: a number >= 0 (inf allowed, NaN not)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a number, got {value!r}") from None
    if not v >= 0:
        raise ValueError(f"{argname} must be >= 0 (and not NaN), got {value!r}")
    return v


def nonfinite_error(norm_type: float) -> RuntimeError:
    # torch's wording, so code that matches on it keeps working.
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
        "so it cannot be clipped. To disable this error and scale the gradients by the "
        "non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def _torch_if_tensor(obj: Any):
    """The torch module when `obj` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return torch
    return None


def torch_scalar(torch: Any, value: float, result: "_core.Result", device: Any) -> Any:
    """A 0-d norm tensor: float64 when any input is float64, else float32 (also
    for 16-bit inputs, whose norm torch would round to 16 bits)."""
    dtype = torch.float64 if result.result_f64 else torch.float32
    if dtype is torch.float32 and abs(value) > _F32_MAX:
        # Round to float32 as torch.tensor() would: up to max + half an ulp the
        # result is float32's max, beyond it inf (scalar_tensor would raise).
        value = float("inf") if not _core.finite_as_reported(value, True) else _F32_MAX
    if device.type == "cpu":
        return torch.scalar_tensor(value, dtype=dtype)  # ~1.6 us; torch.tensor() takes ~4 us
    return torch.scalar_tensor(value, dtype=dtype, device=device)


def total_of(result: "_core.Result") -> Any:
    """The total norm of a native result: a float, or a 0-d device array for CUDA input."""
    if result.device is not None:
        from . import _device

        return _device.total(result.device)
    return result.total


def total_is_finite(result: "_core.Result") -> bool:
    """Whether the total norm is finite as reported: in float32 unless an input
    is float64 (the native rule, finite_as_reported, that also decides whether
    to hold the gradients). For CUDA input this waits for the device (the one
    host sync ``error_if_nonfinite=True`` needs)."""
    return _core.finite_as_reported(float(total_of(result)), not result.result_f64)


def scalar_result(items: Sequence[Any], result: "_core.Result") -> Any:
    """A total norm in the caller's framework: a 0-d tensor for torch input
    (on the first tensor's device), a 0-d device array for CUDA input, a
    Python float otherwise."""
    if result.device is not None:
        return total_of(result)
    value = result.total
    index = result.first_index
    torch = _torch_if_tensor(items[index]) if index >= 0 else None
    if torch is None:
        return value
    return torch_scalar(torch, value, result, items[index].device)


def vector_result(items: Sequence[Any], result: "_core.Result") -> Any:
    """Per-tensor norms: a NumPy array (float64), a torch tensor for torch input,
    or a device array for CUDA input (float32, or float64 for float64 input)."""
    if result.device is not None:
        from . import _device

        return _device.per_tensor(result.device)
    values = result.norms
    index = result.first_index
    torch = _torch_if_tensor(items[index]) if index >= 0 else None
    if torch is None:
        return values
    return torch.from_numpy(values).to(items[index].device)
