"""Norms measured during backward, so that the step finds them already known:
in one process each large gradient's power sum is read by a post-accumulate-grad
hook, right after autograd wrote it (still in cache); under DDP each bucket is
read by its communication hook, right after the all-reduce (the final gradient)."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .. import _core

# Gradients smaller than this are left to the step's one fused call. A hook costs
# ~3.5 us a tensor here (the Python call, a native reduce, the bookkeeping; 2-core
# Xeon), which is what reading ~80 KB from memory costs at ~22 GB/s: from 32768
# float32 elements (128 KB) up, measuring in the hook is cheaper than at the step.
MIN_ELEMENTS = 1 << 15

# Gradients up to this size are read on the calling thread alone: a hook runs inside
# backward, right after the GEMM that made the gradient, while torch's OpenMP workers
# still spin, and waking gradclip's workers there cost more than it saved (32 x 4 MiB
# fp32 gradients, 2-core Xeon: +23.9 ms an iteration with the workers, +9.9 ms
# without); larger ones (16 MiB) read faster with them.
ONE_THREAD_BYTES = 4 << 20


@contextlib.contextmanager
def _threads_for(nbytes: int):
    """gradclip's threads for reading ``nbytes`` inside backward (see ONE_THREAD_BYTES)."""
    cap = _core.limit_calling_thread(1 if nbytes <= ONE_THREAD_BYTES else 0)
    try:
        yield
    finally:
        _core.limit_calling_thread(cap)

# One measurement: the gradient tensor it read (identity), that tensor's version
# counter then, its partial power sum row (sum, base), its norm, and whether it was
# nonfinite.
Measured = Tuple[Any, int, Any, float, bool]


class Measurements:
    """Measurements by parameter, each used once, and only while still true: the
    same gradient tensor at the same version (an in-place torch op, such as
    GradScaler's unscale_, bumps the version, and a replaced ``.grad`` is
    another tensor)."""

    hooked = 0
    used = 0  # measurements the steps have used, all told
    _measured: Dict[int, Measured]

    def take(self, param: Any) -> Optional[Measured]:
        """The measurement of ``param``'s current gradient, if one is still
        true; it is used up either way."""
        m = self._measured.pop(id(param), None)
        if m is None or m[0] is not param.grad or m[0]._version != m[1]:
            return None
        self.used += 1
        return m

    def usable(self) -> bool:
        return True

    def clear(self) -> None:
        self._measured.clear()

    def remove(self) -> None:
        self._measured.clear()


class BackwardNorms(Measurements):
    """Post-accumulate-grad hooks on the large CPU parameters of ``params``.

    Not among several ranks: a collective writing into a gradient does not bump its
    version, so a measurement could not tell it went stale. Under gradient
    accumulation every micro-batch's backward measures again, so the last one, of
    the final gradient, is what the step uses."""

    def __init__(self, params: Iterable[Any], order: float):
        if not self.usable():
            raise ValueError(
                "measure_in_backward=True: this process is one of several ranks, where DDP may reduce a gradient "
                "in place after the hook read it without telling autograd (its all-reduce does not bump the "
                "tensor's version), so a measurement could be of the local gradient; pass the "
                "DistributedDataParallel model instead (measure_in_backward=ddp_model), whose buckets are "
                "measured once reduced")
        self._order = order
        self._measured: Dict[int, Measured] = {}
        self._handles: List[Any] = []
        for p in params:
            if p.requires_grad and p.device.type == "cpu" and p.numel() >= MIN_ELEMENTS:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))
        self.hooked = len(self._handles)

    def _on_gradient(self, param: Any) -> None:
        grad = param.grad
        with _threads_for(grad.numel() * grad.element_size()):
            reduction = _core.reduce([param], order=self._order, nonfinite="propagate", group_of_item=None,
                                     n_groups=1, argname="parameters", grad_attr=True, items=None)
            norm, nonfinite = reduction.summary()
        self._measured[id(param)] = (grad, grad._version, reduction.group_partials()[0], norm, nonfinite)

    def usable(self) -> bool:
        """Whether measurements can be trusted: not in a group of several ranks."""
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._measured.clear()


class _Pass:
    """One backward's bucket measurements, until sealed."""

    def __init__(self, task: int, spoiled: bool):
        self.task = task  # the autograd graph task whose callbacks seal it
        self.spoiled = spoiled  # nothing of it is used
        self.before: Dict[int, Tuple[Any, Optional[int]]] = {}  # id(p) -> (.grad, its version) at the hook
        self.fresh: Dict[int, Tuple[Any, Any, float, bool]] = {}  # id(p) -> (p, row, norm, nonfinite)


class ReducedBucketNorms(Measurements):
    """A DDP communication hook that all-reduces each bucket as torch's
    ``allreduce_hook`` does (divide by the group's size, then sum), then reads every
    gradient's power sum in the reduced bucket, one native call a bucket, in the
    all-reduce's completion callback (on the communication thread).

    What the step uses must be the gradient the optimizer will read: DDP copies the
    reduced bucket into ``.grad`` (or makes ``.grad`` a view of it) in its finalize,
    a callback the autograd engine runs at the end of backward, after callbacks
    queued before it. So the measurements are sealed (paired with each ``.grad``
    and its version, as in one process) by a callback queued from a callback that
    was queued in the first bucket's hook: it runs after DDP's finalize. A gradient
    that finalize did not write (a globally unused parameter keeps its old ``.grad``:
    same tensor, same version as when its bucket was handed over) is not sealed.
    Under ``no_sync()`` (gradient accumulation) no bucket is reduced and nothing is
    measured; the synchronised last micro-batch measures the final gradients.

    Not measured, read at the step instead: the all-reduce a joined rank runs
    outside backward (``Join``); a backward whose buckets are handed over in two
    autograd graph tasks (reentrant checkpointing), whose seal could run before
    DDP's finalize; a bucket whose measurement raised (a warning says why)."""

    def __init__(self, ddp_model: Any, order: float):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        devices = {p.device.type for p in ddp_model.parameters() if p.requires_grad}
        if devices != {"cpu"}:
            raise ValueError(
                f"measure_in_backward=<DistributedDataParallel>: gradients on {sorted(devices)}; measuring "
                "reduced buckets is done for CPU gradients only (on CUDA the norm would have to come back to the "
                "host inside the communication hook); use measure_in_backward=False there")
        self._allreduce = default_hooks.allreduce_hook
        self._active = False
        self._warned = False
        self.hooked = sum(1 for p in ddp_model.parameters() if p.requires_grad)
        self._reset(order)

    def _reset(self, order: float) -> None:
        self._order = order
        self._measured: Dict[int, Measured] = {}
        self._pass: Optional[_Pass] = None

    @classmethod
    def of(cls, ddp_model: Any, order: float) -> "ReducedBucketNorms":
        """The measurements of ``ddp_model``'s buckets: its hook is registered once
        (DDP takes one communication hook and cannot unregister it), and taken up
        again by a later attach() after the first was removed."""
        held = _BY_MODEL.get(ddp_model)
        if held is not None:
            if held._active:
                raise ValueError(
                    "measure_in_backward=<DistributedDataParallel>: this model's buckets are already measured for "
                    "another attach(); remove() that one first")
            held._reset(order)
            held._active = True
            return held
        norms = cls(ddp_model, order)
        try:
            ddp_model.register_comm_hook(ddp_model.process_group, norms._hook)
        except RuntimeError as e:
            raise ValueError(
                "measure_in_backward=<DistributedDataParallel>: gradclip measures the reduced buckets in a DDP "
                f"communication hook, and DDP takes one only ({e}); use measure_in_backward=False with a "
                "communication hook of your own") from None
        norms._active = True
        _BY_MODEL[ddp_model] = norms
        return norms

    def _hook(self, process_group, bucket):  # no annotations: DDP checks them against its own types
        import torch

        graph_task = getattr(torch._C, "_current_graph_task_id", None)  # torch >= 2.0
        task = graph_task() if graph_task is not None else 0
        if not self._active or task == -1:  # removed, or outside backward (a joined rank's all-reduce)
            return self._allreduce(process_group, bucket)
        current = self._pass
        if current is None or current.task != task:
            # An unsealed pass of another graph task: a nested (reentrant) backward, or one
            # that raised. Neither it nor this one is used.
            if current is not None:
                current.spoiled = True
            current = self._pass = _Pass(task, spoiled=current is not None)
            try:
                torch.autograd.Variable._execution_engine.queue_callback(lambda: self._queue_seal(current))
            except RuntimeError:  # not in backward after all (a torch that cannot tell): nothing to seal
                self._pass = None
                return self._allreduce(process_group, bucket)
        params = bucket.parameters()
        for p in params:
            grad = p.grad
            current.before[id(p)] = (grad, None if grad is None else grad._version)
        # Each gradient's place in the flat bucket (bucket.gradients() are views of it).
        base = bucket.buffer().storage_offset()
        places = [(g.storage_offset() - base, g.numel()) for g in bucket.gradients()]

        def measure(fut: Any) -> Any:
            reduced = fut.value()
            flat = reduced[0] if isinstance(reduced, (list, tuple)) else reduced
            try:
                self._measure(current, params, [flat.narrow(0, start, n) for start, n in places], flat)
            except Exception as e:  # a failed measurement must not fail DDP's reduction: read at the step
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"gradclip measure_in_backward: a DDP bucket could not be measured ({e}); its "
                                  "gradients are read at the step", stacklevel=1)
            return flat

        return self._allreduce(process_group, bucket).then(measure)

    def _measure(self, current: _Pass, params: List[Any], views: List[Any], flat: Any) -> None:
        n = len(views)
        with _threads_for(flat.numel() * flat.element_size()):
            reduction = _core.reduce(views, order=self._order, nonfinite="propagate",
                                     group_of_item=np.arange(n, dtype=np.int32), n_groups=n,
                                     argname="bucket", grad_attr=False, items=None)
            rows = reduction.group_partials()
            r = reduction.finish(kind="none", limits=[], eps=0.0, nonfinite="propagate", combined=None,
                                 per_tensor=True, report=True, result_f64=None)
        bad = set(r.nonfinite_indices.tolist())
        for i, norm in zip(r.indices.tolist(), r.norms.tolist()):
            current.fresh[id(params[i])] = (params[i], rows[i], norm, i in bad)

    def _queue_seal(self, current: _Pass) -> None:
        from torch.autograd import Variable

        # Still before DDP's finalize (queued after this one): queue the seal behind it.
        Variable._execution_engine.queue_callback(lambda: self._seal(current))

    def _seal(self, current: _Pass) -> None:
        if self._pass is current:
            self._pass = None
        if current.spoiled or not self._active:
            return
        for key, (p, row, norm, nonfinite) in list(current.fresh.items()):
            grad = p.grad
            if grad is None:
                continue
            before, version = current.before.get(key, (None, None))
            if before is grad and version == grad._version:
                continue  # finalize did not write it: the bucket held something else
            self._measured[key] = (grad, grad._version, row, norm, nonfinite)

    def remove(self) -> None:
        # DDP cannot unregister a communication hook: it goes back to the plain all-reduce
        # until a later attach() on the same model takes it up again (ReducedBucketNorms.of).
        self._active = False
        self._pass = None
        self._measured.clear()


_BY_MODEL: "weakref.WeakKeyDictionary[Any, ReducedBucketNorms]" = weakref.WeakKeyDictionary()
