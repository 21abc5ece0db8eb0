"""The clip every training-loop front end runs (:func:`gradclip.attach`,
:func:`gradclip.clip_gradients_`): one native call, or for an adaptive limit
one reduction, the clipper's threshold, then one finish (the engine's seam)."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, List, Optional, Sequence

import numpy as np

from .. import _core, _device, _seam, distributed
from .._inputs import torch_scalar
from .backward_norms import Measurements
from .options import KIND_OF_OPTION, ClipOptions
from .records import NonfiniteGradientError, StepRecord


class Engine:
    """Runs one :class:`ClipOptions`, counting its steps. ``run`` takes the
    flat parameter list, the pool (limit group) of each parameter and one
    limit per pool."""

    def __init__(self, options: ClipOptions):
        self.options = options
        self.steps = 0

    def run(self, params: Sequence[Any], pool_of_item: Optional[np.ndarray], limits: List[float],
            names: Sequence[str]) -> StepRecord:
        step = self.steps
        self.steps += 1
        o = self.options
        if o.option == "agc":
            return self._run_agc(params, pool_of_item, limits, names, step)
        if o.adaptive:
            return self._run_adaptive(params, names, step)
        kind = KIND_OF_OPTION[o.option]
        r = self._clip(params, kind, limits, pool_of_item)
        held = self._held(r, names)
        # One factor per pool for a global limit, one per tensor otherwise.
        coefs = r.group_coefs if kind == "global" else r.coefs
        if kind == "value":
            clip_coef = math.nan
        elif held or coefs is None or coefs.size == 0:
            clip_coef = 1.0  # nothing was scaled
        else:
            clip_coef = float(coefs.min())
        return self._record(step, r, names, clip_coef=clip_coef, clipped=r.written, skipped=held)

    def measure(self, params: Sequence[Any], names: Sequence[str], grad_scale: float = 1.0,
                early: Optional[Measurements] = None):
        """The clip's norms without its writes, for a fused optimizer to fold the
        coefficient into its step (one read pass; 'zero' still repairs). The
        gradients may carry a GradScaler's ``grad_scale``; the record is of the
        unscaled ones. ``early``: norms measured during backward, used where
        still true (the rest are read now). Returns ``(record, coefficient)``;
        the coefficient is 1 when the step is held ('skip'; 'error' raises)."""
        step = self.steps
        self.steps += 1
        o = self.options
        r = self._clip(params, "none", [], None) if early is None else self._with_backward_norms(params, early)
        held = self._held(r, names)
        total = float(r.total) / grad_scale
        coef = 1.0 if held else _core.clip_coefficient(o.default_limit, total, o.eps)
        clipped = (coef != 1.0 and r.count > 0 and not held) or bool(r.zeroed)
        record = self._record(step, r, names, clip_coef=coef, clipped=clipped, skipped=held)
        if grad_scale != 1.0:
            record = dataclasses.replace(record, total_norm=total, _norms=r.norms / grad_scale)
        return record, coef

    def _clip(self, params: Sequence[Any], kind: str, limits: List[float], pool_of_item: Optional[np.ndarray]):
        """One native call over local gradients, reported; for shards (DTensors, or a
        process_group) the clip over the ranks, whose norms are combined."""
        o = self.options
        if not o.distributed:
            r = _core.clip(params, kind=kind, limits=limits, group_of_item=pool_of_item, order=o.p, eps=o.eps,
                           nonfinite=o.nonfinite, argname="parameters", grad_attr=True, report=True,
                           split_devices=True)
            if r.items_by_device is None:
                return r
            if _core.NO_MEMORY not in r.devices:  # several devices: one call takes one (this raises)
                _core.clip(params, kind=kind, limits=limits, order=o.p, argname="parameters", grad_attr=True)
            # DTensors: combined over their mesh
        if kind == "per_tensor":
            raise ValueError("clipnorm over DTensor gradients is not available yet (each tensor's norm would "
                             "need its own combine); use global_clipnorm or clipvalue")
        r, _ = distributed.combined_clip(params, kind=kind, limits=limits, group_of_item=pool_of_item, order=o.p,
                                         eps=o.eps, nonfinite=o.nonfinite, argname="parameters", grad_attr=True,
                                         process_group=o.process_group, replicated=o.replicated, report=True)
        return r

    def measure_on_device(self, params: Sequence[Any], names: Sequence[str], grad_scale: Any = None,
                          found_inf: Any = None) -> Optional["DeviceMeasure"]:
        """``measure`` without a host sync, for 'propagate' and 'skip': the norms stay on the
        gradients' device (CUDA) and so does everything made from them: the fused step's
        ``grad_scale`` (a GradScaler's ``grad_scale`` divided by the coefficient) and, under
        'skip', its ``found_inf`` (set where the total norm is nonfinite, which makes the
        fused step leave every parameter and its state alone). The record is made when it is
        read. None when no parameter has a gradient."""
        import torch

        o = self.options
        r = _core.clip(params, kind="none", order=o.p, argname="parameters", grad_attr=True, per_tensor=True)
        if r.count == 0:
            return None
        step = self.steps
        self.steps += 1
        if r.device is not None:
            total, norms = _device.total(r.device), _device.per_tensor(r.device)
        else:  # host memory (the same path, run on CPU tensors by the tests)
            device = params[r.first_index].grad.device
            total = torch_scalar(torch, r.total, r, device)
            norms = torch.from_numpy(r.norms).to(total.dtype)
        # float64 from here on, as the host path (clip_coefficient) computes; the
        # optimizer reads a float32 grad_scale. A scaler's tensors may have shape (1,)
        # (ShardedGradScaler's found_inf): 0-d here.
        if grad_scale is not None:
            grad_scale = grad_scale.reshape(())
        if found_inf is not None:
            found_inf = found_inf.reshape(())
        unscale = None if grad_scale is None else 1.0 / grad_scale.double()
        unscaled = total.double() if unscale is None else total.double() * unscale
        coef = torch.clamp(o.default_limit / (unscaled + o.eps), max=1.0)  # NaN stays NaN, as clip_coefficient
        scale = 1.0 / coef if grad_scale is None else grad_scale.double() / coef
        skipped = found_inf
        if o.nonfinite == "skip":
            # A nonfinite total as reported (float32 unless some gradient is float64), the
            # rule the host path holds the step by.
            nonfinite = ~torch.isfinite(total)
            scale = torch.where(nonfinite, torch.ones_like(scale) if grad_scale is None else grad_scale.double(),
                                scale)
            flag = nonfinite.to(torch.float32)
            skipped = flag if found_inf is None else torch.maximum(found_inf, flag.to(found_inf.dtype))
        return DeviceMeasure(step, names, r.indices, unscaled, norms, unscale, coef, skipped,
                             scale.to(torch.float32))

    def _with_backward_norms(self, params: Sequence[Any], early: Measurements) -> Any:
        """What ``_core.clip(kind='none', report=True)`` reports, from the norms
        measured during backward plus one fused read of every other gradient: the
        partial power sums of both are folded by the engine (one stack), so the
        total is the one the plain call computes, up to the order of the fold."""
        o = self.options
        rest, early_rows, early_items = [], [], []
        trusted = early.usable()  # a process group created after attach(): read everything now
        for i, p in enumerate(params):
            m = early.take(p) if trusted and p.grad is not None else None
            if m is None:
                rest.append(i)
            else:
                early_items.append((i, m[3], m[4]))
                early_rows.append(m[2])
        early.clear()  # what was not taken (a gradient set to None since) is of no further use
        local = _seam.reduce(params, order=o.p, argname="parameters", grad_attr=True, only=rest)
        if not early_rows:
            return local.finish(kind="none", nonfinite=o.nonfinite, report=True)
        stack = np.concatenate([np.asarray(local.partials)[None], np.asarray(early_rows)[:, None, :]])
        f64 = any(params[i].dtype.itemsize == 8 for i, _, _ in early_items)
        r = local.finish(kind="none", nonfinite=o.nonfinite, combined=stack, report=True, result_f64=f64 or None)
        # Per-tensor facts in list order: the read ones and the measured ones together.
        norms = dict(zip(r.indices.tolist(), r.norms.tolist()))
        norms.update((i, n) for i, n, _ in early_items)
        indices = np.asarray(sorted(norms), dtype=np.int64)
        bad = set(r.nonfinite_indices.tolist()) | {i for i, _, nonfinite in early_items if nonfinite}
        return types.SimpleNamespace(
            total=r.total, count=len(indices), zeroed=r.zeroed, nonfinite=bool(bad) or bool(r.nonfinite),
            indices=indices, norms=np.asarray([norms[i] for i in indices.tolist()], dtype=np.float64),
            nonfinite_indices=np.asarray(sorted(bad), dtype=np.int64))

    def _run_adaptive(self, params, names, step) -> StepRecord:
        # The norms first (nothing written, except zeroing under 'zero'), then
        # the clipper's threshold, then the finish: scaled when it clips.
        o = self.options
        local = _seam.reduce(params, order=o.p, argname="parameters", grad_attr=True,
                             nonfinite="zero" if o.nonfinite == "zero" else "propagate")
        total, nonfinite = local.summary()
        if nonfinite and o.nonfinite in ("error", "skip"):
            r = local.finish(kind="none", nonfinite="skip", report=True)
            self._held(r, names)  # raises under 'error'
            return self._record(step, r, names, clip_coef=1.0, clipped=False, skipped=True)
        if math.isfinite(total):
            threshold = float(o.limit.update(total))
            limit = threshold
        else:
            # 'propagate': as torch, NaN spreads and an inf norm zeroes; a
            # nonfinite norm is not fed into the clipper's history.
            threshold = math.nan
            limit = 1.0
        r = local.finish(kind="global", limits=[limit], eps=o.eps, report=True)
        coef = float(r.group_coefs[0])
        clipped = coef != 1.0 and r.count > 0
        return self._record(step, r, names, clip_coef=coef, clipped=clipped or bool(r.zeroed), threshold=threshold)

    def _run_agc(self, params, pool_of_item, limits, names, step) -> StepRecord:
        o = self.options
        r = _core.clip_units(params, clipping=limits, group_of_item=pool_of_item, eps=o.agc_eps, order=o.p,
                             nonfinite=o.nonfinite, argname="parameters")
        held = self._held(r, names)
        clipped = (r.clipped_units > 0 and not held) or bool(r.zeroed)
        return self._record(step, r, names, clip_coef=math.nan, clipped=clipped, skipped=held,
                            clipped_units=int(r.clipped_units))

    def _held(self, r: "_core.Result", names: Sequence[str]) -> bool:
        """Whether the native call wrote nothing because of a nonfinite norm
        ('error' raises here, 'skip' returns True)."""
        policy = self.options.nonfinite
        if not r.nonfinite or policy in ("propagate", "zero"):
            return False
        if policy == "error":
            bad = [names[i] for i in r.nonfinite_indices.tolist()]
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise NonfiniteGradientError(
                f"nonfinite='error': the gradient norm of order {self.options.p} is nonfinite (total {r.total}) in "
                f"{len(bad) or 'the sum of'} gradients{': ' + shown if bad else ''}; no gradient was modified",
                bad,
            )
        return True

    @staticmethod
    def _record(step, r, names, *, clip_coef, clipped, skipped=False, threshold=math.nan, clipped_units=0):
        return StepRecord(
            step=step,
            total_norm=float(r.total),
            clip_coef=float(clip_coef),
            clipped=bool(clipped),
            skipped=bool(skipped),
            nonfinite_tensors=int(r.nonfinite_indices.size),
            zeroed_elements=int(r.zeroed),
            threshold=float(threshold),
            clipped_units=int(clipped_units),
            _names=names,
            _norms=r.norms,
            _indices=r.indices,
            _nonfinite_indices=r.nonfinite_indices,
        )


class DeviceMeasure:
    """One folded clip whose numbers are still on the device: ``grad_scale`` and
    ``found_inf`` for the fused step, and the :class:`StepRecord`, made by
    :meth:`record` (which waits for the device)."""

    def __init__(self, step, names, indices, total, norms, unscale, coef, found_inf, grad_scale):
        self.step = step
        self.grad_scale = grad_scale
        self.found_inf = found_inf
        self._names = names
        self._indices = np.asarray(indices, dtype=np.int64)
        self._total = total
        self._norms = norms
        self._unscale = unscale
        self._coef = coef

    def record(self) -> StepRecord:
        import torch

        skipped = self.found_inf if self.found_inf is not None else torch.zeros_like(self._coef)
        total, coef, held = torch.stack([self._total, self._coef, skipped.double()]).tolist()
        norms = self._norms.double() if self._unscale is None else self._norms.double() * self._unscale
        norms = norms.cpu().numpy()
        held = held != 0.0
        coef = 1.0 if held else coef
        return StepRecord(step=self.step, total_norm=total, clip_coef=coef, clipped=coef != 1.0 and not held,
                          skipped=held, nonfinite_tensors=int((~np.isfinite(norms)).sum()),
                          _names=self._names, _norms=norms, _indices=self._indices,
                          _nonfinite_indices=self._indices[~np.isfinite(norms)])
