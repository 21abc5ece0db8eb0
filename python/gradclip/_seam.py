"""The engine's seam, for code that combines norms across devices or processes.

A clip is ``reduce -> (combine) -> finish``. :func:`reduce` reads a list and
computes each group's *partial power sum*, a ``(n_groups, 2)`` float64 array
of ``(sum, base)`` rows standing for ``sum * base**p`` (overflow-safe: see
``csrc/core/partial.h``), on the tensors' device. A caller gathers the
partials of every participant (other devices, other ranks), stacks them in
an order all participants share, and calls :meth:`LocalNorms.finish` with
that stack: the engine folds it, then applies its own rules (norms, the
nonfinite decision, coefficients) and writes. Participants that finish with
the same stack compute the same totals and take the same decisions.

This is an internal entry point (``gradclip._core.reduce``), used by the
torch drop-ins across devices and by the training hook's adaptive limits.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from . import _core, _device


class LocalNorms:
    """The local power sums of one list (one device), until :meth:`finish`."""

    def __init__(self, reduction: "_core.Reduction"):
        self._reduction = reduction

    @property
    def partials(self) -> Any:
        """Each group's partial power sum, ``(n_groups, 2)`` float64, where the
        tensors are: a NumPy array for host memory, a view of device memory
        (the caller framework's array type) for CUDA, made without a host sync."""
        got = self._reduction.group_partials()
        if isinstance(got, tuple):  # device memory: (buffer, byte offset, n_groups)
            return _device.partials(*got)
        return got

    def summary(self):
        """``(total, nonfinite)`` of the local norms, on the host (CUDA: waits for the device)."""
        return self._reduction.summary()

    def finish(self, *, kind: str, limits: Sequence[float] = (), eps: float = 0.0, nonfinite: str = "propagate",
               combined: Any = None, per_tensor: bool = False, report: bool = False,
               result_f64: Optional[bool] = None) -> "_core.Result":
        """Norms, coefficients and writes. ``combined``: the stacked partials of
        every participant (``(k, n_groups, 2)``, this one's among them), on the
        tensors' device; None: the local ones alone."""
        return self._reduction.finish(kind=kind, limits=list(limits), eps=eps, nonfinite=nonfinite,
                                      combined=combined, per_tensor=per_tensor, report=report,
                                      result_f64=result_f64)


def reduce(items: Sequence[Any], *, order: float, argname: str, grad_attr: bool = False,
           nonfinite: str = "propagate", group_of_item: Any = None, n_groups: int = 1,
           only: Optional[Sequence[int]] = None) -> LocalNorms:
    """Stage one of a clip over ``items`` (their ``.grad`` with ``grad_attr``),
    validated for writing; ``only``: these list indices alone. Under
    ``nonfinite='zero'`` the NaN and inf elements are zeroed here."""
    reduction = _core.reduce(items, order=order, nonfinite=nonfinite, group_of_item=group_of_item,
                             n_groups=n_groups, argname=argname, grad_attr=grad_attr,
                             items=None if only is None else list(only))
    return LocalNorms(reduction)
