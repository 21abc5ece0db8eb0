"""What one clip did (:class:`StepRecord`), the error a nonfinite gradient
raises under ``nonfinite='error'``, and the parameters' names in both."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

__all__ = ["NonfiniteGradientError", "StepRecord"]


class NonfiniteGradientError(RuntimeError):
    """A gradient norm was NaN or inf under ``nonfinite='error'``; no gradient
    was modified. ``names`` lists the offending parameters."""

    def __init__(self, message: str, names: Sequence[str]):
        super().__init__(message)
        self.names = list(names)


@dataclass(frozen=True)
class StepRecord:
    """What one clip did. ``as_dict()`` gives the scalar fields, for a CSV row or
    a TensorBoard scalar each; ``tensor_norms()`` the per-tensor norms by name.

    Attributes:
        step: how many clips the hook has run before this one, from 0 (always 0
            from :func:`clip_gradients_`, which keeps no state).
        total_norm: the norm of all gradients together, before clipping (after
            zeroing under ``nonfinite='zero'``); NaN or inf when a gradient is.
        clip_coef: the factor the gradients were multiplied by: the coefficient
            for a global limit, the smallest one for per-group or per-tensor
            limits; 1.0 when nothing was scaled; NaN for value clipping and AGC,
            which have no single factor.
        clipped: whether any gradient element was changed.
        skipped: whether the optimizer step was skipped (``nonfinite='skip'``; for
            attach folded on CUDA also a step that GradScaler's found_inf skipped,
            which elsewhere makes no record).
        nonfinite_tensors: how many gradients had a NaN or inf norm (before any repair).
        zeroed_elements: how many NaN / inf elements ``nonfinite='zero'`` set to 0.
        threshold: the limit used for an adaptive clipper (AutoClip, ZClip), else NaN.
        clipped_units: for AGC, how many rows were scaled down.
    """

    step: int
    total_norm: float
    clip_coef: float
    clipped: bool
    skipped: bool = False
    nonfinite_tensors: int = 0
    zeroed_elements: int = 0
    threshold: float = math.nan
    clipped_units: int = 0
    _names: Sequence[str] = field(default=(), repr=False, compare=False)
    _norms: Any = field(default=None, repr=False, compare=False)
    _indices: Any = field(default=None, repr=False, compare=False)
    _nonfinite_indices: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> Dict[str, Union[int, float, bool]]:
        return {
            "step": self.step,
            "total_norm": self.total_norm,
            "clip_coef": self.clip_coef,
            "clipped": self.clipped,
            "skipped": self.skipped,
            "nonfinite_tensors": self.nonfinite_tensors,
            "zeroed_elements": self.zeroed_elements,
            "threshold": self.threshold,
            "clipped_units": self.clipped_units,
        }

    def tensor_norms(self) -> Dict[str, float]:
        """Each gradient's norm before clipping, by parameter name (from the
        same pass as the clip). Parameters without a gradient are absent."""
        if self._norms is None:
            return {}
        return {self._names[i]: float(n) for i, n in zip(self._indices.tolist(), self._norms.tolist())}

    def largest(self, k: int = 5) -> List[Tuple[str, float]]:
        """The k gradients with the largest norms (NaN first, then inf), by name:
        where to look when the total norm explodes."""
        items = self.tensor_norms().items()
        return sorted(items, key=lambda kv: (not math.isnan(kv[1]), -kv[1] if not math.isnan(kv[1]) else 0.0))[:k]

    def nonfinite_names(self) -> List[str]:
        """Names of the gradients whose norm was NaN or inf (before any repair)."""
        if self._nonfinite_indices is None:
            return []
        return [self._names[i] for i in self._nonfinite_indices.tolist()]


def names_by_id(named_parameters) -> Dict[int, str]:
    """id(parameter) -> name, from ``model.named_parameters()`` or the module itself."""
    if named_parameters is None:
        return {}
    if hasattr(named_parameters, "named_parameters"):  # a module
        named_parameters = named_parameters.named_parameters()
    return {id(p): name for name, p in named_parameters}


class ListNames:
    """Names by list index, made only when a record is read: building 'parameters[i]'
    for every parameter at every call would cost more than the clip of small lists."""

    def __init__(self, params: Sequence[Any], by_id: Dict[int, str]):
        self._params = params
        self._by_id = by_id

    def __getitem__(self, i: int) -> str:
        return self._by_id.get(id(self._params[i])) or f"parameters[{i}]"
