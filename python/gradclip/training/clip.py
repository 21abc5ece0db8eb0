"""The training-loop clip as a plain function, for hand-written loops."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

from .._inputs import as_list
from .engine import Engine
from .options import ClipOptions, with_clip_options
from .records import ListNames, StepRecord, names_by_id

__all__ = ["adaptive_clip_grad_", "clip_gradients_"]


@with_clip_options
def clip_gradients_(
    parameters: Any,
    *,
    named_parameters: Optional[Iterable[Tuple[str, Any]]] = None,
    options: ClipOptions,
) -> StepRecord:
    """Clip the ``.grad`` of ``parameters`` in one fused call and report what happened.

    Options (keywords, shared with :func:`gradclip.attach`): ``global_clipnorm``,
    ``clipnorm``, ``clipvalue``, ``agc``, ``norm_type=2.0``,
    ``nonfinite='propagate'``, ``eps=1e-6``, ``agc_eps=1e-3``,
    ``process_group=None``, ``replicated=None``.

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

    Sharded training: DTensor gradients (FSDP2, tensor parallel) are combined
    over their mesh; plain gradients that are shards of one model take
    ``process_group`` (and ``replicated``), as :func:`gradclip.clip_grad_norm_`.
    The record's total is then the global norm, its per-tensor norms those of
    the local shards, and every rank takes the same decision.
    """
    params = as_list(parameters)
    names = ListNames(params, names_by_id(named_parameters))
    return Engine(options).run(params, None, [options.default_limit], names)


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
