"""Norms measured during backward: each large gradient's power sum is read by a
post-accumulate-grad hook, right after autograd wrote it (still in cache), so the
step finds the norm already known."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from .. import _core

# Gradients smaller than this are left to the step's one fused call. A hook costs
# ~3.5 us a tensor here (the Python call, a native reduce, the bookkeeping; 2-core
# Xeon), which is what reading ~80 KB from memory costs at ~22 GB/s: from 32768
# float32 elements (128 KB) up, measuring in the hook is cheaper than at the step.
MIN_ELEMENTS = 1 << 15

ONE_THREAD_BYTES = 4 << 20

# One measurement: the gradient tensor it read (identity), that tensor's version
# counter then, its partial power sum row (sum, base), its norm, and whether it was
# nonfinite.
Measured = Tuple[Any, int, Any, float, bool]


class BackwardNorms:
    """Post-accumulate-grad hooks on the large CPU parameters of ``params``.

    A measurement is used at the step only while it is still true: the same
    gradient tensor at the same version (an in-place torch op, such as
    GradScaler's unscale_, bumps the version, and a replaced ``.grad`` is
    another tensor; a collective writing into it does not, hence no use among
    several ranks). Each measurement is used once. Under
    gradient accumulation every micro-batch's backward measures again, so the
    last one, of the final gradient, is what the step uses."""

    def __init__(self, params: Iterable[Any], order: float):
        if not self.usable():
            raise ValueError(
                "measure_in_backward=True: this process is one of several ranks, where DDP may reduce a gradient "
                "in place after the hook read it without telling autograd (its all-reduce does not bump the "
                "tensor's version), so a measurement could be of the local gradient; read at the step instead")
        self._order = order
        self._measured: Dict[int, Measured] = {}
        self._handles: List[Any] = []
        for p in params:
            if p.requires_grad and p.device.type == "cpu" and p.numel() >= MIN_ELEMENTS:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))
        self.hooked = len(self._handles)

    def _on_gradient(self, param: Any) -> None:
        grad = param.grad
        # Gradients up to ONE_THREAD_BYTES are read on the calling thread alone: the hook
        # runs inside backward, right after the GEMM that made the gradient, while torch's
        # OpenMP workers still spin, and waking gradclip's workers there cost more than it
        # saved (32 x 4 MiB fp32 gradients, 2-core Xeon: +23.9 ms an iteration with the
        # workers, +9.9 ms without); larger ones (16 MiB) read faster with them.
        cap = _core.limit_calling_thread(1 if grad.numel() * grad.element_size() <= ONE_THREAD_BYTES else 0)
        try:
            reduction = _core.reduce([param], order=self._order, nonfinite="propagate", group_of_item=None,
                                     n_groups=1, argname="parameters", grad_attr=True, items=None)
            norm, nonfinite = reduction.summary()
        finally:
            _core.limit_calling_thread(cap)
        self._measured[id(param)] = (grad, grad._version, reduction.group_partials()[0], norm, nonfinite)

    def take(self, param: Any) -> Optional[Measured]:
        """The measurement of ``param``'s current gradient, if one is still
        true; it is used up either way."""
        m = self._measured.pop(id(param), None)
        if m is None or m[0] is not param.grad or m[0]._version != m[1]:
            return None
        return m

    @staticmethod
    def usable() -> bool:
        """Whether measurements can be trusted: not in a group of several ranks."""
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)

    def clear(self) -> None:
        self._measured.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._measured.clear()
