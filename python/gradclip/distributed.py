"""Gradient norms over process groups and DTensor meshes, on the engine's seam.

Every rank reduces the tensors it holds (its shards of plain tensors, the local
shard of each DTensor) with the fused kernels. The partial power sums of all
ranks are gathered (one ``all_gather`` per process group, one over a mesh that
spans the world), and every rank finishes with the same stack of partials
(``gradclip._seam``): the same total, the same coefficient, the same decision
on a nonfinite norm. Partial sums carry their own scale, so shards of float64
gradients near 1e200 combine to the finite norm, as in one process.

How the gathered partials count (the rules torch's DTensor norms follow):

* a DTensor's mesh dimension with ``Shard`` placement: summed over that dimension;
* ``Replicate``: counted once (the rank at coordinate 0 of that dimension);
* ``Partial``: the gradient is reduced first (``redistribute``, as torch does),
  the norm taken from the reduced copy, and the local partial values scaled
  by the same coefficient (scaling commutes with the pending sum);
* plain tensors with ``process_group``: disjoint shards, summed over every
  group given; those named in ``replicated`` are held whole by every rank of
  the first group and counted once.

Used by the torch drop-ins and the training front end when a gradient is a
DTensor or a ``process_group`` is given; the per-tensor norms they report are
those of the local shards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core, _seam

__all__ = ["combined_clip", "dtensor_type", "is_dtensor", "local_tensors", "process_groups"]


def dtensor_type():
    """torch's DTensor class, or None when torch.distributed.tensor was never imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: Any) -> bool:
    DTensor = dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def local_tensors(items: Sequence[Any], *, grad_attr: bool, elementwise: bool = False) -> List[Any]:
    """Each item (its ``.grad``) as memory gradclip can write: a DTensor's local
    shard, any other tensor as it is (None stays None). ``elementwise``: for an
    operation on each element (value clipping), which a DTensor with a Partial
    placement (values still to be summed across ranks) cannot take."""
    out = []
    for i, item in enumerate(items):
        t = getattr(item, "grad", None) if grad_attr else item
        if is_dtensor(t):
            if elementwise and any(p.is_partial() for p in t.placements):
                suffix = ".grad" if grad_attr else ""
                raise ValueError(f"parameters[{i}]{suffix}: a DTensor with a Partial placement holds values still to "
                                 "be summed across ranks; clamping them is not clamping the gradient (reduce it "
                                 "first, e.g. .redistribute(placements=[Replicate()]))")
            t = t.to_local()
        out.append(t)
    return out


def process_groups(process_group: Any) -> List[Any]:
    """``process_group`` as a list of groups: a ProcessGroup, a DeviceMesh (all
    its dimensions), or a sequence of them (e.g. a data-parallel shard group
    and the pipeline stages)."""
    if process_group is None:
        return []
    items = list(process_group) if isinstance(process_group, (list, tuple)) else [process_group]
    groups: List[Any] = []
    for g in items:
        if hasattr(g, "get_group") and hasattr(g, "ndim"):  # a DeviceMesh
            groups.extend(g.get_group(d) for d in range(g.ndim))
        else:
            groups.append(g)
    return groups


@dataclass
class _Part:
    """Tensors reduced together and counted alike: one reduction."""

    key: Tuple[Any, ...]
    items: List[int] = field(default_factory=list)
    partial_dims: bool = False  # DTensors with a Partial placement: reduced copies, scaled originals


def _gather(x, group):
    """All ranks' ``x`` stacked along a new first axis, in rank order of ``group``."""
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


def _gather_mesh(x, mesh):
    """``x`` of every rank of ``mesh``, as an array indexed by mesh coordinate
    first: one collective when the mesh spans the world (the usual case)."""
    import torch
    import torch.distributed as dist

    ranks = mesh.mesh.reshape(-1)
    if ranks.numel() == dist.get_world_size():
        every = _gather(x, None)  # by global rank
        if not torch.equal(ranks, torch.arange(ranks.numel())):
            every = every[ranks.to(every.device)]
        return every.reshape(*mesh.shape, *x.shape)
    for d in reversed(range(mesh.ndim)):  # the last dimension innermost
        x = _gather(x, mesh.get_group(d))
    return x


def _labels(argname: str, grad_attr: bool):
    suffix = ".grad" if grad_attr else ""
    return lambda i: f"{argname}[{i}]{suffix}"


def combined_clip(
    items: Sequence[Any],
    *,
    kind: str,
    limits: Sequence[float],
    order: float,
    eps: float,
    nonfinite: str,
    argname: str,
    grad_attr: bool,
    process_group: Any = None,
    replicated: Any = None,
    group_of_item: Optional[np.ndarray] = None,
    report: bool = False,
):
    """One clip over the ranks: returns ``(result, total)``. ``result`` merges
    the parts' Results (report fields in list order); ``total`` is the global
    norm as a 0-d tensor on the gradients' device (a replicated DTensor when
    the gradients are DTensors)."""
    import torch

    label = _labels(argname, grad_attr)
    groups = process_groups(process_group)
    DTensor = dtensor_type()
    replicated_ids = {id(t) for t in (replicated or ())}
    n_groups = len(limits) if group_of_item is not None else 1

    tensors: List[Any] = [None] * len(items)
    originals: List[Any] = [None] * len(items)  # what the writes go to (a Partial DTensor's local values)
    parts: Dict[Tuple[Any, ...], _Part] = {}
    mesh = None
    first_plain = first_dtensor = None
    for i, item in enumerate(items):
        if grad_attr and not hasattr(item, "grad"):
            raise TypeError(f"{argname}[{i}]: {type(item).__name__} has no .grad attribute; expected a tensor or parameter")
        t = item.grad if grad_attr else item
        if t is None:
            if not grad_attr:
                raise TypeError(f"{label(i)}: is None; expected a tensor or array")
            continue
        if DTensor is not None and isinstance(t, DTensor):
            if mesh is None:
                mesh, first_dtensor = t.device_mesh, i
            elif t.device_mesh != mesh:
                raise ValueError(f"{label(i)}: a DTensor on another device mesh than {label(first_dtensor)}; "
                                 "one call combines the norms over one mesh")
            placements = tuple(t.placements)
            partial = any(p.is_partial() for p in placements)
            originals[i] = t.to_local()
            if partial:
                from torch.distributed.tensor import Replicate

                reduced = t.redistribute(mesh, [Replicate() if p.is_partial() else p for p in placements])
                tensors[i] = reduced.to_local()
                placements = tuple(reduced.placements)
            else:
                tensors[i] = originals[i]
            key = ("dtensor", placements, partial)
        else:
            if first_plain is None:
                first_plain = i
            tensors[i] = originals[i] = t
            key = ("replicated",) if (id(item) in replicated_ids or id(t) in replicated_ids) else ("sharded",)
        part = parts.setdefault(key, _Part(key, partial_dims=key[0] == "dtensor" and key[2]))
        part.items.append(i)
    if mesh is not None and first_plain is not None:
        raise ValueError(f"{label(first_plain)}: a plain tensor among DTensor gradients (e.g. {label(first_dtensor)}); "
                         "torch cannot combine them either: make every gradient a DTensor on one mesh, or pass the "
                         "local tensors with process_group=")
    if mesh is not None and groups:
        raise ValueError("process_group: the gradients are DTensors, whose mesh already says how to combine them; "
                         "leave process_group out")
    if mesh is None and not groups:
        # Not DTensors, so the routing's tensors without memory are refused here,
        # with the intake's own message; plain ones need a group.
        plain = [i for part in parts.values() for i in part.items]
        _core.clip(items, kind="none", argname=argname, grad_attr=grad_attr, items=plain)
        raise ValueError("process_group: plain tensors need the group(s) they are sharded over")
    if kind == "per_tensor":
        raise ValueError("kind 'per_tensor' (clipnorm) over sharded tensors is not available yet: each tensor's norm "
                         "would need its own combine")

    # Every rank must make the same collectives with the same shapes: plain
    # tensors always form both parts (sharded, replicated), empty or not;
    # DTensors form one part per placement, the same on every rank that holds
    # the same parameters.
    if mesh is None:
        for key in (("sharded",), ("replicated",)):
            parts.setdefault(key, _Part(key))
        ordered = [parts[("sharded",)], parts[("replicated",)]]
    else:
        ordered = sorted(parts.values(), key=lambda p: p.items[0])
    local = [
        _seam.reduce(tensors, order=order, argname=argname, nonfinite=nonfinite, group_of_item=group_of_item,
                     n_groups=n_groups, only=part.items) if part.items else None
        for part in ordered
    ]
    device = next((tensors[p.items[0]].device for p in ordered if p.items), torch.device("cpu"))
    # An empty part's partial is the identity of the fold, (0, 1), made where
    # the others lie (a copy from the host would wait for the device).
    empty = torch.zeros(n_groups, 2, dtype=torch.float64, device=device)
    empty[:, 1] = 1.0
    x = torch.stack([torch.as_tensor(n.partials).to(device) if n is not None else empty for n in local])
    if mesh is not None:
        gathered = _gather_mesh(x, mesh)  # (*mesh.shape, parts, groups, 2)
        picks = []
        for c, part in enumerate(ordered):
            placements = part.key[1]
            index = tuple(0 if p.is_replicate() else slice(None) for p in placements) + (c,)
            picks.append(gathered[index].reshape(-1, n_groups, 2))
    else:
        gathered = x
        for g in reversed(groups):
            gathered = _gather(gathered, g)  # (*group sizes, parts, groups, 2)
        picks = []
        for c, part in enumerate(ordered):
            index = ((0,) if part.key == ("replicated",) else ()) + (Ellipsis, c, slice(None), slice(None))
            picks.append(gathered[index].reshape(-1, n_groups, 2))
    stack = torch.cat(picks).contiguous()

    result_f64 = any(tensors[i].dtype == torch.float64 for part in ordered for i in part.items)
    finished = []
    for n, part in zip(local, ordered):
        if n is None:
            continue
        part_kind = "none" if part.partial_dims else kind
        finished.append((part, n.finish(kind=part_kind, limits=limits if part_kind != "none" else (), eps=eps,
                                        nonfinite=nonfinite, combined=stack, report=report, result_f64=result_f64)))
    if not finished:  # this rank holds no gradient: the total from the stack alone
        return _merge([]), _total_tensor(torch, None, device, result_f64, stack, order)
    results = [r for _, r in finished]
    total = _total_tensor(torch, results[0], device, result_f64)
    if kind == "global" and not results[0].held:
        for part, _ in finished:  # Partial DTensors: their pending sums scale with their local values
            if part.partial_dims:
                _core.clip(originals, kind="global", limits=list(limits)[:1], eps=eps, given_norm=total,
                           argname=argname, items=part.items)
    if mesh is not None:
        from torch.distributed.tensor import DTensor as _DTensor, Replicate

        total = _DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return _merge(results), total


def _total_tensor(torch, result, device, result_f64: bool, stack=None, order: float = 2.0):
    """The total of a finished part as a 0-d tensor on the gradients' device;
    without a part, the norm of the stack itself (an empty list's reduction
    finished with it)."""
    from ._inputs import total_of

    if result is None:
        result = _seam.reduce([], order=order, argname="tensors").finish(kind="none", combined=stack.cpu())
    total = total_of(result)
    dtype = torch.float64 if result_f64 else torch.float32
    if isinstance(total, float):
        return torch.tensor(total, dtype=dtype, device=device)
    return torch.as_tensor(total).to(dtype)


def _merge(results) -> SimpleNamespace:
    """One Result-like record of several parts' Results (in list order)."""
    if not results:
        empty = np.zeros(0)
        return SimpleNamespace(count=0, first_index=-1, result_f64=False, total=0.0, device=None, norms=empty,
                               indices=empty.astype(np.int32), group_norms=None, group_coefs=None, coefs=None,
                               nonfinite=False, held=False, nonfinite_indices=empty.astype(np.int32),
                               written=False, changed=False, zeroed=0)
    first = results[0]

    def joined(name, dtype):
        arrays = [getattr(r, name) for r in results]
        if any(a is None for a in arrays):
            return None
        return np.concatenate([np.asarray(a) for a in arrays]).astype(dtype, copy=False)

    indices = joined("indices", np.int32)
    norms = joined("norms", np.float64)
    coefs = joined("coefs", np.float64)
    if indices is not None and len(results) > 1:
        order = np.argsort(indices, kind="stable")
        indices, norms = indices[order], norms[order] if norms is not None else None
        coefs = coefs[order] if coefs is not None else None
    nonfinite_indices = joined("nonfinite_indices", np.int32)
    if nonfinite_indices is not None:
        nonfinite_indices = np.sort(nonfinite_indices)
    return SimpleNamespace(
        count=sum(r.count for r in results),
        first_index=min((r.first_index for r in results if r.first_index >= 0), default=-1),
        result_f64=first.result_f64,
        total=first.total,
        device=first.device,
        norms=norms,
        indices=indices,
        group_norms=first.group_norms,
        group_coefs=first.group_coefs,
        coefs=coefs,
        nonfinite=any(r.nonfinite for r in results),
        held=any(r.held for r in results),
        nonfinite_indices=nonfinite_indices,
        written=any(r.written for r in results),
        changed=any(r.changed for r in results),
        zeroed=sum(r.zeroed for r in results),
    )
