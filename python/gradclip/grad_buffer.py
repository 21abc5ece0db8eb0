"""GradBuffer: every gradient of a model as a view of one flat tensor, so that a
clip is one span, whatever the parameter count."""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import _core
from ._inputs import nonnegative, norm_order
from .torch_api import _NONFINITE, clip_norm_local, get_total_norm

__all__ = ["GradBuffer"]

# Each view starts on a 64-byte boundary (a cache line; a whole AVX-512 vector), so
# the optimizer's vector loops see the alignment a separate allocation would give.
_ALIGN_BYTES = 64


class GradBuffer:
    """One flat gradient tensor per (device, dtype) of ``parameters``; every
    parameter's ``.grad`` becomes a view of it.

    Backward accumulates into those views in place, so a clip reads one
    contiguous span per flat tensor instead of thousands of tensors: no
    per-tensor work, and on CUDA one launch whatever the count. The optimizer
    still sees ordinary ``.grad`` tensors.

    ``zero_grad()`` zeroes the flat tensors (one fill each). The optimizer's
    ``zero_grad(set_to_none=False)`` keeps the views too. With
    ``set_to_none=True`` (torch's default), or when anything assigns ``.grad``,
    the next backward makes fresh gradients outside the buffer: the buffer
    notices (a weak reference to each view tells it when the view was
    dropped) and, at its next call, copies those gradients back and rebinds
    the views, which costs a pass over them. It warns the first time.

    Example::

        buf = gradclip.GradBuffer(model.parameters())
        for x, y in data:
            loss_fn(model(x), y).backward()
            buf.clip_grad_norm_(1.0)
            opt.step()
            buf.zero_grad()          # or opt.zero_grad(set_to_none=False)
    """

    def __init__(self, parameters: Iterable[Any]) -> None:
        import torch

        self._params: List[Any] = [p for p in parameters if getattr(p, "requires_grad", False)]
        groups: Dict[Tuple[Any, Any], List[int]] = {}
        for i, p in enumerate(self._params):
            if not isinstance(p, torch.Tensor) or p.is_sparse or not p.dtype.is_floating_point:
                raise TypeError(f"parameters[{i}]: a GradBuffer holds dense floating-point gradients, got "
                                f"{type(p).__name__} {getattr(p, 'dtype', '')}")
            groups.setdefault((p.device, p.dtype), []).append(i)
        # Where each parameter's gradient lives: (flat index, offset, numel).
        self._place: List[Tuple[int, int, int]] = [(0, 0, 0)] * len(self._params)
        self._flats: List[Any] = []
        for (device, dtype), members in groups.items():
            align = max(_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size(), 1)
            offset = 0
            for i in members:
                self._place[i] = (len(self._flats), offset, self._params[i].numel())
                offset += -(-self._params[i].numel() // align) * align
            self._flats.append(torch.zeros(offset, dtype=dtype, device=device))
        self._refs: List[Optional[weakref.ref]] = [None] * len(self._params)
        self._unbound: set = set()  # parameters whose .grad is not (or no longer) their view
        self._warned = False
        self.repairs = 0  # gradients copied back into the buffer since it was made
        for i, p in enumerate(self._params):
            if p.grad is not None:
                self._view(i).copy_(p.grad)
            self._bind(i)

    # -- the views --------------------------------------------------------------------------

    def _view(self, i: int) -> Any:
        k, offset, n = self._place[i]
        return self._flats[k][offset:offset + n].view(self._params[i].shape)

    def _bind(self, i: int) -> None:
        view = self._view(i)
        self._params[i].grad = view
        # Fires when the view dies: zero_grad(set_to_none=True), or .grad reassigned.
        self._refs[i] = weakref.ref(view, lambda _, i=i, unbound=self._unbound: unbound.add(i))

    def _sync(self) -> None:
        """Bring gradients made outside the buffer back in; zero the regions of
        parameters that have no gradient now, so they add nothing to a norm."""
        if not self._unbound:
            return
        copied = 0
        for i in sorted(self._unbound):
            p = self._params[i]
            grad = p.grad
            if grad is None:
                self._view(i).zero_()
                continue
            if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                raise ValueError(f"GradBuffer: parameters[{i}].grad is {grad.dtype} {tuple(grad.shape)} on "
                                 f"{grad.device}; the buffer holds {p.dtype} {tuple(p.shape)} on {p.device}")
            self._view(i).copy_(grad)
            self._bind(i)
            self._unbound.discard(i)
            copied += 1
        if copied:
            self.repairs += copied
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"GradBuffer: {copied} gradients were made outside the buffer (zero_grad(set_to_none=True), "
                    ".grad assigned, or DDP with gradient_as_bucket_view=True) and were copied back, a pass over "
                    "them at every step; zero with buffer.zero_grad() or optimizer.zero_grad(set_to_none=False), "
                    "and leave DDP's gradient_as_bucket_view off, to keep them in place",
                    stacklevel=3)

    # -- what users call ----------------------------------------------------------------------

    @property
    def flat(self) -> List[Any]:
        """The flat gradient tensors, one per (device, dtype), in first-seen order."""
        self._sync()
        return list(self._flats)

    @property
    def parameters(self) -> List[Any]:
        return list(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def zero_grad(self) -> None:
        """Zero every gradient in place (one fill per flat tensor); gradients
        that left the buffer are bound to their views again."""
        for flat in self._flats:
            flat.zero_()
        for i in sorted(self._unbound):
            self._bind(i)
        self._unbound.clear()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Any:
        """torch's ``clip_grad_norm_`` on the buffer's gradients: scale every one
        by ``min(max_norm / (total + 1e-6), 1)``; returns the total norm before
        clipping (0-d tensor, as torch's). One span per flat tensor."""
        p = norm_order(norm_type, "norm_type")
        limit = nonnegative(max_norm, "max_norm")
        self._sync()
        total = clip_norm_local(self._flats, limit, p, _NONFINITE[bool(error_if_nonfinite)], of_grads=False)
        assert total is not None  # plain tensors: never the distributed path
        return total

    def get_total_norm(self, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Any:
        """The norm of all the buffer's gradients together (0-d tensor)."""
        self._sync()
        return get_total_norm(self._flats, norm_type, error_if_nonfinite)

    def clip_grad_value_(self, clip_value: float) -> None:
        """torch's ``clip_grad_value_``: clamp every gradient to [-clip_value, clip_value]."""
        limit = nonnegative(clip_value, "clip_value")
        self._sync()
        result = _core.clip(self._flats, kind="value", limits=[limit], argname="tensors", split_devices=True)
        for items in result.items_by_device or ():  # flat tensors on several devices: each clamped where it is
            _core.clip(self._flats, kind="value", limits=[limit], argname="tensors", items=items)
