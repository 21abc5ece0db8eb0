"""Turning a run into a table (text or Markdown), JSON, CSV, and the check against the CPU goals."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .competitors import COMPETITORS

SHORT = {"torch_foreach": "foreach", "torch_loop": "loop", "torch_compile": "compile", "numpy": "numpy",
         "no_clip": "no clip", "gradclip": "gradclip"}

# The goals set for gradclip on a 2-core CPU: (what is measured, workload, dtype, mode, quantity, required).
# "vs torch" is against the faster of foreach=True / foreach=False.
CPU_GOALS = (
    (">= 15x torch, 2000 small tensors (clipped)", "tiny-2000", "fp32", "norm-clip", "speedup", 15.0),
    (">= 15x torch, 2000 small tensors (not clipped)", "tiny-2000", "fp32", "norm-noclip", "speedup", 15.0),
    (">= 1.2x torch, 64M set clipped", "transformer-64m", "fp32", "norm-clip", "speedup", 1.2),
    (">= 2.5x torch, 64M set not clipped", "transformer-64m", "fp32", "norm-noclip", "speedup", 2.5),
    (">= 2x torch, 64M set bf16 clipped", "transformer-64m", "bf16", "norm-clip", "speedup", 2.0),
    (">= 2x torch, 64M set bf16 not clipped", "transformer-64m", "bf16", "norm-noclip", "speedup", 2.0),
    (">= 85% of the two-pass floor, 64M set clipped", "transformer-64m", "fp32", "norm-clip", "fraction", 0.85),
    (">= 1.2x torch, clip + fused AdamW step, BERT-base fp32", "bert-base", "fp32", "step", "speedup", 1.2),
    (">= 1.2x torch, clip + fused AdamW step, GPT-2 bf16", "gpt2-small", "bf16", "step", "speedup", 1.2),
    ("clip adds <= 40% of torch's clip cost to the step, BERT-base fp32", "bert-base", "fp32", "step",
     "cost_share", 0.4),
    ("clip adds <= 40% of torch's clip cost to the step, GPT-2 bf16", "gpt2-small", "bf16", "step",
     "cost_share", 0.4),
)
# Quantities a goal reads from gradclip's row; "cost_share" is met at or below the requirement.
_GOAL_FIELDS = {"speedup": "speedup_vs_best_torch_eager", "fraction": "fraction_of_ceiling",
                "cost_share": "clip_cost_share_of_torch"}

# A goal's verdict: a noisy run is not judged, whatever it measured.
MET, MISSED, NOT_JUDGED = "met", "missed", "not judged (noisy run)"


def gradclip_rows(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if r["contender"] == "gradclip"]


def find_row(rows: Sequence[Dict[str, Any]], workload: str, dtype: str, mode: str, contender: str = "gradclip"):
    """The row of one (workload, dtype, mode, contender), or None."""
    for r in rows:
        if (r["workload"], r["dtype"], r["mode"], r["contender"]) == (workload, dtype, mode, contender):
            return r
    return None


def goals(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The CPU goals this run measured, each with the value and its verdict."""
    if result["meta"]["device"] != "cpu":
        return []
    noisy = bool(result["meta"].get("noisy"))
    out = []
    for name, workload, dtype, mode, quantity, required in CPU_GOALS:
        row = find_row(result["rows"], workload, dtype, mode)
        if row is None or row.get("median_s") is None:
            continue
        value = row.get(_GOAL_FIELDS[quantity])
        if value is None:
            continue
        met = value <= required if quantity == "cost_share" else value >= required
        verdict = NOT_JUDGED if noisy else (MET if met else MISSED)
        out.append({"goal": name, "workload": workload, "dtype": dtype, "mode": mode, "quantity": quantity,
                    "required": required, "measured": value, "verdict": verdict})
    return out


def conditions(meta: Dict[str, Any]) -> str:
    """The run's conditions in one line: the machine, full or --quick, the load
    average at the start and the end, and whether other work made it noisy."""
    hw = meta["gpu_name"] if meta["device"] == "cuda" else f"{meta['cpu_model']}, {meta['cpu_count']} cores"

    def load(v: Optional[float]) -> str:
        return "?" if v is None else f"{v:.2f}"

    text = (f"{hw}; {'--quick run' if meta.get('quick') else 'full run'}; load average {load(meta.get('loadavg_start'))} "
            f"at the start, {load(meta.get('loadavg_end'))} at the end")
    others = meta.get("other_busy_cores")
    if others is not None:
        text += f"; other processes used {others:.2f} cores on average"
    if "noisy" in meta:
        text += "; NOISY: other work ran beside it" if meta["noisy"] else "; quiet"
    return text


# ---------------------------------------------------------------------------
# Tables

def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3g}" if s * 1e3 < 100 else f"{s * 1e3:.0f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _table_rows(result: Dict[str, Any], dtype: Optional[str] = None) -> List[List[str]]:
    rows = [r for r in result["rows"] if dtype is None or r["dtype"] == dtype]
    comps = [c for c in COMPETITORS if any(r["contender"] == c and r.get("median_s") for r in rows)]
    header = ["workload", "dtype", "mode", "tensors", "elements", "gradclip ms (p20-p80)", "GB/s", "of ceiling"]
    header += [f"vs {SHORT[c]}" for c in comps] + ["best torch of ceiling"]
    out = [header]
    for g in gradclip_rows(rows):
        if g.get("median_s") is None:
            out.append([g["workload"], g["dtype"], g["mode"], str(g["tensors"]), f"{g['elements'] / 1e6:.1f}M",
                        g["status"]] + [""] * (len(header) - 6))
            continue
        torch_fracs = [r.get("fraction_of_ceiling") for r in rows
                       if (r["workload"], r["dtype"], r["mode"]) == (g["workload"], g["dtype"], g["mode"])
                       and r["contender"] in ("torch_foreach", "torch_loop") and r.get("fraction_of_ceiling")]
        line = [
            g["workload"], g["dtype"], g["mode"], str(g["tensors"]), f"{g['elements'] / 1e6:.1f}M",
            f"{_fmt_time(g['median_s'])} ({_fmt_time(g['p20_s'])}-{_fmt_time(g['p80_s'])})",
            "-" if g.get("effective_gbs") is None else f"{g['effective_gbs']:.1f}", _pct(g["fraction_of_ceiling"]),
        ]
        line += [_x(g.get(f"speedup_vs_{c}")) for c in comps]
        line.append(_pct(max(torch_fracs)) if torch_fracs else "-")
        out.append(line)
    return out


def caption(result: Dict[str, Any]) -> str:
    m, c = result["meta"], result["ceilings"]
    rounds = sorted({r["rounds"] for r in result["rows"] if r.get("rounds")})
    rr = f"{rounds[0]}" if len(rounds) == 1 else (f"{rounds[0]}-{rounds[-1]}" if rounds else "?")
    hw = m["gpu_name"] if m["device"] == "cuda" else f"{m['cpu_model']}, {m['cpu_count']} cores"
    return (
        f"{hw}; torch {m['torch_version']} ({m['threads']} threads), gradclip {m['gradclip_version']} "
        f"({m['gradclip_isa']}, {m['gradclip_threads']} threads), commit {m['commit']}, {m['timestamp']}. "
        f"Median of {rr} interleaved repetitions (p20-p80 in brackets), inputs restored before every call. "
        f"Ceilings measured in the same run on {c['buffer_bytes'] >> 20} MiB: read {c['read_gbs']:.1f} GB/s, "
        f"read+write {c['read_write_gbs']:.1f} GB/s. 'of ceiling' = time floor / median, where the floor is one "
        f"read pass (norm-noclip), read + read/write passes (norm-clip) or one read/write pass (value-clip); "
        f"in the step mode (clip + fused AdamW step) 'of ceiling' is one read pass / the clip's added cost "
        f"(the step's median less the step alone's); "
        f"'vs X' = X's median / gradclip's median. Conditions: {conditions(m)}."
    )


def text_table(result: Dict[str, Any]) -> str:
    rows = _table_rows(result)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(result: Dict[str, Any], dtype: Optional[str] = None) -> str:
    rows = _table_rows(result, dtype)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(rows[0]) - 3)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def goals_text(gs: Sequence[Dict[str, Any]]) -> str:
    if not gs:
        return ""
    lines = ["Goals (speedups against the faster of torch foreach=True/False):"]
    for g in gs:
        value = _x(g["measured"]) if g["quantity"] == "speedup" else _pct(g["measured"])
        lines.append(f"  {g['goal']}: {value}, {g['verdict']}")
    return "\n".join(lines)


def step_text(result: Dict[str, Any]) -> str:
    """The step mode in words: each contender's step, and what its clip adds to
    the step alone, in milliseconds and in read passes of the gradients."""
    lines = []
    for g in gradclip_rows(result["rows"]):
        if g["mode"] != "step" or g.get("median_s") is None:
            continue
        parts = []
        for r in result["rows"]:
            if (r["workload"], r["dtype"], r["mode"]) != (g["workload"], g["dtype"], "step") or not r.get("median_s"):
                continue
            cost = r.get("clip_cost_s")
            extra = "" if cost is None else f" (clip {cost * 1e3:+.1f} ms = {r['clip_cost_read_passes']:.2f} read passes)"
            parts.append(f"{SHORT.get(r['contender'], r['contender'])} {r['median_s'] * 1e3:.1f} ms{extra}")
        share = g.get("clip_cost_share_of_torch")
        tail = "" if share is None else f"; gradclip's clip costs {_pct(share)} of torch's"
        lines.append(f"  {g['workload']} {g['dtype']}: " + ", ".join(parts) + tail)
    return ("Clip + fused AdamW step (the step alone = no clip):\n" + "\n".join(lines)) if lines else ""


def skipped_text(result: Dict[str, Any]) -> str:
    notes: Dict[str, List[str]] = {}
    for r in result["rows"]:
        if r["status"] != "ok":
            notes.setdefault(f"{r['contender']}: {r['status']}", []).append(f"{r['workload']} {r['dtype']} {r['mode']}")
    lines = []
    for note, where in notes.items():
        lines.append(f"  {note} ({len(where)} case{'s' if len(where) > 1 else ''})")
    return ("Not timed:\n" + "\n".join(lines)) if lines else ""


# ---------------------------------------------------------------------------
# Files

_FIRST_COLUMNS = [
    "workload", "mode", "op", "dtype", "contender", "label", "status", "tensors", "elements", "gradient_bytes",
    "median_s", "p20_s", "p80_s", "min_s", "mean_s", "rounds", "warmup", "bytes_moved", "effective_gbs",
    "floor_kind", "floor_s", "ceiling_gbs", "fraction_of_ceiling", "gradclip_speedup",
    "speedup_vs_best_torch_eager", *[f"speedup_vs_{c}" for c in COMPETITORS], "compile_s",
    "norm_rel_error", "ceiling_read_gbs", "ceiling_read_write_gbs", "ceiling_copy_gbs", "limit", "true_norm",
]


def write_json(result: Dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")


# Conditions of the whole run, repeated on every CSV row so that no row can be read without them.
_RUN_COLUMNS = ("device_name", "quick", "loadavg_start", "loadavg_end", "other_busy_cores", "noisy", "commit",
                "timestamp")


def write_csv(result: Dict[str, Any], path: Path) -> None:
    keys: List[str] = list(_FIRST_COLUMNS)
    for r in result["rows"]:
        keys += [k for k in r if k not in keys]
    keys += [f"run_{k}" for k in _RUN_COLUMNS]
    run = {f"run_{k}": result["meta"].get(k, "") for k in _RUN_COLUMNS}
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**{k: r.get(k, "") for k in keys}, **run})


def write_markdown(result: Dict[str, Any], path: Path) -> None:
    """One table per dtype (a README can take the one it needs), then the caption."""
    parts: List[str] = [f"Run: {conditions(result['meta'])}.", ""]
    for dtype in ("fp32", "bf16", "fp16"):
        if any(r["dtype"] == dtype for r in result["rows"]):
            parts += [f"### {dtype}", "", markdown_table(result, dtype), ""]
    parts.append(caption(result))
    st = step_text(result)
    if st:
        parts += ["", "```", st, "```"]
    t = goals_text(result.get("goals", []))
    if t:
        parts += ["", "```", t, "```"]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def load(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
