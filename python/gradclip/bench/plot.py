"""PNG plots from a results JSON (matplotlib, the ``[bench]`` extra). Plotting
reads only the JSON: it never measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from . import report
from .competitors import COMPETITORS, LABELS, MODES

COLORS = {"torch_foreach": "#4c72b0", "torch_loop": "#8da0cb", "torch_compile": "#55a868", "numpy": "#c44e52",
          "gradclip": "#dd8452"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("gradclip plot: needs matplotlib: pip install 'gradclip[bench]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(result: Dict[str, Any]):
    rows = result["rows"]
    dtypes = [d for d in ("fp32", "bf16", "fp16") if any(r["dtype"] == d for r in rows)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    workloads: List[str] = []
    for r in rows:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
    return rows, dtypes, modes, workloads


def _get(rows, workload, dtype, mode, contender) -> Optional[Dict[str, Any]]:
    for r in rows:
        if (r["workload"], r["dtype"], r["mode"], r["contender"]) == (workload, dtype, mode, contender):
            return r
    return None


def _short_caption(result: Dict[str, Any]) -> str:
    m, c = result["meta"], result["ceilings"]
    rounds = sorted({r["rounds"] for r in result["rows"] if r.get("rounds")})
    rr = f"{rounds[0]}-{rounds[-1]}" if rounds else "?"
    hw = m["gpu_name"] if m["device"] == "cuda" else f"{m['cpu_model']} ({m['cpu_count']} cores)"
    return (f"{hw}, torch {m['torch_version']}, gradclip {m['gradclip_version']} ({m['gradclip_isa']}), "
            f"commit {m['commit']}, {m['timestamp'][:10]}. Median of {rr} interleaved repetitions; "
            f"ceilings read {c['read_gbs']:.1f} / read+write {c['read_write_gbs']:.1f} GB/s")


def plot_speedup(result: Dict[str, Any], path: Path, dpi: int = 100) -> Path:
    """gradclip's speedup over each competitor (median ratio), per workload, one
    panel per (dtype, mode)."""
    plt = _pyplot()
    from matplotlib import ticker

    rows, dtypes, modes, workloads = _grid(result)
    comps = [c for c in COMPETITORS if any(r["contender"] == c and r.get("median_s") for r in rows)]
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(4.2 * len(modes), 0.32 * len(workloads) * len(dtypes)
                                                              * max(len(comps), 2) / 2 + 1.2),
                             squeeze=False, sharey=True)
    height = 0.8 / max(len(comps), 1)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for k, comp in enumerate(comps):
                ys, xs = [], []
                for w_i, w in enumerate(workloads):
                    g = _get(rows, w, dtype, mode, "gradclip")
                    v = g.get(f"speedup_vs_{comp}") if g else None
                    if v:
                        ys.append(w_i + (k - (len(comps) - 1) / 2) * height)
                        xs.append(v)
                ax.barh(ys, xs, height=height, color=COLORS[comp], label=LABELS[comp])
                for y, x in zip(ys, xs):
                    ax.text(x * 1.04, y, f"{x:.1f}" if x >= 10 else f"{x:.2f}", va="center", fontsize=6)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100, 200]))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_yticks(range(len(workloads)))
            ax.set_yticklabels(workloads, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{dtype} {mode}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", which="both", alpha=0.25)
            if i == len(dtypes) - 1:
                ax.set_xlabel("gradclip speedup (competitor median / gradclip median)", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(comps), fontsize=8, frameon=False)
    fig.suptitle(_short_caption(result), fontsize=7, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_bandwidth(result: Dict[str, Any], path: Path, dpi: int = 100) -> Path:
    """Fraction of this machine's ceiling (time floor / median) for gradclip and
    the competitors, per workload, one panel per (dtype, mode)."""
    plt = _pyplot()
    rows, dtypes, modes, workloads = _grid(result)
    contenders = ["gradclip"] + [c for c in COMPETITORS if any(r["contender"] == c and r.get("median_s") for r in rows)]
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(4.2 * len(modes), 0.3 * len(workloads) * len(dtypes)
                                                              * len(contenders) / 2 + 1.2),
                             squeeze=False, sharey=True)
    height = 0.8 / len(contenders)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for k, comp in enumerate(contenders):
                ys, xs = [], []
                for w_i, w in enumerate(workloads):
                    r = _get(rows, w, dtype, mode, comp)
                    if r and r.get("fraction_of_ceiling"):
                        ys.append(w_i + (k - (len(contenders) - 1) / 2) * height)
                        xs.append(100 * r["fraction_of_ceiling"])
                ax.barh(ys, xs, height=height, color=COLORS[comp], label=LABELS[comp])
            ax.axvline(100.0, color="black", lw=0.8)
            ax.set_yticks(range(len(workloads)))
            ax.set_yticklabels(workloads, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{dtype} {mode}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", alpha=0.25)
            if i == len(dtypes) - 1:
                ax.set_xlabel("% of the bandwidth ceiling (time floor / median)", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(contenders), fontsize=8, frameon=False)
    fig.suptitle(_short_caption(result) + ". Cache-resident sets (tiny-2000) can exceed 100%.",
                 fontsize=7, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_file(json_path: Path, out_dir: Optional[Path] = None, dpi: int = 100) -> List[Path]:
    result = report.load(json_path)
    out = out_dir or json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = json_path.stem
    return [
        plot_speedup(result, out / f"{stem}_speedup.png", dpi),
        plot_bandwidth(result, out / f"{stem}_bandwidth.png", dpi),
    ]
