"""The clip as an optimizer step pre-hook: :func:`attach` and its :class:`ClipHandle`."""

from __future__ import annotations

import math
import sys
import types
from typing import Any, Callable, Iterable, List, Optional, Tuple

import numpy as np

from .backward_norms import BackwardNorms, ReducedBucketNorms
from .engine import DeviceMeasure, Engine
from .. import distributed, torch_ops
from .options import TORCH_EPS, ClipOptions, check_limit, with_clip_options
from .records import StepRecord, names_by_id

__all__ = ["ClipHandle", "attach"]


class _SkipStep(Exception):
    """Raised by the pre-hook to cancel optimizer.step(); caught by the step
    wrapper that attach() installs."""

    def __init__(self):
        super().__init__(
            "gradclip skipped this optimizer step (nonfinite gradients, nonfinite='skip'); this exception "
            "is normally caught by the optimizer.step installed by gradclip.attach: call optimizer.step() "
            "itself rather than a reference to it taken before attach()"
        )



class ClipHandle:
    """Returned by :func:`attach`. ``remove()`` (or leaving a ``with`` block)
    detaches the clip and restores ``optimizer.step``; ``last`` is the latest
    :class:`StepRecord`."""

    def __init__(self, optimizer, engine: Engine, named_parameters, on_step, fold: Optional[bool] = None,
                 measure_in_backward: Any = False):
        _refuse_repeated_closures(optimizer)
        self.optimizer = optimizer
        ddp_model = _ddp_model_or_none(measure_in_backward)
        measure_in_backward = ddp_model is not None or measure_in_backward is True
        if fold is None:
            fold = _can_fold(optimizer, engine.options) and (measure_in_backward or _fold_pays(optimizer))
        self.fold = fold
        if self.fold and not _can_fold(optimizer, engine.options):
            raise ValueError(
                "fold=True: the coefficient can be folded only into a fused optimizer step (fused=True Adam, AdamW, "
                "SGD, Adagrad) under one fixed global_clipnorm limit (no adaptive clipper or per-group limits)")
        self._backward_norms: Any = None  # BackwardNorms or ReducedBucketNorms
        if measure_in_backward:
            if not self.fold:
                raise ValueError(
                    "measure_in_backward=True: the norms measured during backward are used by a folded clip, so it "
                    "needs what folding needs (a fused=True Adam, AdamW, SGD or Adagrad under one global_clipnorm "
                    "limit, fold not False)")
            if engine.options.nonfinite == "zero":
                raise ValueError("measure_in_backward=True: nonfinite='zero' repairs gradients when they are read "
                                 "at the step; use 'propagate', 'error' or 'skip'")
            if engine.options.distributed:
                raise ValueError(
                    "measure_in_backward: with process_group= the norm is combined over the ranks at the step, "
                    "which measurements of local gradients during backward cannot be; leave measure_in_backward "
                    "out")
            if ddp_model is not None:
                self._backward_norms = ReducedBucketNorms.of(ddp_model, engine.options.p)
            else:
                self._backward_norms = BackwardNorms(
                    (p for g in optimizer.param_groups for p in g["params"]), engine.options.p)
        self._to_restore: dict = {}
        self._last: Optional[StepRecord] = None
        self._pending: Optional[DeviceMeasure] = None
        # Parameters whose momentum buffer may not exist yet (see _stays_on_device); None: none.
        self._momentum_pending: Optional[list] = None
        self._engine = engine
        self._on_step = on_step
        self._named = names_by_id(named_parameters)
        self._layout_key: Optional[tuple] = None
        self._params: List[Any] = []
        self._group_of_item = np.zeros(0, dtype=np.int32)
        self._names: List[str] = []
        self._active = True
        self._hook = optimizer.register_step_pre_hook(self._pre_hook)
        self._install_step_wrapper()

    # -- step wrapper: runs a closure before the clip, lets the pre-hook cancel a step ('skip') --

    def _install_step_wrapper(self) -> None:
        opt = self.optimizer
        had_own = "step" in opt.__dict__
        inner = opt.step
        handle = self

        def step(self_, closure=None, *args, **kwargs):
            if not handle._active:
                return inner(*args, **kwargs) if closure is None else inner(closure, *args, **kwargs)
            loss = None
            handle._to_restore.clear()
            if closure is not None:
                # The closure recomputes the gradients: run it first (as the
                # optimizer would, with gradients enabled), then clip, then step.
                import torch

                with torch.enable_grad():
                    loss = closure()
            try:
                result = inner(*args, **kwargs)
            except _SkipStep:
                return loss
            finally:
                handle._restore_step_attributes()
            return loss if closure is not None else result

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
        if self._backward_norms is not None:
            self._backward_norms.remove()
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
            self._momentum_pending = _momentum_to_make(self.optimizer)
            if not self._engine.options.distributed:
                _refuse_flat_shards(params)
        options = self._engine.options
        option = options.option
        # Pool 0: every group without a limit of its own, clipped together
        # under the default limit; then one pool per group with its own limit.
        limits = [options.default_limit]
        if option is None or not any(option in g for g in groups):
            return self._params, None, limits  # the common case: one pool, no group array
        pool_of_group = np.zeros(len(groups), dtype=np.int32)
        for gi, g in enumerate(groups):
            if option in g:
                if options.adaptive:
                    raise ValueError(
                        f"param_groups[{gi}]['{option}']: per-group limits cannot be combined with an adaptive "
                        f"clipper ({type(options.limit).__name__}), which sets one limit for all gradients"
                    )
                own = check_limit(g[option], f"param_groups[{gi}]['{option}']", agc=option == "agc")
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
        # torch passes the optimizer itself as args[0]; a closure never gets
        # here (the step wrapper runs it first), but a step called through a
        # reference taken before attach() would bring it.
        if (len(args) > 1 or kwargs) and (
            any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values())
        ):
            raise RuntimeError(
                "gradclip.attach: optimizer.step() was called with arguments around gradclip's step wrapper (a "
                "reference to step taken before attach()?); a closure there would recompute the gradients after "
                "the clip ran. Call optimizer.step(closure) itself"
            )
        if torch_ops.use_ops() and self._traces_as_op(optimizer):
            # torch.compile is tracing optimizer.step: the clip goes into the graph as the
            # clip_grad_norm_ custom op. No StepRecord: its fields are host numbers, and
            # reading them would end the graph (handle.last keeps the last eager record).
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch_ops.clip_grad_norm_(params, self._engine.options.default_limit, self._engine.options.p, False)
            return
        scale = getattr(optimizer, "grad_scale", None)
        params, pools, limits = self._layout()
        if scale is not None and not (self.fold and pools is None):
            raise RuntimeError(
                "gradclip.attach: the gradients are still scaled by GradScaler (this optimizer unscales inside "
                "its fused step); call scaler.unscale_(optimizer) before scaler.step(optimizer)"
            )
        found_inf = getattr(optimizer, "found_inf", None)
        if self.fold and pools is None and self._stays_on_device(optimizer, params):
            measured = self._engine.measure_on_device(params, self._names, scale, found_inf)
            if measured is not None:
                self._hand_to_step(optimizer, grad_scale=measured.grad_scale, found_inf=measured.found_inf)
                self._last, self._pending = None, measured
                if self._on_step is not None:
                    self._on_step(self.last)
                return
        # GradScaler found infs: this fused optimizer's step will skip the update itself.
        # Not over a process group: there each rank's found_inf is its own, and a rank
        # returning here would leave the others waiting in the norm's collective.
        if found_inf is not None and not self._engine.options.distributed and float(found_inf) != 0.0:
            if self._backward_norms is not None:
                self._backward_norms.clear()
            return
        if self.fold and pools is None:
            record = self._fold_into_step(optimizer, params, scale)
        else:
            if self._backward_norms is not None:
                self._backward_norms.clear()  # per-group limits now: the folded path is not taken
            record = self._engine.run(params, pools, limits, self._names)
        self._last, self._pending = record, None
        if self._on_step is not None:
            self._on_step(record)
        if record.skipped:
            raise _SkipStep()

    @property
    def last(self) -> Optional[StepRecord]:
        """The latest step's :class:`StepRecord`. On CUDA a folded clip leaves its
        numbers on the device; reading ``last`` waits for them."""
        if self._pending is not None:
            self._last, self._pending = self._pending.record(), None
        return self._last

    def _stays_on_device(self, optimizer, params) -> bool:
        """Whether this folded clip runs without a host sync: CUDA gradients, a policy
        that needs no host decision ('error' raises, 'zero' counts), no norms measured
        during backward, and under 'skip' no momentum buffer still to be made: torch's
        fused SGD allocates them with empty_like on a parameter's first step and lets
        the kernel, which a set found_inf stops, fill them, so a step skipped there would
        leave them uninitialised; such a step decides on the host. (Adam and AdamW
        zero their state before the kernel; Adagrad makes it in its constructor.)"""
        o = self._engine.options
        if not params or params[0].device.type not in _DEVICE_TYPES or o.nonfinite not in ("propagate", "skip"):
            return False
        if o.distributed or distributed.is_dtensor(params[0]):
            return False  # combined over the ranks (distributed.combined_clip), read on the host
        if self._backward_norms is not None and self._backward_norms.hooked:
            return False
        if o.nonfinite == "skip" and self._momentum_pending is not None:
            state = optimizer.state  # a defaultdict: .get() does not add entries
            self._momentum_pending = [p for p in self._momentum_pending
                                      if "momentum_buffer" not in state.get(p, ())] or None
            return self._momentum_pending is None or not any(p.grad is not None for p in self._momentum_pending)
        return True


    def _traces_as_op(self, optimizer) -> bool:
        """Whether this clip is what the clip_grad_norm_ op computes: torch's rule
        under one global_clipnorm ('propagate', torch's eps), no per-group limits,
        GradScaler, fold, adaptive clipper, process group or on_step callback. Other
        clips run eagerly, with a graph break around them."""
        o = self._engine.options
        return (o.one_global_limit and o.nonfinite == "propagate" and o.eps == TORCH_EPS and not self.fold
                and self._on_step is None and getattr(optimizer, "grad_scale", None) is None
                and not any(o.option in g for g in optimizer.param_groups))

    def _fold_into_step(self, optimizer, params, scale) -> StepRecord:
        """One read pass for the norm; the coefficient goes to the fused step as
        its grad_scale (composed with a GradScaler's), which divides every
        gradient by it in its own pass, instead of a second pass rewriting them."""
        import torch

        record, coef = self._engine.measure(params, self._names, 1.0 if scale is None else float(scale),
                                            early=self._backward_norms)
        if not record.skipped:
            device = next((p.grad.device for p in params if p.grad is not None), None)
            if scale is None:
                grad_scale = torch.full((), 1.0 / coef if coef else math.inf, dtype=torch.float32, device=device)
            else:
                grad_scale = scale / coef if coef else torch.full_like(scale, math.inf)
            self._hand_to_step(optimizer, grad_scale=grad_scale)
        return record

    def _hand_to_step(self, optimizer, **attributes) -> None:
        """Set the fused step's grad_scale (and found_inf), remembering what they were
        (a GradScaler's, or absent) to put back after the step."""
        for name, value in attributes.items():
            self._to_restore.setdefault(name, optimizer.__dict__.get(name, _ABSENT))
            setattr(optimizer, name, value)

    def _restore_step_attributes(self) -> None:
        for name, value in self._to_restore.items():
            if value is _ABSENT:
                # Absent, not None: GradScaler computes `scale * getattr(opt, "grad_scale", 1)`.
                self.optimizer.__dict__.pop(name, None)
            else:
                setattr(self.optimizer, name, value)
        self._to_restore.clear()


_ABSENT = object()


# Devices whose folded clip keeps its numbers there (no host sync); the tests add
# "cpu" to run that path on CPU tensors.
_DEVICE_TYPES = ("cuda",)


def _can_fold(optimizer, options) -> bool:
    """Whether attach can hand the coefficient to this optimizer's fused step:
    torch's fused optimizers divide every gradient by ``grad_scale`` in their
    own pass over it (the GradScaler mechanism), and write the divided gradient
    back, so after step() the gradients read as clipped ones."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if not all(group.get("fused") for group in optimizer.param_groups):
        return False
    return options.fixed_global_limit


def _momentum_to_make(optimizer) -> Optional[list]:
    """The parameters of an SGD optimizer's groups with momentum, whose fused step
    makes their momentum buffers uninitialised on their first step (None: none)."""
    sgd = getattr(sys.modules.get("torch.optim"), "SGD", None)
    if sgd is None or not isinstance(optimizer, sgd):
        return None
    return [p for g in optimizer.param_groups if g.get("momentum", 0) != 0 for p in g["params"]] or None


def _fold_pays(optimizer) -> bool:
    """Whether folding is the faster default. Not for bfloat16 parameters on the CPU:
    torch 2.13's fused CPU step takes a slower path for bfloat16 with a grad_scale
    than without, so rewriting the gradients first measured faster (2-core Xeon,
    fused AdamW, the clip's added cost: GPT-2 small 27.4 ms folded vs 21.1 ms
    rewritten, BERT-base 29.1 vs 23.8; float32 BERT-base 16.7 folded vs 31.1)."""
    import torch

    return not any(p.dtype == torch.bfloat16 and p.device.type == "cpu"
                   for g in optimizer.param_groups for p in g["params"])


def _ddp_model_or_none(measure_in_backward: Any) -> Any:
    """The DistributedDataParallel model that ``measure_in_backward`` names, None for
    True or False; anything else is refused."""
    if measure_in_backward is True or measure_in_backward is False:
        return None
    parallel = getattr(sys.modules.get("torch.nn"), "parallel", None)
    ddp = getattr(parallel, "DistributedDataParallel", None)
    if ddp is not None and isinstance(measure_in_backward, ddp):
        return measure_in_backward
    raise TypeError(
        f"measure_in_backward: expected True, False or a torch DistributedDataParallel model, got "
        f"{type(measure_in_backward).__name__}")


def _refuse_repeated_closures(optimizer) -> None:
    """An optimizer that calls its closure several times inside step() (a line
    search) recomputes the gradients after the clip ran: nothing can clip them."""
    lbfgs = getattr(sys.modules.get("torch.optim"), "LBFGS", None)
    if lbfgs is not None and isinstance(optimizer, lbfgs):
        raise ValueError(
            f"gradclip.attach: {type(optimizer).__name__} calls its closure several times inside step() (its line "
            "search), each time recomputing the gradients after the clip; clip inside the closure instead, "
            "e.g. gradclip.clip_grad_norm_(params, max_norm) after loss.backward()")


def _refuse_flat_shards(params) -> None:
    """FSDP1 (FullyShardedDataParallel) hands the optimizer flat shards: clipping
    them by the local norm would scale each rank differently."""
    flat = sys.modules.get("torch.distributed.fsdp._flat_param")
    FlatParameter = getattr(flat, "FlatParameter", None)
    if FlatParameter is None:
        return
    for i, p in enumerate(params):
        if isinstance(p, FlatParameter):
            raise ValueError(
                f"param_groups: parameter {i} is an FSDP (FullyShardedDataParallel) flat shard; its gradient is this "
                "rank's part only. Pass process_group=<the FSDP module's process_group> to combine the norm over "
                "the shards, or use FSDP's own model.clip_grad_norm_")


@with_clip_options
def attach(
    optimizer: Any,
    *,
    named_parameters: Optional[Iterable[Tuple[str, Any]]] = None,
    on_step: Optional[Callable[[StepRecord], Any]] = None,
    fold: Optional[bool] = None,
    measure_in_backward: Any = False,
    options: ClipOptions,
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

    Sharded training: with FSDP2 or tensor parallel (DTensor gradients) the
    norm is combined over the mesh by itself. A ``ZeroRedundancyOptimizer``
    holds every parameter in its ``param_groups`` with the full (all-reduced)
    gradient on each rank: attach to it (not to its local ``.optim``) and the
    norm is the global one. Plain tensors that are disjoint shards of one
    model (FSDP1's flat parameters, hand-made tensor parallel, pipeline
    stages) need ``process_group`` (and ``replicated`` for what every rank of
    the first group holds whole); FSDP1's flat parameters without it are
    refused rather than clipped by a local norm.

    Fused optimizers (``fused=True`` Adam, AdamW, SGD, Adagrad) under one
    ``global_clipnorm``: the clip only reads the gradients and hands the
    coefficient to the step as its ``grad_scale`` (``fold``, default on where
    it applies; ``fold=False`` rewrites the gradients before the step).
    On CUDA the coefficient and, under ``nonfinite='skip'``, the step's
    ``found_inf`` stay on the device (no host sync; ``handle.last`` is made when
    read). ``measure_in_backward=True`` also moves that read into backward: a
    post-accumulate-grad hook on each CPU parameter of at least 32768 elements
    reads its gradient right after autograd wrote it; the step uses those norms
    while they are still true (same tensor, unchanged since) and reads the rest
    in one call. Under gradient accumulation each backward measures again, so
    the last micro-batch's (the final gradients') norms are used. Under DDP pass
    the model instead, ``measure_in_backward=ddp_model`` (CPU gradients): a
    communication hook all-reduces each bucket as DDP's default does and then
    reads the reduced gradients in it.

    Under ``torch.compile(optimizer.step)`` a clip that is torch's rule (one
    ``global_clipnorm``, ``nonfinite='propagate'``, torch's eps, no per-group
    limits, fold, GradScaler or ``on_step``) is traced as the
    ``gradclip::clip_grad_norm_`` op, without a record; other clips run eagerly.
    """
    return ClipHandle(optimizer, Engine(options), named_parameters, on_step, fold, measure_in_backward)
