"""The contenders, all timed in the same process on the same gradients.

* ``gradclip``: :func:`gradclip.clip_grad_norm_` / :func:`gradclip.clip_grad_value_`.
* ``torch_foreach`` / ``torch_loop``: ``torch.nn.utils.clip_grad_norm_`` /
  ``clip_grad_value_`` with ``foreach=True`` / ``foreach=False``.
* ``torch_compile``: ``torch.compile`` of torch's eager foreach clip
  (:func:`torch_foreach_clip_norm`), norm clipping only; compile time is
  measured on its own and kept out of the timings.
* ``numpy``: the obvious NumPy code (:func:`numpy_clip_grad_norm_`,
  :func:`numpy_clip_grad_value_`) on zero-copy views of the same gradients;
  CPU and float32 only.
* ``no_clip``: in the ``step`` mode only, the optimizer step without any clip,
  which the clip's added cost is measured against.

The ``step`` mode times a whole optimizer step with clipping, as training runs
it: torch's ``clip_grad_norm_`` then a fused AdamW step, against gradclip's
:func:`gradclip.attach` on the same fused AdamW with its defaults (one read pass
for the norm, the coefficient folded into the step's ``grad_scale``, except for
bfloat16 on the CPU, where attach rewrites the gradients first: faster there).
Each contender has its own optimizer (its own state) over the same parameters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .workloads import Workload

CONTENDERS = ("gradclip", "torch_foreach", "torch_loop", "torch_compile", "numpy", "no_clip")
COMPETITORS = CONTENDERS[1:]

LABELS = {
    "gradclip": "gradclip",
    "torch_foreach": "torch foreach=True",
    "torch_loop": "torch foreach=False",
    "torch_compile": "torch.compile(eager foreach clip)",
    "numpy": "NumPy reference",
    "no_clip": "the step alone (no clip)",
}

MODES = ("norm-clip", "norm-noclip", "value-clip", "step")
MODE_OPS = {"norm-clip": "clip_grad_norm_", "norm-noclip": "clip_grad_norm_", "value-clip": "clip_grad_value_",
            "step": "clip_grad_norm_ + AdamW(fused=True).step"}

# The step mode's optimizer: small enough a learning rate that the parameters stay
# ordinary numbers over hundreds of timed steps.
STEP_LR = 1e-5


def applies(name: str, mode: str) -> bool:
    """Whether contender ``name`` takes part in ``mode`` at all (a contender that
    applies but cannot run in one configuration raises :class:`Skip` instead)."""
    if mode == "step":
        return name in ("gradclip", "torch_foreach", "torch_loop", "no_clip")
    return name != "no_clip"

# max_norm relative to the true norm: 0.5x always clips; 2x never does.
CLIP_FRACTION = 0.5
NOCLIP_FACTOR = 2.0
# Gradients are i.i.d. N(0, GRAD_STD^2); value clipping at 1.645 sigma clamps
# about 10% of the elements, so nearly every cache line is rewritten.
GRAD_STD = 1e-2
VALUE_CLIP = 1.645 * GRAD_STD


class Skip(Exception):
    """A contender that does not run in this configuration; the message says why."""


@dataclass
class Case:
    workload: Workload
    dtype: str           # "fp32" | "bf16" | "fp16"
    device: str          # "cpu" | "cuda"
    mode: str            # one of MODES
    params: List[Any]    # nn.Parameter with .grad set
    grads: List[Any]     # the .grad tensors
    pristine: List[Any]  # untouched copies, restored before every timed call
    true_norm: float     # float64 norm of the pristine gradients
    limit: float         # max_norm (norm modes) or clip_value (value mode)


@dataclass
class Options:
    compile_max_tensors: int = 256


# ---------------------------------------------------------------------------
# Reference implementations (also imported by bench/test_bench_clip.py).

def numpy_clip_grad_norm_(arrays: Sequence[np.ndarray], max_norm: float, eps: float = 1e-6) -> float:
    """The obvious NumPy clip: per-array norms, their norm, then scale every
    array by ``min(max_norm / (total + eps), 1)`` (always, as torch does)."""
    norms = np.array([np.linalg.norm(a.reshape(-1)) for a in arrays], dtype=np.float64)
    total = float(np.linalg.norm(norms))
    coef = min(max_norm / (total + eps), 1.0)
    for a in arrays:
        a *= coef
    return total


def numpy_clip_grad_value_(arrays: Sequence[np.ndarray], clip_value: float) -> None:
    for a in arrays:
        np.clip(a, -clip_value, clip_value, out=a)


def torch_foreach_clip_norm(grads: List[Any], max_norm: Any) -> Any:
    """torch 2.13's ``clip_grad_norm_(foreach=True)`` for one (device, dtype)
    group, written out with ``max_norm`` as a 0-d tensor: torch's own function
    calls ``float(max_norm)``, which would make ``torch.compile`` build a new
    graph for every max_norm value."""
    import torch

    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(list(norms)), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)
    return total


# ---------------------------------------------------------------------------

_compiled: Dict[str, Any] = {"key": None, "fn": None}


def compiled_clip(torch: Any, key: tuple) -> Any:
    """One compiled function per (workload, dtype), shared by its modes. Dynamo
    is reset between keys: otherwise it would pile up guarded variants of the
    same code object, turn shapes dynamic after the first recompile, and fall
    back to eager after ``recompile_limit`` variants."""
    if _compiled["key"] != key:
        torch._dynamo.reset()
        _compiled["fn"] = torch.compile(torch_foreach_clip_norm, dynamic=False)
        _compiled["key"] = key
    return _compiled["fn"]


@dataclass
class Built:
    fn: Callable[[], object]
    compile_s: Optional[float] = None


def build(name: str, case: Case, torch: Any, options: Options) -> Built:
    """A zero-argument callable doing one clip of ``case`` with contender ``name``.
    Raises :class:`Skip` when the contender does not apply."""
    if case.mode == "step":
        return _build_step(name, case, torch)
    value = case.mode == "value-clip"
    params, limit = case.params, case.limit
    if name == "gradclip":
        import gradclip

        if value:
            return Built(lambda: gradclip.clip_grad_value_(params, limit))
        return Built(lambda: gradclip.clip_grad_norm_(params, limit))
    if name in ("torch_foreach", "torch_loop"):
        foreach = name == "torch_foreach"
        utils = torch.nn.utils
        if value:
            return Built(lambda: utils.clip_grad_value_(params, limit, foreach=foreach))
        return Built(lambda: utils.clip_grad_norm_(params, limit, foreach=foreach))
    if name == "torch_compile":
        if value:
            raise Skip("torch.compile is measured for norm clipping only")
        if case.workload.tensors > options.compile_max_tensors:
            raise Skip(f"{case.workload.tensors} tensors > --compile-max-tensors {options.compile_max_tensors} "
                       "(Inductor compile time grows with the tensor count)")
        fn = compiled_clip(torch, (case.workload.name, case.dtype, case.device))
        grads = case.grads
        limit_t = torch.tensor(limit, dtype=torch.float32, device=case.device)
        t0 = time.perf_counter()
        # The first call traces and compiles (Inductor's on-disk cache may serve it);
        # the other mode of the same workload and dtype reuses the graph.
        fn(grads, limit_t)
        if case.device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        return Built(lambda: fn(grads, limit_t), compile_s)
    if name == "numpy":
        if case.device != "cpu":
            raise Skip("NumPy runs on the CPU only")
        if case.dtype == "bf16":
            raise Skip("NumPy has no bfloat16")
        if case.dtype == "fp16":
            raise Skip("NumPy float16 arithmetic is not vectorised (about 0.3 GB/s here) and its float16 "
                       "dot loses accuracy; not a meaningful reference")
        arrays = [g.numpy() for g in case.grads]
        if value:
            return Built(lambda: numpy_clip_grad_value_(arrays, limit))
        return Built(lambda: numpy_clip_grad_norm_(arrays, limit))
    raise ValueError(f"unknown contender {name!r}")


class _LastTotal:
    """The total norm of an attach() handle's latest record, read when converted to float."""

    def __init__(self, handle: Any):
        self._handle = handle

    def __float__(self) -> float:
        return self._handle.last.total_norm


def _build_step(name: str, case: Case, torch: Any) -> Built:
    """One clipped optimizer step; returns the total norm the clip saw (None for
    ``no_clip``)."""
    params, limit = case.params, case.limit
    with torch.no_grad():
        for p in params:  # the runner leaves parameters unwritten; the optimizer reads them
            p.zero_()
    opt = torch.optim.AdamW(params, lr=STEP_LR, fused=True)
    if name == "gradclip":
        import gradclip

        handle = gradclip.attach(opt, global_clipnorm=limit)
        last_total = _LastTotal(handle)

        def gradclip_step():
            opt.step()
            return last_total  # read by the check only: on CUDA the record waits for the device

        return Built(gradclip_step)
    if name in ("torch_foreach", "torch_loop"):
        foreach = name == "torch_foreach"
        clip = torch.nn.utils.clip_grad_norm_

        def torch_step():
            total = clip(params, limit, foreach=foreach)
            opt.step()
            return total

        return Built(torch_step)
    if name == "no_clip":
        def bare_step():
            opt.step()

        return Built(bare_step)
    raise Skip("not part of the step mode")


# ---------------------------------------------------------------------------
# Checking one call's effect, so every timed call is known to do the right work.

# Loose on purpose: the check catches a contender that does not do the work,
# not rounding (torch's float32 norm of the 64M set is off by 2e-4).
_TOL = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}


def float64_norm(torch: Any, tensors: Sequence[Any]) -> float:
    acc = 0.0
    for t in tensors:
        acc += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
    return math.sqrt(acc)


def check(case: Case, torch: Any, returned: object) -> Tuple[Optional[str], Optional[float]]:
    """(problem or None, relative error of the returned norm or None).

    A norm-mode call (and a clipped step: a fused step writes the gradients it
    divided by its ``grad_scale`` back) must report a norm on the right side of
    ``max_norm`` (so that it clips, or does not), and leave the gradients scaled
    by its own coefficient ``min(max_norm / returned, 1)``; its norm's accuracy is
    returned, not judged (torch's 16-bit norms are off by several percent).
    A value-mode call must leave every element within the bound, some changed.
    """
    tol = _TOL[case.dtype]
    if case.mode == "value-clip":
        bound = max(float(g.abs().max()) for g in case.grads)
        limit = float(torch.tensor(case.limit, dtype=case.grads[0].dtype))  # rounded to the dtype, as torch does
        if bound > limit or all(torch.equal(g, p) for g, p in zip(case.grads, case.pristine)):
            return f"max |g| after clamping {bound:.6g}, limit {limit:.6g}", None
        return None, None
    if case.mode == "step" and returned is None:  # the step alone: no clip, gradients as they were
        if not all(torch.equal(g, p) for g, p in zip(case.grads, case.pristine)):
            return "the step without a clip changed the gradients", None
        return None, None
    total = float(returned) if returned is not None else case.true_norm
    rel_error = abs(total - case.true_norm) / case.true_norm
    if case.mode == "norm-noclip":
        if not total < case.limit:
            return f"returned norm {total:.6g} >= max_norm {case.limit:.6g} (true norm {case.true_norm:.6g})", rel_error
        if not all(torch.equal(g, p) for g, p in zip(case.grads, case.pristine)):
            return "gradients changed although the norm is below max_norm", rel_error
        return None, rel_error
    if not total > case.limit:
        return f"returned norm {total:.6g} <= max_norm {case.limit:.6g} (true norm {case.true_norm:.6g})", rel_error
    after = float64_norm(torch, case.grads)
    expected = case.true_norm * case.limit / total
    if not abs(after - expected) <= tol * expected:
        return f"norm after clipping {after:.6g}, expected {expected:.6g} from the returned norm {total:.6g}", rel_error
    return None, rel_error
