"""The array API: the same fused kernels for NumPy arrays, torch tensors and any
DLPack producer, with NumPy-style names.

NumPy input gives Python floats and NumPy arrays back; torch input gives torch
tensors (on the first tensor's device). Functions ending in ``_`` modify their
arrays in place and validate every array before writing to any.
"""

from __future__ import annotations

from typing import Any, Iterable, Union

from . import _core
from ._inputs import (
    as_list,
    nonfinite_error,
    nonnegative,
    norm_order,
    scalar_result,
    total_is_finite,
    vector_result,
)

__all__ = [
    "global_norm",
    "tensor_norms",
    "clip_by_global_norm_",
    "clip_by_value_",
    "clip_by_norm_",
    "normalize_",
]

Arrays = Union[Any, Iterable[Any]]


def global_norm(arrays: Arrays, ord: float = 2.0) -> Any:
    """The ``ord``-norm of all arrays together, as if concatenated into one vector.

    ``ord`` is any p > 0 or ``inf``. Computed in float64 whatever the dtype, so
    finite inputs never give an inf norm unless the true norm exceeds float64.
    """
    items = as_list(arrays)
    result = _core.clip(items, kind="none", order=norm_order(ord, "ord"), argname="arrays")
    return scalar_result(items, result)


def tensor_norms(arrays: Arrays, ord: float = 2.0) -> Any:
    """The ``ord``-norm of each array, from the same single pass (float64)."""
    items = as_list(arrays)
    result = _core.clip(items, kind="none", order=norm_order(ord, "ord"), argname="arrays", per_tensor=True)
    return vector_result(items, result)


def clip_by_global_norm_(
    arrays: Arrays,
    max_norm: float,
    ord: float = 2.0,
    *,
    eps: float = 1e-6,
    error_if_nonfinite: bool = False,
) -> Any:
    """Scale all arrays by ``min(max_norm / (norm + eps), 1)``, in place, where
    ``norm`` is their global norm; return that pre-clip norm.

    Nothing is written when no clipping is needed. With ``error_if_nonfinite``
    a NaN or inf norm raises ``RuntimeError`` and leaves the arrays untouched;
    otherwise it propagates as in torch (NaN everywhere, or zeros for inf).
    """
    items = as_list(arrays)
    p = norm_order(ord, "ord")
    result = _core.clip(
        items, kind="global", limits=[nonnegative(max_norm, "max_norm")], order=p, eps=nonnegative(eps, "eps"),
        nonfinite="error" if error_if_nonfinite else "propagate", argname="arrays",
    )
    if error_if_nonfinite and not total_is_finite(result):
        raise nonfinite_error(p)
    return scalar_result(items, result)


def clip_by_value_(arrays: Arrays, clip_value: float) -> Any:
    """Clamp every element to ``[-clip_value, clip_value]``, in place.

    Returns True when some element was changed (for CUDA arrays, a 0-d bool
    array on the device, so that the call does not wait for the GPU). NaN
    elements stay NaN.
    """
    items = as_list(arrays)
    v = nonnegative(clip_value, "clip_value")
    result = _core.clip(items, kind="value", limits=[v], argname="arrays", want_changed=True)
    if result.device is not None:
        from . import _device

        return _device.changed(result.device)
    return result.changed


def clip_by_norm_(arrays: Arrays, max_norm: float, ord: float = 2.0, *, eps: float = 1e-6) -> Any:
    """Clip each array on its own (Keras ``clipnorm``): array i is scaled by
    ``min(max_norm / (norm_i + eps), 1)``. Returns the pre-clip norms."""
    items = as_list(arrays)
    result = _core.clip(
        items, kind="per_tensor", limits=[nonnegative(max_norm, "max_norm")], order=norm_order(ord, "ord"),
        eps=nonnegative(eps, "eps"), argname="arrays", per_tensor=True,
    )
    return vector_result(items, result)


def normalize_(arrays: Arrays, target_norm: float = 1.0, ord: float = 2.0) -> Any:
    """Scale all arrays together so that their global norm becomes
    ``target_norm``; return the norm before. All-zero input is left as it is."""
    items = as_list(arrays)
    result = _core.clip(
        items, kind="normalize", limits=[nonnegative(target_norm, "target_norm")], order=norm_order(ord, "ord"),
        argname="arrays",
    )
    return scalar_result(items, result)
