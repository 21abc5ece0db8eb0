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

import types
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from . import _core, _seam, distributed, torch_ops
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


def _total_as_tensor(items, result, of_grads: bool) -> "torch.Tensor":
    """The total norm on the first gradient's (or, for get_total_norm, tensor's)
    device; CUDA results are already there, computed without a host sync."""
    import torch

    if result.count == 0:
        return torch.tensor(0.0)
    total = total_of(result)
    if not isinstance(total, float):
        return total
    first = items[result.first_index]
    if not of_grads and not isinstance(first, torch.Tensor):
        # torch's get_total_norm raises TypeError for NumPy arrays (nothing is written here).
        raise TypeError(f"tensors[{result.first_index}]: {type(first).__module__}.{type(first).__name__} is not "
                        "a torch tensor; for NumPy arrays and other DLPack producers use gradclip.global_norm")
    device = first.grad.device if of_grads else first.device
    return torch_scalar(torch, total, result, device)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    process_group: Any = None,
    replicated: Optional[Iterable[Any]] = None,
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
        process_group: the gradients are disjoint shards of one model's over
            this group (a ProcessGroup, a DeviceMesh, or a sequence of them,
            e.g. the shard group and the pipeline stages): the norm is the
            global one, and every rank takes the same decision. DTensor
            gradients need none: their mesh says how to combine.
        replicated: the parameters (or gradients) every rank of the first
            group holds whole, counted once.

    Returns:
        The total norm before clipping, a 0-d tensor on the first gradient's
        device: float64 if any gradient is float64, else float32; for DTensor
        gradients a replicated DTensor, as torch returns.
    """
    del foreach
    if torch_ops.use_ops(process_group, replicated):  # traced by torch.compile: one custom op
        return torch_ops.clip_grad_norm_(parameters, nonnegative(max_norm, "max_norm"),
                                         norm_order(norm_type, "norm_type"), bool(error_if_nonfinite))
    torch_ops.register()
    is_generator = isinstance(parameters, types.GeneratorType)
    params = as_list(parameters)
    if is_generator and len(params) == 0:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    p = norm_order(norm_type, "norm_type")
    limit = nonnegative(max_norm, "max_norm")
    nonfinite = _NONFINITE[bool(error_if_nonfinite)]
    if process_group is None and replicated is None:
        total = clip_norm_local(params, limit, p, nonfinite, of_grads=True)
        if total is not None:
            return total
    # DTensor gradients, or shards over process groups: one combine over the ranks.
    result, total = distributed.combined_clip(params, kind="global", limits=[limit], order=p, eps=_EPS,
                                              nonfinite=nonfinite, argname="parameters", grad_attr=True,
                                              process_group=process_group, replicated=replicated)
    if error_if_nonfinite and result.count and not total_is_finite(result):
        raise nonfinite_error(p)
    return total


# What a nonfinite total does, by error_if_nonfinite: hold (write nothing, then
# raise), or propagate as torch does.
_NONFINITE = {True: "error", False: "propagate"}


def clip_norm_local(items, limit: float, p: float, nonfinite: str, of_grads: bool) -> Optional["torch.Tensor"]:
    """torch's global-norm clip of ``items`` (their ``.grad`` when ``of_grads``)
    in this process; returns the total norm as torch does, or None when a
    DTensor (memory this process cannot read whole) needs the distributed path."""
    argname = "parameters" if of_grads else "tensors"
    result = _core.clip(items, kind="global", limits=[limit], order=p, eps=_EPS, nonfinite=nonfinite,
                        argname=argname, grad_attr=of_grads, split_devices=True)
    if result.items_by_device is None:
        if nonfinite == "error" and not total_is_finite(result):
            raise nonfinite_error(p)
        return _total_as_tensor(items, result, of_grads=of_grads)
    if _core.NO_MEMORY not in result.devices:
        return _clip_across_devices(items, result, limit, p, nonfinite, of_grads)
    return None


def _combine_across_devices(params, split, p: float, of_grads: bool, nonfinite: str = "propagate"):
    """torch's scheme for lists over several devices, on the engine's seam:
    each device's tensors reduced where they lie, every device's partial power
    sums stacked in list order on each device (no host sync), and each device
    finished with that same stack, so all of them see one total, in the result
    dtype of the whole list (``split``, the routing Result). Returns a
    finisher per device: ``finish(kind, limits)`` -> its Result."""
    import torch

    argname = "parameters" if of_grads else "tensors"
    local = [_seam.reduce(params, order=p, argname=argname, grad_attr=of_grads, nonfinite=nonfinite, only=items)
             for items in split.items_by_device]
    parts = [torch.as_tensor(n.partials) for n in local]
    result_f64 = split.result_f64

    def finisher(k: int):
        device = parts[k].device
        stack = torch.stack([q.to(device) for q in parts])
        return lambda **kw: local[k].finish(combined=stack, result_f64=result_f64, eps=_EPS, nonfinite=nonfinite, **kw)

    return [finisher(k) for k in range(len(local))]


def _clip_across_devices(params, split, limit: float, p: float, nonfinite: str, of_grads: bool) -> "torch.Tensor":
    finishers = _combine_across_devices(params, split, p, of_grads=of_grads, nonfinite=nonfinite)
    # Every device holds, or none does: they finish with the same stack.
    results = [finish(kind="global", limits=[limit]) for finish in finishers]
    total = _total_as_tensor(params, results[0], of_grads=of_grads)
    if nonfinite == "error" and not total_is_finite(results[0]):
        raise nonfinite_error(p)
    return total


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    process_group: Any = None,
    replicated: Optional[Iterable[Any]] = None,
) -> "torch.Tensor":
    """The norm of the given tensors (not their ``.grad``) viewed as one vector.

    Same arguments and result as ``torch.nn.utils.get_total_norm``; an empty
    list gives ``torch.tensor(0.0)``. ``process_group`` and ``replicated`` as
    for :func:`clip_grad_norm_` (DTensors combine over their mesh).
    """
    del foreach
    if torch_ops.use_ops(process_group, replicated):
        return torch_ops.get_total_norm(tensors, norm_order(norm_type, "norm_type"), bool(error_if_nonfinite))
    torch_ops.register()
    items = as_list(tensors)
    p = norm_order(norm_type, "norm_type")
    if process_group is None and replicated is None:
        result = _core.clip(items, kind="none", order=p, argname="tensors", split_devices=True)
    else:
        result = None
    if result is None or (result.items_by_device is not None and _core.NO_MEMORY in result.devices):
        result, total = distributed.combined_clip(items, kind="none", limits=(), order=p, eps=0.0,
                                                  nonfinite="propagate", argname="tensors", grad_attr=False,
                                                  process_group=process_group, replicated=replicated)
        if error_if_nonfinite and result.count and not total_is_finite(result):
            raise nonfinite_error(p)
        return total
    if result.items_by_device is not None:
        first_device = _combine_across_devices(items, result, p, of_grads=False)[0]
        result = first_device(kind="none")
    if error_if_nonfinite and not total_is_finite(result):
        raise nonfinite_error(p)
    return _total_as_tensor(items, result, of_grads=False)


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
    if torch_ops.use_ops():
        return torch_ops.clip_grads_with_norm_(parameters, nonnegative(max_norm, "max_norm"), total_norm)
    torch_ops.register()
    params = as_list(parameters)
    limit = nonnegative(max_norm, "max_norm")
    if not is_array_like(total_norm):
        total_norm = float(total_norm)
    elif distributed.is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # replicated: the local value is the norm
    result = _core.clip(params, kind="global", limits=[limit], eps=_EPS, given_norm=total_norm,
                        argname="parameters", grad_attr=True, split_devices=True)
    if result.items_by_device is None:
        return
    grads = distributed.local_tensors(params, grad_attr=True)  # a DTensor's local shard, else the gradient
    # torch copies a tensor norm to each device and scales each device's gradients there.
    for items in result.items_by_device:
        device = grads[items[0]].device
        norm = total_norm.to(device) if is_array_like(total_norm) else total_norm
        _core.clip(grads, kind="global", limits=[limit], eps=_EPS, given_norm=norm, argname="parameters",
                   items=items)


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
    if torch_ops.use_ops():
        return torch_ops.clip_grad_value_(parameters, nonnegative(clip_value, "clip_value"))
    torch_ops.register()
    params = as_list(parameters)
    v = nonnegative(clip_value, "clip_value")
    result = _core.clip(params, kind="value", limits=[v], argname="parameters", grad_attr=True, split_devices=True)
    if result.items_by_device is None:
        return
    # torch clamps each device's gradients on that device, and a DTensor's on its local shards.
    grads = distributed.local_tensors(params, grad_attr=True, elementwise=True)
    for items in result.items_by_device:
        _core.clip(grads, kind="value", limits=[v], argname="parameters", items=items)
