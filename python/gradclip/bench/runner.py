"""Runs the benchmark: ceilings first, then every (workload, dtype, mode) case
with all contenders interleaved on the same gradients."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import ceilings as _ceilings
from . import env as _env
from . import workloads as _workloads
from .competitors import (
    CLIP_FRACTION, CONTENDERS, COMPETITORS, GRAD_STD, LABELS, MODE_OPS, MODES, NOCLIP_FACTOR, VALUE_CLIP, Case,
    Options, Skip, applies, build, check, float64_norm,
)
from .timing import RoundPolicy, Stats, interleaved

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                 "half": "fp16", "f16": "fp16"}
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}

TORCH_MISSING = (
    "the gradclip benchmark needs PyTorch (gradclip itself does not). Install a CPU build with\n"
    "    pip install torch --index-url https://download.pytorch.org/whl/cpu\n"
    "and, for plots, pip install 'gradclip[bench]'."
)


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise SystemExit(f"gradclip bench: {TORCH_MISSING}") from None
    return torch


def dtype_name(text: str) -> str:
    key = text.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; choose from fp32, bf16, fp16")
    return key


@dataclass
class Config:
    device: str = "cpu"
    workloads: Tuple[str, ...] = _workloads.CPU_DEFAULT_WORKLOADS
    dtypes: Tuple[str, ...] = ("fp32", "bf16", "fp16")
    modes: Tuple[str, ...] = MODES
    contenders: Tuple[str, ...] = CONTENDERS
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    threads: Optional[int] = None
    compile_max_tensors: int = 256
    seed: int = 0
    ceiling_bytes: int = 256 << 20
    ceiling_rounds: int = 15
    quick: bool = False


def _bytes_and_floor(mode: str, nbytes: int, ceil: Dict[str, Any]) -> Tuple[int, float, str]:
    """Bytes that must move, the time floor at this machine's ceilings, and its name."""
    read = ceil["read_gbs"] * 1e9
    rw = ceil["read_write_gbs"] * 1e9
    if mode == "norm-noclip":
        return nbytes, nbytes / read, "read"
    if mode == "norm-clip":
        return 3 * nbytes, nbytes / read + 2 * nbytes / rw, "read + read_write"
    if mode == "step":
        # The floor of the clip's share of a step: one read pass for the norm (the step
        # itself can apply the coefficient). Compared with the clip's added cost, not the step.
        return nbytes, nbytes / read, "read (the clip's added cost)"
    return 2 * nbytes, 2 * nbytes / rw, "read_write"


class Gradients:
    """Parameters with .grad set, and a pristine copy, for one workload and dtype."""

    def __init__(self, torch: Any, workload: _workloads.Workload, dtype: str, device: str, seed: int) -> None:
        tdtype = getattr(torch, DTYPES[dtype])
        dev = torch.device(device)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        self.params: List[Any] = []
        self.grads: List[Any] = []
        for shape in workload.shapes:
            # Drawn in float32 and rounded, so every dtype holds the same gradients.
            g = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).mul_(GRAD_STD).to(tdtype)
            p = torch.nn.Parameter(torch.empty(shape, dtype=tdtype, device=dev))  # never touched: no memory used
            p.grad = g
            self.params.append(p)
            self.grads.append(g)
        self.pristine = [g.clone() for g in self.grads]
        self.true_norm = float64_norm(torch, self.pristine)
        self._torch = torch
        self._np_pairs: List[Tuple[Any, Any]] = []
        if dev.type == "cpu":
            # NumPy views of the raw bits (NumPy has no bfloat16) for restore().
            raw = torch.int32 if ITEMSIZE[dtype] == 4 else torch.int16
            self._np_pairs = [(g.view(raw).numpy(), p.view(raw).numpy()) for g, p in zip(self.grads, self.pristine)]

    def restore(self) -> None:
        """Put the pristine gradients back. On the CPU this is a single-threaded
        NumPy copy: torch's parallel copy would leave its OpenMP workers
        spin-waiting, which slows whichever contender runs next by a varying
        amount (up to ~5 ms on 2 cores); every contender starts from a quiet machine."""
        if self._np_pairs:
            copyto = np.copyto
            for dst, src in self._np_pairs:
                copyto(dst, src)
        else:
            self._torch._foreach_copy_(self.grads, self.pristine)


def _limit(mode: str, true_norm: float) -> float:
    if mode in ("norm-clip", "step"):
        return CLIP_FRACTION * true_norm
    if mode == "norm-noclip":
        return NOCLIP_FACTOR * true_norm
    return VALUE_CLIP


def _warn(msg: str) -> None:
    print(f"gradclip bench: {msg}", file=sys.stderr, flush=True)


ProgressFn = Callable[[float, str], None]


def plan(config: Config) -> List[Tuple[str, str, str]]:
    return [(w, d, m) for w in config.workloads for d in config.dtypes for m in config.modes]


def run(config: Config, progress: Optional[ProgressFn] = None) -> Dict[str, Any]:
    torch = require_torch()
    import gradclip

    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gradclip bench: --device cuda, but torch sees no CUDA device")
    if config.threads:
        torch.set_num_threads(config.threads)
        gradclip.set_num_threads(config.threads)
    if "torch_compile" in config.contenders and config.compile_max_tensors > 0:
        # Compile in this process: a pool of compile workers would linger beside the timings.
        torch._inductor.config.compile_threads = 1
    sync = (lambda: torch.cuda.synchronize()) if config.device == "cuda" else (lambda: None)
    report = progress or (lambda frac, label: None)
    options = Options(compile_max_tensors=config.compile_max_tensors)

    quietness = _env.Quietness()
    meta = _env.collect(torch, config.device)
    meta["quick"] = config.quick
    if quietness.busy_at_start(meta["cpu_count"] or 1):
        _warn(f"load average {quietness.loadavg_start} on {meta['cpu_count']} cores at the start: if other "
              "processes are running, timings will be noisy")
    cases = plan(config)
    # Progress weights: bytes each case touches (gradients x contenders), plus the ceilings.
    weights = [
        _workloads.get(w).elements * ITEMSIZE[d] * len(config.contenders) + (1 << 22) for w, d, _ in cases
    ]
    ceiling_weight = config.ceiling_bytes * config.ceiling_rounds // 2  # ~7 methods x rounds, vs ~25 passes a case
    total = float(sum(weights) + ceiling_weight)
    done = 0.0

    report(0.0, "measuring bandwidth ceilings")
    ceil = _ceilings.measure(torch, config.device, config.ceiling_bytes, config.ceiling_rounds)
    done += ceiling_weight
    rows: List[Dict[str, Any]] = []
    index = 0
    for wname in config.workloads:
        workload = _workloads.get(wname)
        for dtype in config.dtypes:
            report(done / total, f"{wname} {dtype}: generating gradients")
            grads = Gradients(torch, workload, dtype, config.device, config.seed)
            for mode in config.modes:
                report(done / total, f"{wname} {dtype} {mode}")
                rows.extend(_run_case(torch, config, options, meta, ceil, workload, dtype, mode, grads, sync))
                done += weights[index]
                index += 1
            del grads
    report(1.0, "done")
    meta.update(quietness.finish(meta["cpu_count"]))
    if meta["noisy"]:
        from .report import conditions

        _warn(f"{conditions(meta)}: the results are marked noisy and no goal is judged")
    return {
        "schema": "gradclip-bench/1",
        "meta": meta,
        "config": _config_dict(config),
        "ceilings": ceil,
        "rows": rows,
    }


def _clip_costs(rows: Dict[str, Dict[str, Any]], stats: Dict[str, Stats], read_pass_s: float) -> None:
    """Step mode: what the clip adds to the step (median less the step alone's),
    in seconds and in read passes of the gradients; for gradclip also as a share
    of the faster torch clip's added cost. Bandwidth and 'of ceiling' then
    describe the clip's cost, not the whole step."""
    bare = stats.get("no_clip")
    for name, row in rows.items():
        row["effective_gbs"] = row["fraction_of_ceiling"] = None
        if bare is None or name not in stats or name == "no_clip":
            continue
        cost = stats[name].median - bare.median
        row["clip_cost_s"] = cost
        row["clip_cost_read_passes"] = cost / read_pass_s
        row["fraction_of_ceiling"] = read_pass_s / cost if cost > 0 else None
    torch_costs = [rows[n]["clip_cost_s"] for n in ("torch_foreach", "torch_loop") if "clip_cost_s" in rows.get(n, {})]
    g = rows.get("gradclip", {})
    if torch_costs and "clip_cost_s" in g and min(torch_costs) > 0:
        g["clip_cost_share_of_torch"] = g["clip_cost_s"] / min(torch_costs)


def _config_dict(config: Config) -> Dict[str, Any]:
    d = asdict(config)
    d["policy"] = asdict(config.policy)
    for k in ("workloads", "dtypes", "modes", "contenders"):
        d[k] = list(d[k])
    return d


def _run_case(torch: Any, config: Config, options: Options, meta: Dict[str, Any], ceil: Dict[str, Any],
              workload: _workloads.Workload, dtype: str, mode: str, grads: Gradients,
              sync: Callable[[], None]) -> List[Dict[str, Any]]:
    limit = _limit(mode, grads.true_norm)
    case = Case(workload, dtype, config.device, mode, grads.params, grads.grads, grads.pristine,
                grads.true_norm, limit)
    nbytes = workload.elements * ITEMSIZE[dtype]
    moved, floor_s, floor_kind = _bytes_and_floor(mode, nbytes, ceil)
    base: Dict[str, Any] = {
        "workload": workload.name,
        "mode": mode,
        "op": MODE_OPS[mode],
        "tensors": workload.tensors,
        "elements": workload.elements,
        "dtype": dtype,
        "gradient_bytes": nbytes,
        "limit": limit,
        "true_norm": grads.true_norm,
        "bytes_moved": moved,
        "floor_kind": floor_kind,
        "floor_s": floor_s,
        "ceiling_gbs": moved / floor_s / 1e9,
        "ceiling_read_gbs": ceil["read_gbs"],
        "ceiling_read_write_gbs": ceil["read_write_gbs"],
        "ceiling_copy_gbs": ceil["copy_gbs"],
        **meta,
    }
    calls: Dict[str, Callable[[], object]] = {}
    extra: Dict[str, Dict[str, Any]] = {}
    rows: Dict[str, Dict[str, Any]] = {}
    for name in config.contenders:
        if not applies(name, mode):
            continue
        row = {**base, "contender": name, "label": LABELS[name], "status": "ok"}
        rows[name] = row
        try:
            built = build(name, case, torch, options)
        except Skip as why:
            row["status"] = f"skipped: {why}"
            continue
        # One checked call before timing: the contender must do this mode's work.
        grads.restore()
        sync()
        try:
            returned = built.fn()
            sync()
        except Exception as exc:  # a contender that cannot run here (e.g. no kernels for this device)
            row["status"] = f"error: {type(exc).__name__}: {exc}"
            _warn(f"{name} failed on {workload.name} {dtype} {mode}: {row['status']}")
            continue
        problem, rel_error = check(case, torch, returned)
        row["norm_rel_error"] = rel_error
        if problem:
            row["status"] = f"wrong result: {problem}"
            _warn(f"{name} on {workload.name} {dtype} {mode}: {problem}; not timed")
            continue
        calls[name] = built.fn
        extra[name] = {"compile_s": built.compile_s}
    samples = interleaved(calls, grads.restore, sync, config.policy) if calls else {}
    stats = {name: Stats.of(s) for name, s in samples.items()}
    for name, st in stats.items():
        rows[name].update(
            rounds=st.n, warmup=config.policy.warmup, median_s=st.median, p20_s=st.p20, p80_s=st.p80,
            min_s=st.min, mean_s=st.mean, effective_gbs=moved / st.median / 1e9,
            fraction_of_ceiling=floor_s / st.median, **extra[name],
        )
    if mode == "step":
        _clip_costs(rows, stats, floor_s)
    ref = stats.get("gradclip")
    for name, st in stats.items():
        if ref is None or name == "gradclip":
            continue
        ratio = st.median / ref.median
        rows[name]["gradclip_speedup"] = ratio
        rows["gradclip"][f"speedup_vs_{name}"] = ratio
    if ref is not None:
        torch_eager = [stats[n].median for n in ("torch_foreach", "torch_loop") if n in stats]
        if torch_eager:
            rows["gradclip"]["speedup_vs_best_torch_eager"] = min(torch_eager) / ref.median
    return list(rows.values())


def competitors_in(rows: Sequence[Dict[str, Any]]) -> List[str]:
    present = {r["contender"] for r in rows if r.get("median_s") is not None}
    return [c for c in COMPETITORS if c in present]


__all__ = ["Config", "DTYPES", "dtype_name", "plan", "require_torch", "run", "competitors_in"]
