"""Drop-in replacements for ``torch.nn.utils.clip_grad_norm_`` and friends.

Same signatures and semantics as torch 2.13, one fused native call per list.
Deliberate differences (see README, "Differences from torch"):

* 16-bit gradients give a float32 total norm (torch's 16-bit norm overflows to
  inf at 65504 and then zeroes every gradient).
* A negative or NaN ``max_norm`` / ``clip_value`` raises ``ValueError``.
* The same tensor listed twice is counted once and scaled once.
* ``foreach`` is accepted and ignored: every call is fused.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, Union

from . import _core
from ._inputs import (
    as_list,
    is_array_like,
    nonfinite_error,
    nonnegative,
    norm_order,
    torch_scalar,
    total_is_finite,
    total_of,
)

if TYPE_CHECKING:
    import torch

    TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]
else:
    TensorOrTensors = Any

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]

_EPS = 1e-6  # torch's: coef = max_norm / (total_norm + 1e-6)


def _total_as_tensor(items, info, of_grads: bool) -> "torch.Tensor":
    """The total norm on the first gradient's (or, for get_total_norm, tensor's)
    device; CUDA results are already there, computed without a host sync."""
    import torch

    if info["count"] == 0:
        return torch.tensor(0.0)
    total = total_of(info)
    if not isinstance(total, float):
        return total
    first = items[info["first_index"]]
    device = first.grad.device if of_grads else first.device
    return torch_scalar(torch, total, info, device)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> "torch.Tensor":
    """Clip the gradient norm of an iterable of parameters, in place.

    The norm is computed over all gradients together, as if they were
    concatenated into one vector, and every gradient is multiplied by
    ``min(max_norm / (total_norm + 1e-6), 1)``. When that coefficient is 1 no
    gradient memory is written. Parameters whose ``.grad`` is None are skipped.

    Args:
        parameters: a tensor, or an iterable of tensors (e.g. ``model.parameters()``).
        max_norm: the largest allowed norm, >= 0.
        norm_type: p of the p-norm, > 0; ``float('inf')`` or ``'inf'`` for the max norm.
        error_if_nonfinite: raise ``RuntimeError`` (before touching any gradient)
            when the total norm is NaN or inf.
        foreach: accepted for compatibility and ignored (always fused).

    Returns:
        The total norm before clipping, a 0-d tensor on the first gradient's
        device: float64 if any gradient is float64, else float32.
    """
    del foreach
    is_generator = isinstance(parameters, types.GeneratorType)
    params = as_list(parameters)
    if is_generator and len(params) == 0:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    p = norm_order(norm_type, "norm_type")
    limit = nonnegative(max_norm, "max_norm")
    try:
        info = _core.clip_norm(params, limit, p, _EPS, "global", "parameters", True, False, bool(error_if_nonfinite))
    except _core.MixedDevicesError:
        return _clip_across_devices(params, limit, p, bool(error_if_nonfinite))
    if error_if_nonfinite and not total_is_finite(info):
        raise nonfinite_error(p)
    return _total_as_tensor(params, info, of_grads=True)


def _by_device(tensors) -> List[List[Any]]:
    """The tensors grouped by device, first device first."""
    groups: Dict[Any, List[Any]] = {}
    for t in tensors:  # something without a device (None, a list) is refused in its group
        groups.setdefault(getattr(t, "device", None), []).append(t)
    return list(groups.values())


def _grads_by_device(params) -> List[Tuple[Any, List[Any]]]:
    """(device, group) per gradient device, first device first. Each group is as
    long as ``params``: the other devices' parameters are replaced by a stand-in
    without a gradient (skipped, like any parameter without one), so an error
    still names the caller's list index. An item without a ``.grad`` attribute
    stays in every group, to be refused there."""
    devices: List[Any] = []
    for item in params:
        g = getattr(item, "grad", None)
        if g is not None and g.device not in devices:
            devices.append(g.device)

    def on(item: Any, device: Any) -> bool:
        if not hasattr(item, "grad"):
            return True
        return item.grad is not None and item.grad.device == device

    return [(d, [item if on(item, d) else _NO_GRAD for item in params]) for d in devices]


_NO_GRAD = types.SimpleNamespace(grad=None)


def _validate_for_writing(groups) -> None:
    """Checks every device group's gradients as writable (a coefficient of 1
    writes nothing), so that no gradient changes before all of them are checked."""
    for _, group in groups:
        _core.scale(group, 1.0, "parameters", True)


def _total_across_devices(groups: List[List[Any]], p: float, of_grads: bool) -> "torch.Tensor":
    """torch's scheme for several devices: each device's norm, moved to the first
    device and combined there. For gradients each group is validated for writing
    (a limit of inf writes nothing), so no gradient changes before all are checked."""
    import torch

    norms = []
    for group in groups:
        if of_grads:
            info = _core.clip_norm(group, math.inf, p, _EPS, "global", "parameters", True, False, True)
        else:
            info = _core.norms(group, p, "tensors", False, False)
        norms.append(_total_as_tensor(group, info, of_grads))
    first = norms[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(first, dtype) for n in norms]), p)


def _clip_across_devices(params, limit: float, p: float, error_if_nonfinite: bool) -> "torch.Tensor":
    groups = _grads_by_device(params)
    total = _total_across_devices([group for _, group in groups], p, of_grads=True)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise nonfinite_error(p)
    _scale_across_devices(groups, limit, total)
    return total


def _scale_by_norm(params, limit: float, total: Any) -> None:
    """Scale by the clip coefficient of ``total``: a float, or a 0-d tensor read
    where it lies (on CUDA the coefficient is computed on the device)."""
    if is_array_like(total):
        _core.scale_by_norm(params, limit, total, _EPS, "parameters", True)
    else:
        _core.scale(params, _core.clip_coefficient(limit, float(total), _EPS), "parameters", True)


def _scale_across_devices(groups, limit: float, total: Any) -> None:
    """Each device's gradients scaled by the coefficient of ``total``, which
    (when a tensor) is copied to each device, as torch does."""
    for device, group in groups:
        _scale_by_norm(group, limit, total.to(device) if is_array_like(total) else total)


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> "torch.Tensor":
    """The norm of the given tensors (not their ``.grad``) viewed as one vector.

    Same arguments and result as ``torch.nn.utils.get_total_norm``; an empty
    list gives ``torch.tensor(0.0)``.
    """
    del foreach
    items = as_list(tensors)
    p = norm_order(norm_type, "norm_type")
    try:
        info = _core.norms(items, p, "tensors", False, False)
    except _core.MixedDevicesError:
        total = _total_across_devices(_by_device(items), p, of_grads=False)
        if error_if_nonfinite and not math.isfinite(float(total)):
            raise nonfinite_error(p)
        return total
    if error_if_nonfinite and not total_is_finite(info):
        raise nonfinite_error(p)
    return _total_as_tensor(items, info, of_grads=False)


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Union[float, "torch.Tensor"],
    foreach: Optional[bool] = None,
) -> None:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)``, given a
    precomputed total norm (e.g. from :func:`get_total_norm`). Nothing is
    written when the coefficient is 1."""
    del foreach
    params = as_list(parameters)
    limit = nonnegative(max_norm, "max_norm")
    try:
        _scale_by_norm(params, limit, total_norm)
    except _core.MixedDevicesError:
        groups = _grads_by_device(params)
        _validate_for_writing(groups)
        _scale_across_devices(groups, limit, total_norm)


def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: Optional[bool] = None,
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, in place.

    The bound is first rounded to each gradient's dtype, as torch does; NaN
    elements stay NaN. Blocks with nothing to clamp are not written.
    """
    del foreach
    params = as_list(parameters)
    v = nonnegative(clip_value, "clip_value")
    try:
        _core.clamp(params, v, "parameters", True, False)
    except _core.MixedDevicesError:  # torch clamps each device's gradients on that device
        groups = _grads_by_device(params)
        _validate_for_writing(groups)
        for _, group in groups:
            _core.clamp(group, v, "parameters", True, False)
