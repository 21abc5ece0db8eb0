"""PNG plots from a results JSON (matplotlib, the ``[bench]`` extra). Plotting
reads only the JSON: it never measures."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import report
from .competitors import COMPETITORS, LABELS, MODES

COLORS = {"torch_foreach": "#4c72b0", "torch_loop": "#8da0cb", "torch_compile": "#55a868", "numpy": "#c44e52",
          "gradclip": "#dd8452", "no_clip": "#8c8c8c"}

# Readable ticks for the log-scale speedup axis (only those inside the x range are used); the coarse set takes
# over where the fine one would crowd the axis.
SPEEDUP_TICKS = (0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300,
                 500, 700, 1000)
SPEEDUP_TICKS_COARSE = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_MAX_TICKS = 10

# Layout, in inches and points.
_PANEL_W = 4.2          # one column of panels (one mode)
_MIN_FIG_W = 6.5        # room for the legend row and the caption when there are only one or two modes
_BAR_H = 0.14           # panel height per bar
_PANEL_EXTRA_H = 0.8    # panel title, x tick labels and x label
_MIN_PANEL_H = 1.5
_LEGEND_H = 0.35
_HEADER_FONT = 10
_CAPTION_FONT = 7
_CAPTION_PAD = 0.06     # below the caption and between it and the x labels above
_LABEL_FONT = 6
_LABEL_OFFSET_PT = 2.0  # value label: this far right of the bar's end or its whisker, whichever is further

# One bar: (value, spread low, spread high); the spread is None where the row has no quantiles.
Bar = Tuple[float, Optional[float], Optional[float]]


class NoMatplotlib(ImportError):
    """Plotting was asked for where matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise NoMatplotlib("gradclip plot: needs matplotlib: pip install 'gradclip[bench]' (or pip install "
                           "matplotlib)") from None
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


def _positive(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in values)


def _rounds(result: Dict[str, Any]) -> str:
    rounds = sorted({r["rounds"] for r in result["rows"] if r.get("rounds")})
    if not rounds:
        return "?"
    return f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"


def _short_caption(result: Dict[str, Any]) -> str:
    """The run's conditions (machine, full or --quick, load, noisy or quiet), then the software, the commit, the
    repetitions and the ceilings."""
    m, c = result["meta"], result["ceilings"]
    commit = f"{m.get('commit', '?')}{' (dirty)' if m.get('dirty') else ''}"
    return (f"{report.conditions(m)}. torch {m['torch_version']}, gradclip {m['gradclip_version']} "
            f"({m['gradclip_isa']}), commit {commit}, {m['timestamp'][:10]}. Median of {_rounds(result)} "
            f"interleaved repetitions; ceilings read {c['read_gbs']:.1f} / read+write {c['read_write_gbs']:.1f} GB/s.")


def _header(meta: Dict[str, Any]) -> List[str]:
    """The lines above the legend: what makes the whole run suspect or partial, in a form nobody can miss."""
    parts = []
    if meta.get("noisy"):
        others = meta.get("other_busy_cores")
        used = f"other processes used {others:.2f} cores on average" if others is not None else "other work ran"
        parts.append(f"NOISY RUN: {used} while it ran; timings not reliable")
    if meta.get("quick"):
        parts.append("--quick run: fewer workloads and repetitions")
    return parts


def _fit_text(fig: Any, text: Any, paragraphs: Sequence[str], font: float) -> Any:
    """``text`` (a figure text) set to ``paragraphs``, each wrapped to lines that fit the figure's width."""
    renderer = fig.canvas.get_renderer()
    width = max(30, int(fig.get_figwidth() * 72 / (font * 0.55)))
    while True:
        text.set_text("\n".join(line for p in paragraphs for line in textwrap.wrap(p, width)))
        if text.get_window_extent(renderer).width <= 0.97 * fig.bbox.width or width <= 30:
            return text
        width = int(width * 0.93)


def _bar_figure(result: Dict[str, Any], contenders: Sequence[str], bar: Callable[..., Optional[Bar]], *,
                log: bool, label: Callable[[float], str], reference: float, xlabel: str, caption: str,
                dpi: int) -> Any:
    """One horizontal bar panel per (dtype, mode), one group of bars per workload, one bar per contender, each
    with its p20-p80 whisker and its value written beside it. All panels share one x range, wide enough for the
    bars, the whiskers and the value labels."""
    plt = _pyplot()
    rows, dtypes, modes, workloads = _grid(result)
    n_rows, n_cols = max(len(dtypes), 1), max(len(modes), 1)
    panel_h = max(_MIN_PANEL_H, _BAR_H * len(workloads) * max(len(contenders), 2) + _PANEL_EXTRA_H)
    fig_w = max(_PANEL_W * n_cols, _MIN_FIG_W)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, n_rows * panel_h), dpi=dpi, squeeze=False,
                             sharey=True)
    renderer = fig.canvas.get_renderer()
    # Texts placed by hand above and below the panels (so out of tight_layout, which is given the room they take).
    cap = fig.suptitle("", fontsize=_CAPTION_FONT, y=0, va="bottom", ha="center")
    cap.set_in_layout(False)
    _fit_text(fig, cap, [caption], _CAPTION_FONT)
    header_lines = _header(result["meta"])
    header = fig.text(0.5, 1, "", ha="center", va="top", fontsize=_HEADER_FONT, weight="bold", gid="header",
                      color="#c00000" if result["meta"].get("noisy") else "#444444")
    header.set_in_layout(False)
    _fit_text(fig, header, header_lines, _HEADER_FONT)
    header_h = header.get_window_extent(renderer).height / fig.dpi + _CAPTION_PAD if header_lines else 0.0
    top_h = _LEGEND_H + header_h
    bottom_h = 2 * _CAPTION_PAD + cap.get_window_extent(renderer).height / fig.dpi
    fig_h = n_rows * panel_h + top_h + bottom_h
    fig.set_size_inches(fig_w, fig_h)
    cap.set_y(_CAPTION_PAD / fig_h)
    header.set_y(1 - _CAPTION_PAD / fig_h)

    height = 0.8 / max(len(contenders), 1)
    values: List[float] = [reference]
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for k, comp in enumerate(contenders):
                ys, xs, lo, hi = [], [], [], []
                for w_i, w in enumerate(workloads):
                    b = bar(rows, w, dtype, mode, comp)
                    if b is None:
                        continue
                    v, b_lo, b_hi = b
                    ys.append(w_i + (k - (len(contenders) - 1) / 2) * height)
                    xs.append(v)
                    lo.append(min(v, b_lo) if b_lo is not None else None)
                    hi.append(max(v, b_hi) if b_hi is not None else None)
                # Drawn even when empty, so that every panel has the same bars, and the legend every contender.
                ax.barh(ys, xs, height=height, color=COLORS[comp], label=LABELS[comp])
                spread = [(x, y, a, b) for x, y, a, b in zip(xs, ys, lo, hi) if a is not None]
                if spread:  # the p20-p80 whiskers, where the rows have the quantiles
                    ax.errorbar([s[0] for s in spread], [s[1] for s in spread],
                                xerr=[[x - a for x, _, a, _ in spread], [b - x for x, _, _, b in spread]],
                                fmt="none", ecolor="#333333", elinewidth=0.7, capsize=1.5, capthick=0.7)
                hi = [x if b is None else b for x, b in zip(xs, hi)]
                lo = [x if a is None else a for x, a in zip(xs, lo)]
                for y, x, b in zip(ys, xs, hi):
                    ax.annotate(label(x), xy=(b, y), xytext=(_LABEL_OFFSET_PT, 0), textcoords="offset points",
                                va="center", ha="left", fontsize=_LABEL_FONT, gid="value-label")
                values += lo + hi
            ax.axvline(reference, color="black", lw=0.8)
            ax.set_yticks(range(len(workloads)))
            ax.set_yticklabels(workloads, fontsize=8)
            # Bar order: contender k sits (k - (n-1)/2) * height below its workload's tick, and the y axis runs
            # downwards, so the first contender's bar is the top one of every group. set_ylim(high, low) and not
            # invert_yaxis(): the latter toggles, and on sharey panels each call flipped all of them back and
            # forth (an even number of panels showed the bars upside down against the legend).
            ax.set_ylim(len(workloads) - 0.5, -0.5)
            ax.set_title(f"{dtype} {mode}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", alpha=0.25)
            if i == n_rows - 1:
                ax.set_xlabel(xlabel, fontsize=7)

    # The legend is one row, read left to right in the order of `contenders`: its leftmost entry is the top bar
    # of every workload group, and so on down.
    # Proxies in each contender's colour: a contender without a bar in the first panel (the step alone
    # appears only in the step panels) would otherwise get matplotlib's default colour in the legend.
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS[c], label=LABELS[c]) for c in contenders]
    labels = [LABELS[c] for c in contenders]
    top = 1 - top_h / fig_h
    legend_font = 8
    legend = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, top), ncol=len(handles),
                        fontsize=legend_font, frameon=False, borderaxespad=0.2)
    while legend.get_window_extent(renderer).width > 0.98 * fig.bbox.width and legend_font > 5:
        legend_font -= 1
        legend.remove()
        legend = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, top), ncol=len(handles),
                            fontsize=legend_font, frameon=False, borderaxespad=0.2)

    flat = [ax for row in axes for ax in row]
    data_lo = min(values) if log else 0.0
    data_hi = max(values)
    if log:
        data_lo /= 1.15  # the shortest bar stays visible: bars start at the left edge
    for _ in range(2):  # the axes' width settles with the tick labels
        fig.tight_layout(rect=(0, bottom_h / fig_h, 1, top))
        lo_x, hi_x = _fit_xlim(fig, flat, data_lo, data_hi, log)
        for ax in flat:
            _set_x(ax, lo_x, hi_x, log)
    return fig


def _fit_xlim(fig: Any, axes: Sequence[Any], data_lo: float, data_hi: float, log: bool) -> Tuple[float, float]:
    """One x range for all ``axes``, from ``data_lo`` to where the rightmost value label ends (with a margin).

    A label is anchored at a data x and is a fixed number of pixels wide, so in the axis' coordinate t (log10 x
    on a log axis) it fits if (t_anchor - t_lo) / (t_hi - t_lo) <= 1 - label_px / axes_px: solved for t_hi."""
    t = math.log10 if log else float
    t_lo = t(data_lo)
    t_hi = t(data_hi) + 0.03 * (t(data_hi) - t_lo)
    renderer = fig.canvas.get_renderer()
    pad_px = fig.dpi * (_LABEL_OFFSET_PT + 4) / 72
    for ax in axes:
        ax_px = ax.get_window_extent(renderer).width
        for text in ax.texts:
            if text.get_gid() != "value-label":
                continue
            room = 1 - (text.get_window_extent(renderer).width + pad_px) / ax_px
            t_hi = max(t_hi, t_lo + (t(text.xy[0]) - t_lo) / max(room, 0.3))
    return data_lo, (10 ** t_hi if log else t_hi)


def _set_x(ax: Any, lo: float, hi: float, log: bool) -> None:
    from matplotlib import ticker

    if log:
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ticks = [v for v in SPEEDUP_TICKS if lo <= v <= hi]
        if len(ticks) > _MAX_TICKS:
            ticks = [v for v in SPEEDUP_TICKS_COARSE if lo <= v <= hi]
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    else:
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))


def _speedup_bar(rows, workload, dtype, mode, comp) -> Optional[Bar]:
    g = report.find_row(rows, workload, dtype, mode, "gradclip")
    c = report.find_row(rows, workload, dtype, mode, comp)
    if g is None or c is None:
        return None
    v = g.get(f"speedup_vs_{comp}")
    if not _positive(v) and _positive(c.get("median_s"), g.get("median_s")):
        v = c["median_s"] / g["median_s"]
    if not _positive(v):
        return None
    if _positive(c.get("p20_s"), c.get("p80_s"), g.get("p20_s"), g.get("p80_s")):
        return v, c["p20_s"] / g["p80_s"], c["p80_s"] / g["p20_s"]
    return v, None, None


def _bandwidth_bar(rows, workload, dtype, mode, comp) -> Optional[Bar]:
    r = report.find_row(rows, workload, dtype, mode, comp)
    if r is None or not _positive(r.get("fraction_of_ceiling")):
        return None
    v = 100 * r["fraction_of_ceiling"]
    if _positive(r.get("floor_s"), r.get("p20_s"), r.get("p80_s")):
        return v, 100 * r["floor_s"] / r["p80_s"], 100 * r["floor_s"] / r["p20_s"]
    return v, None, None


def speedup_figure(result: Dict[str, Any], dpi: int = 100) -> Any:
    """The speedup figure (a matplotlib Figure, not saved): see :func:`plot_speedup`."""
    rows = result["rows"]
    comps = [c for c in COMPETITORS if any(r["contender"] == c and r.get("median_s") for r in rows)]
    caption = (_short_caption(result) + " Bars: competitor median / gradclip median. Whiskers: competitor p20 / "
               "gradclip p80 to competitor p80 / gradclip p20, the range of the ratio of quantiles (not a confidence "
               "interval).")
    return _bar_figure(result, comps, _speedup_bar, log=True, label=lambda x: f"{x:.1f}" if x >= 10 else f"{x:.2f}",
                       reference=1.0, xlabel="gradclip speedup (competitor median / gradclip median)",
                       caption=caption, dpi=dpi)


def bandwidth_figure(result: Dict[str, Any], dpi: int = 100) -> Any:
    """The bandwidth figure (a matplotlib Figure, not saved): see :func:`plot_bandwidth`."""
    rows = result["rows"]
    contenders = ["gradclip"] + [c for c in COMPETITORS if any(r["contender"] == c and r.get("median_s") for r in rows)]
    caption = (_short_caption(result) + " Bars: time floor / median; whiskers: floor / p80 to floor / p20. "
               "Cache-resident sets (tiny-2000) can exceed 100%.")
    return _bar_figure(result, contenders, _bandwidth_bar, log=False, label=lambda x: f"{x:.0f}%", reference=100.0,
                       xlabel="% of the bandwidth ceiling (time floor / median)", caption=caption, dpi=dpi)


def plot_speedup(result: Dict[str, Any], path: Path, dpi: int = 100) -> Path:
    """gradclip's speedup over each competitor (median ratio, with the p20-p80 spread), per workload, one
    panel per (dtype, mode)."""
    plt = _pyplot()
    fig = speedup_figure(result, dpi)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_bandwidth(result: Dict[str, Any], path: Path, dpi: int = 100) -> Path:
    """Fraction of this machine's ceiling (time floor / median, with the p20-p80 spread) for gradclip and the
    competitors, per workload, one panel per (dtype, mode)."""
    plt = _pyplot()
    fig = bandwidth_figure(result, dpi)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_result(result: Dict[str, Any], out_dir: Path, stem: str, dpi: int = 100) -> List[Path]:
    """Both figures of one run, as ``STEM_speedup.png`` and ``STEM_bandwidth.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_speedup(result, out_dir / f"{stem}_speedup.png", dpi),
        plot_bandwidth(result, out_dir / f"{stem}_bandwidth.png", dpi),
    ]


def plot_file(json_path: Path, out_dir: Optional[Path] = None, dpi: int = 100) -> List[Path]:
    return plot_result(report.load(json_path), out_dir or json_path.parent, json_path.stem, dpi)
