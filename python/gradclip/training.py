"""Training-loop integration: clipping as an optimizer step pre-hook, per-group
limits, nonfinite policies and per-step monitoring records.

Every step is one native call over the whole parameter list (two for an
adaptive limit: norms first, then one scale): the per-tensor norms used for
monitoring come from the same pass as the clip.

* :func:`attach` registers the clip on any ``torch.optim`` optimizer.
* :func:`clip_gradients_` is the same clip for a hand-written loop.
* :class:`StepRecord` is what each step did; :class:`CsvLogger` and
  :class:`TensorBoardLogger` write records without touching the gradients again.
"""

from __future__ import annotations

import csv
import io
import math
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._inputs import as_list, nonnegative, norm_order

__all__ = [
    "NONFINITE_POLICIES",
    "ClipHandle",
    "CsvLogger",
    "NonfiniteGradientError",
    "StepRecord",
    "TensorBoardLogger",
    "adaptive_clip_grad_",
    "attach",
    "clip_gradients_",
]

NONFINITE_POLICIES = ("propagate", "error", "skip", "zero")

# torch's clip_grad_norm_ rule: coef = max_norm / (total_norm + 1e-6).
_TORCH_EPS = 1e-6
_LIMIT_OPTIONS = ("global_clipnorm", "clipnorm", "clipvalue", "agc")
# The native mode of each limit option (agc has its own entry point).
_MODE_OF_OPTION = {"global_clipnorm": "global", "clipnorm": "per_tensor", "clipvalue": "value"}


class NonfiniteGradientError(RuntimeError):
    """A gradient norm was NaN or inf under ``nonfinite='error'``; no gradient
    was modified. ``names`` lists the offending parameters."""

    def __init__(self, message: str, names: Sequence[str]):
        super().__init__(message)
        self.names = list(names)


class _SkipStep(Exception):
    """Raised by the pre-hook to cancel optimizer.step(); caught by the step
    wrapper that attach() installs."""

    def __init__(self):
        super().__init__(
            "gradclip skipped this optimizer step (nonfinite gradients, nonfinite='skip'); this exception "
            "is normally caught by the optimizer.step installed by gradclip.attach: call optimizer.step() "
            "itself rather than a reference to it taken before attach()"
        )


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
        skipped: whether the optimizer step was skipped (``nonfinite='skip'``).
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


def _check_policy(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite


def _limit_option(global_clipnorm, clipnorm, clipvalue, agc) -> Tuple[Optional[str], Any]:
    """The one limit option given (Keras allows at most one), and its value."""
    given = {k: v for k, v in zip(_LIMIT_OPTIONS, (global_clipnorm, clipnorm, clipvalue, agc)) if v is not None}
    if len(given) > 1:
        received = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"Only one of `global_clipnorm`, `clipnorm`, `clipvalue` and `agc` can be set. Received: {received}")
    if not given:
        return None, None
    (option, value), = given.items()
    if option == "global_clipnorm" and hasattr(value, "update"):
        return option, value  # an adaptive clipper (AutoClip, ZClip)
    return option, _check_limit(value, option)


def _check_limit(value: Any, what: str) -> Optional[float]:
    """A per-group or default limit: None (no clipping) or a number >= 0 (> 0 for agc)."""
    if value is None:
        return None
    if what == "agc" or what.endswith("['agc']"):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a number, got {value!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{what} must be > 0 and finite (the AGC clipping factor), got {value!r}")
        return v
    return nonnegative(value, what)


class _Engine:
    """The clip every front end runs: one limit option, a norm type, a nonfinite
    policy. ``run`` takes the flat parameter list, the pool (limit group) of each
    parameter and one limit per pool."""

    def __init__(self, option: Optional[str], limit: Any, norm_type: Any, nonfinite: str, eps: float, agc_eps: float):
        self.option = option
        self.limit = limit
        self.adaptive = option == "global_clipnorm" and hasattr(limit, "update")
        self.p = norm_order(norm_type, "norm_type")
        self.nonfinite = _check_policy(nonfinite)
        self.eps = nonnegative(eps, "eps")
        self.agc_eps = nonnegative(agc_eps, "agc_eps")
        self.steps = 0

    def run(self, params: Sequence[Any], pool_of_item: Optional[np.ndarray], limits: List[float],
            names: Sequence[str]) -> StepRecord:
        step = self.steps
        self.steps += 1
        if self.option == "agc":
            return self._run_agc(params, pool_of_item, limits, names, step)
        if self.adaptive:
            return self._run_adaptive(params, names, step)
        mode = _MODE_OF_OPTION.get(self.option, "global")
        r = _core.clip(params, limits, pool_of_item, self.p, self.eps, mode, self.nonfinite, "parameters", True)
        held = self._held(r, names)
        # One factor per pool for a global limit, one per tensor otherwise.
        coefs = r["group_coefs"] if mode == "global" else r["coefs"]
        if mode == "value":
            clip_coef = math.nan
        elif held or coefs.size == 0:
            clip_coef = 1.0  # nothing was scaled
        else:
            clip_coef = float(coefs.min())
        return self._record(step, r, names, clip_coef=clip_coef, clipped=bool(r["written"]), skipped=held)

    def _run_adaptive(self, params, names, step) -> StepRecord:
        # Norms first (nothing written, except zeroing under 'zero'), then the
        # clipper's threshold, then one scale pass when it clips.
        first_policy = "zero" if self.nonfinite == "zero" else "skip"
        r = _core.clip(params, [math.inf], None, self.p, self.eps, "global", first_policy, "parameters", True)
        total = float(r["total"])
        if self._held(r, names):
            return self._record(step, r, names, clip_coef=1.0, clipped=False, skipped=True)
        if math.isfinite(total):
            threshold = float(self.limit.update(total))
            coef = _core.clip_coefficient(threshold, total, self.eps)
        else:
            # 'propagate': as torch, NaN spreads and an inf norm zeroes; a
            # nonfinite norm is not fed into the clipper's history.
            threshold = math.nan
            coef = _core.clip_coefficient(1.0, total, self.eps)
        if coef != 1.0:
            _core.scale(params, coef, "parameters", True)
        clipped = coef != 1.0 and r["count"] > 0
        return self._record(step, r, names, clip_coef=coef, clipped=clipped or bool(r["zeroed"]), threshold=threshold)

    def _run_agc(self, params, pool_of_item, limits, names, step) -> StepRecord:
        r = _core.clip_units(params, limits, pool_of_item, self.agc_eps, self.p, self.nonfinite, "parameters")
        r["norms"] = r["grad_norms"]
        held = self._held(r, names)
        clipped = (r["clipped_units"] > 0 and not held) or bool(r["zeroed"])
        return self._record(step, r, names, clip_coef=math.nan, clipped=clipped, skipped=held,
                            clipped_units=int(r["clipped_units"]))

    def _held(self, r: Dict[str, Any], names: Sequence[str]) -> bool:
        """Whether the native call wrote nothing because of a nonfinite norm
        ('error' raises here, 'skip' returns True)."""
        if not r["nonfinite"] or self.nonfinite in ("propagate", "zero"):
            return False
        if self.nonfinite == "error":
            bad = [names[i] for i in r["nonfinite_indices"].tolist()]
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise NonfiniteGradientError(
                f"nonfinite='error': the gradient norm of order {self.p} is nonfinite (total {r['total']}) in "
                f"{len(bad) or 'the sum of'} gradients{': ' + shown if bad else ''}; no gradient was modified",
                bad,
            )
        return True

    @staticmethod
    def _record(step, r, names, *, clip_coef, clipped, skipped=False, threshold=math.nan, clipped_units=0):
        return StepRecord(
            step=step,
            total_norm=float(r["total"]),
            clip_coef=float(clip_coef),
            clipped=bool(clipped),
            skipped=bool(skipped),
            nonfinite_tensors=int(r["nonfinite_indices"].size),
            zeroed_elements=int(r["zeroed"]),
            threshold=float(threshold),
            clipped_units=int(clipped_units),
            _names=names,
            _norms=r["norms"],
            _indices=r["indices"],
            _nonfinite_indices=r["nonfinite_indices"],
        )


def clip_gradients_(
    parameters: Any,
    *,
    global_clipnorm: Any = None,
    clipnorm: Optional[float] = None,
    clipvalue: Optional[float] = None,
    agc: Optional[float] = None,
    norm_type: Any = 2.0,
    nonfinite: str = "propagate",
    eps: float = _TORCH_EPS,
    agc_eps: float = 1e-3,
    named_parameters: Optional[Iterable[Tuple[str, Any]]] = None,
) -> StepRecord:
    """Clip the ``.grad`` of ``parameters`` in one fused call and report what happened.

    The limit options mirror Keras, and at most one may be given:
    ``global_clipnorm`` (all gradients together, torch's ``clip_grad_norm_``
    rule; a number, or an adaptive clipper such as :class:`gradclip.AutoClip`),
    ``clipnorm`` (each gradient on its own), ``clipvalue`` (each element), or
    ``agc`` (adaptive gradient clipping, the factor lambda; rows limited to
    ``agc * max(||parameter row||, agc_eps)``). With none, gradients are only
    measured (and repaired under ``nonfinite='zero'``).

    ``nonfinite`` decides what a NaN or inf gradient norm does:
    ``'propagate'`` clips anyway, as torch does; ``'error'`` raises
    :class:`NonfiniteGradientError` before any gradient is written;
    ``'skip'`` writes nothing and returns a record with ``skipped=True`` (do not
    call ``optimizer.step()``); ``'zero'`` sets the NaN and inf elements to 0
    and clips the rest.

    ``named_parameters`` (e.g. ``model.named_parameters()``) names the
    parameters in the record; otherwise they are named by list index.
    """
    params = as_list(parameters)
    option, limit = _limit_option(global_clipnorm, clipnorm, clipvalue, agc)
    engine = _Engine(option, limit, norm_type, nonfinite, eps, agc_eps)
    names = _ListNames(params, _names_by_id(named_parameters))
    default = _default_limit(option, limit)
    return engine.run(params, None, [default], names)


def adaptive_clip_grad_(
    parameters: Any,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: Any = 2.0,
    nonfinite: str = "propagate",
) -> StepRecord:
    """Adaptive gradient clipping (Brock et al. 2021, NFNets), in place: the
    gradient of each unit (row: one index of the first dimension; a 0-d or 1-d
    parameter is one unit) is scaled so that its norm is at most
    ``clip_factor * max(||parameter unit||, eps)``. Same arguments as timm's
    ``adaptive_clip_grad``; one fused pass reads every parameter and gradient
    row and writes only the rows it clips. Each gradient's rows must be
    contiguous blocks (first dimension outermost, e.g. not a transposed view).
    Returns a :class:`StepRecord` (``clipped_units`` rows were scaled)."""
    return clip_gradients_(parameters, agc=clip_factor, agc_eps=eps, norm_type=norm_type, nonfinite=nonfinite)


def _default_limit(option: Optional[str], limit: Any) -> float:
    """The native limit for a pool: no option or a None limit means no clipping."""
    if option is None or limit is None or (option == "global_clipnorm" and hasattr(limit, "update")):
        return math.inf
    return float(limit)


def _names_by_id(named_parameters) -> Dict[int, str]:
    """id(parameter) -> name, from ``model.named_parameters()`` or the module itself."""
    if named_parameters is None:
        return {}
    if hasattr(named_parameters, "named_parameters"):  # a module
        named_parameters = named_parameters.named_parameters()
    return {id(p): name for name, p in named_parameters}


class _ListNames:
    """Names by list index, made only when a record is read: building 'parameters[i]'
    for every parameter at every call would cost more than the clip of small lists."""

    def __init__(self, params: Sequence[Any], by_id: Dict[int, str]):
        self._params = params
        self._by_id = by_id

    def __getitem__(self, i: int) -> str:
        return self._by_id.get(id(self._params[i])) or f"parameters[{i}]"


class ClipHandle:
    """Returned by :func:`attach`. ``remove()`` (or leaving a ``with`` block)
    detaches the clip and restores ``optimizer.step``; ``last`` is the latest
    :class:`StepRecord`."""

    def __init__(self, optimizer, engine: _Engine, named_parameters, on_step):
        self.optimizer = optimizer
        self.last: Optional[StepRecord] = None
        self._engine = engine
        self._on_step = on_step
        self._named = _names_by_id(named_parameters)
        self._layout_key: Optional[tuple] = None
        self._params: List[Any] = []
        self._group_of_item = np.zeros(0, dtype=np.int32)
        self._names: List[str] = []
        self._active = True
        self._hook = optimizer.register_step_pre_hook(self._pre_hook)
        self._install_step_wrapper()

    # -- step wrapper: lets the pre-hook cancel a step ('skip') --

    def _install_step_wrapper(self) -> None:
        opt = self.optimizer
        had_own = "step" in opt.__dict__
        inner = opt.step
        handle = self

        def step(self_, *args, **kwargs):
            if not handle._active:
                return inner(*args, **kwargs)
            try:
                return inner(*args, **kwargs)
            except _SkipStep:
                return None

        # Keep the markers others put on step (e.g. torch's LR schedulers check
        # `_wrapped_by_lr_sched`), and install a bound method, as schedulers
        # created later expect (they rebind `step.__func__`).
        step.__dict__.update(getattr(inner, "__dict__", {}))
        step.__wrapped__ = inner  # type: ignore[attr-defined]
        self._wrapper = types.MethodType(step, opt)
        self._previous_step = (had_own, opt.__dict__.get("step"))
        opt.step = self._wrapper

    def remove(self) -> None:
        """Detach: the hook is removed and ``optimizer.step`` restored (or, if
        something wrapped it after attach(), made a pass-through)."""
        if not self._active:
            return
        self._active = False
        self._hook.remove()
        opt = self.optimizer
        if opt.__dict__.get("step") is self._wrapper:
            had_own, previous = self._previous_step
            if had_own:
                opt.step = previous
            else:
                del opt.step

    def __enter__(self) -> "ClipHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- the hook --

    def _layout(self) -> Tuple[List[Any], Optional[np.ndarray], List[float]]:
        """The flat parameter list and each parameter's pool, rebuilt only when
        the param groups change; the limits are read every step, so a group's
        limit can be changed (scheduled) during training."""
        groups = self.optimizer.param_groups
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if key != self._layout_key:
            params, group_of_item, fallback = [], [], []
            for gi, g in enumerate(groups):
                for pi, p in enumerate(g["params"]):
                    params.append(p)
                    group_of_item.append(gi)
                    fallback.append(f"param_groups[{gi}].params[{pi}]")
            self._params = params
            self._names = [self._named.get(id(p)) or fallback[i] for i, p in enumerate(params)]
            self._group_of_item = np.asarray(group_of_item, dtype=np.int32)
            self._layout_key = key
        engine = self._engine
        option = engine.option
        # Pool 0: every group without a limit of its own, clipped together
        # under the default limit; then one pool per group with its own limit.
        default = _default_limit(option, engine.limit)
        limits = [default]
        if option is None or not any(option in g for g in groups):
            return self._params, None, limits  # the common case: one pool, no group array
        pool_of_group = np.zeros(len(groups), dtype=np.int32)
        for gi, g in enumerate(groups):
            if option in g:
                if engine.adaptive:
                    raise ValueError(
                        f"param_groups[{gi}]['{option}']: per-group limits cannot be combined with an adaptive "
                        f"clipper ({type(engine.limit).__name__}), which sets one limit for all gradients"
                    )
                own = _check_limit(g[option], f"param_groups[{gi}]['{option}']")
                if own is None:
                    # Not clipped: for the norm options its norm is still
                    # measured (an infinite limit); AGC leaves the group out.
                    if option == "agc":
                        pool_of_group[gi] = -1
                        continue
                    own = math.inf
                pool_of_group[gi] = len(limits)
                limits.append(own)
        return self._params, pool_of_group[self._group_of_item], limits

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        # torch passes the optimizer itself as args[0].
        if (len(args) > 1 or kwargs) and (
            any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values())
        ):
            raise RuntimeError(
                "gradclip.attach: optimizer.step() was called with arguments (a closure?); a closure "
                "recomputes the gradients inside step(), after the clip ran, so it cannot be clipped this way"
            )
        if getattr(optimizer, "grad_scale", None) is not None:
            raise RuntimeError(
                "gradclip.attach: the gradients are still scaled by GradScaler (this optimizer unscales inside "
                "its fused step); call scaler.unscale_(optimizer) before scaler.step(optimizer)"
            )
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return  # GradScaler found infs: this fused optimizer's step will skip the update itself
        params, pools, limits = self._layout()
        record = self._engine.run(params, pools, limits, self._names)
        self.last = record
        if self._on_step is not None:
            self._on_step(record)
        if record.skipped:
            raise _SkipStep()


def attach(
    optimizer: Any,
    *,
    global_clipnorm: Any = None,
    clipnorm: Optional[float] = None,
    clipvalue: Optional[float] = None,
    agc: Optional[float] = None,
    norm_type: Any = 2.0,
    nonfinite: str = "propagate",
    eps: float = _TORCH_EPS,
    agc_eps: float = 1e-3,
    named_parameters: Optional[Iterable[Tuple[str, Any]]] = None,
    on_step: Optional[Callable[[StepRecord], Any]] = None,
) -> ClipHandle:
    """Clip the gradients of ``optimizer``'s parameters before every
    ``optimizer.step()``, in one fused call; returns a removable
    :class:`ClipHandle`.

    Options as in :func:`clip_gradients_` (at most one of ``global_clipnorm``,
    ``clipnorm``, ``clipvalue``, ``agc``, as Keras enforces). A param group may
    carry its own limit under the same key, e.g.
    ``{"params": head.parameters(), "global_clipnorm": 5.0}``: the groups
    without one are clipped together under the default limit, each group with
    one on its own; ``None`` there means "do not clip this group". The limits
    are read at every step, so they can be changed during training.

    Works with ``zero_grad(set_to_none=True)`` (parameters without a gradient
    are skipped) and with ``torch.amp.GradScaler``: ``scaler.step(optimizer)``
    unscales before it calls ``optimizer.step()``, so the clip sees unscaled
    gradients, and when the scaler finds infs it skips the step and the clip.
    ``nonfinite='skip'`` makes ``optimizer.step()`` return without updating
    anything (``handle.last.skipped`` tells). ``on_step(record)`` is called
    after each clip, e.g. with a :class:`CsvLogger` or :class:`TensorBoardLogger`.
    """
    option, limit = _limit_option(global_clipnorm, clipnorm, clipvalue, agc)
    engine = _Engine(option, limit, norm_type, nonfinite, eps, agc_eps)
    return ClipHandle(optimizer, engine, named_parameters, on_step)


class CsvLogger:
    """``on_step`` callback writing one CSV row of :meth:`StepRecord.as_dict`
    per step to a path (appended) or an open text file."""

    def __init__(self, file: Union[str, "os.PathLike[str]", io.TextIOBase]):
        if isinstance(file, (str, os.PathLike)):
            self._file = open(file, "a", newline="")
            self._owned = True
        else:
            self._file = file
            self._owned = False
        self._writer: Optional[csv.DictWriter] = None

    def __call__(self, record: StepRecord) -> None:
        row = record.as_dict()
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(row))
            if self._file.tell() == 0:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()


class TensorBoardLogger:
    """``on_step`` callback logging each record's scalars with
    ``writer.add_scalar`` (a ``torch.utils.tensorboard.SummaryWriter`` or any
    object with that method) under ``prefix/``; with ``per_tensor=True`` also
    every gradient's norm under ``prefix/norm/<parameter name>``."""

    def __init__(self, writer: Any, prefix: str = "gradclip", per_tensor: bool = False):
        self.writer = writer
        self.prefix = prefix
        self.per_tensor = per_tensor

    def __call__(self, record: StepRecord) -> None:
        for key, value in record.as_dict().items():
            if key != "step":
                self.writer.add_scalar(f"{self.prefix}/{key}", float(value), record.step)
        if self.per_tensor:
            for name, norm in record.tensor_norms().items():
                self.writer.add_scalar(f"{self.prefix}/norm/{name}", norm, record.step)
