"""gradclip.bench.plot on a small synthetic run: the figures are written, their panels share one x range, the
value labels stay inside their panels, the whiskers show the p20-p80 spread, the legend lists the contenders in
the order of the bars, and the caption carries the run's conditions (NOISY, --quick) and fits the figure."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402

from gradclip.bench import plot  # noqa: E402

WORKLOADS = ("big-set", "tiny-set")
CONTENDERS = ("gradclip", "torch_foreach", "torch_loop")
# Competitor median / gradclip median per (workload, contender); a wide range so that the longest label needs
# room: 40x is far right on the log axis, 0.8x below 1x.
RATIO = {("big-set", "torch_foreach"): 1.6, ("big-set", "torch_loop"): 0.8,
         ("tiny-set", "torch_foreach"): 40.0, ("tiny-set", "torch_loop"): 12.5}


def _meta(**changes):
    meta = {
        "device": "cpu", "device_name": "Test CPU", "cpu_model": "Test CPU", "gpu_name": "", "cpu_count": 2,
        "threads": 2, "gradclip_threads": 2, "gradclip_isa": "avx2", "gradclip_version": "0.1.0",
        "torch_version": "2.13.0+cpu", "timestamp": "2026-12-07T08:46:41+00:00", "commit": "abcdef123456",
        "dirty": False, "quick": False, "loadavg_start": 0.5, "loadavg_end": 0.6, "other_busy_cores": 0.01,
        "noisy": False,
    }
    meta.update(changes)
    return meta


def make_result(dtypes=("fp32", "bf16"), modes=("norm-clip", "norm-noclip"), **meta_changes):
    rows = []
    for w in WORKLOADS:
        for dtype in dtypes:
            for mode in modes:
                g_median = 0.010 if w == "big-set" else 0.001
                floor = 0.9 * g_median
                by = {}
                for c in CONTENDERS:
                    median = g_median * (RATIO[(w, c)] if c != "gradclip" else 1.0)
                    by[c] = {
                        "workload": w, "dtype": dtype, "mode": mode, "contender": c, "status": "ok",
                        "rounds": 9, "median_s": median, "p20_s": 0.95 * median, "p80_s": 1.1 * median,
                        "floor_s": floor, "fraction_of_ceiling": floor / median,
                    }
                for c in CONTENDERS[1:]:
                    by["gradclip"][f"speedup_vs_{c}"] = by[c]["median_s"] / g_median
                rows += by.values()
    return {
        "meta": _meta(**meta_changes),
        "ceilings": {"read_gbs": 25.0, "read_write_gbs": 40.0, "copy_gbs": 26.0, "buffer_bytes": 256 << 20},
        "rows": rows,
    }


FIGURES = (plot.speedup_figure, plot.bandwidth_figure)


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def _panels(fig):
    return [ax for ax in fig.axes if any(isinstance(c, BarContainer) for c in ax.containers)]


def _texts(fig):
    """Every text drawn on the figure outside the panels: the caption (suptitle), the header, the legend."""
    return [fig.get_suptitle()] + [t.get_text() for t in fig.texts]


def test_both_pngs_are_written(tmp_path):
    paths = plot.plot_result(make_result(), tmp_path / "out", "run")
    assert [p.name for p in paths] == ["run_speedup.png", "run_bandwidth.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("figure", FIGURES)
@pytest.mark.parametrize("dtypes,modes", [(("fp32", "bf16"), ("norm-clip", "norm-noclip")),
                                          (("fp32",), ("norm-clip", "norm-noclip"))])
def test_all_panels_share_one_x_range(figure, dtypes, modes, close_figures):
    fig = figure(make_result(dtypes, modes))
    panels = _panels(fig)
    assert len(panels) == len(dtypes) * len(modes)
    limits = {tuple(round(v, 9) for v in ax.get_xlim()) for ax in panels}
    assert len(limits) == 1, limits


@pytest.mark.parametrize("figure", FIGURES)
def test_value_labels_lie_inside_their_panel(figure, close_figures):
    fig = figure(make_result())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    n = 0
    for ax in _panels(fig):
        lo, hi = ax.get_xlim()
        box = ax.get_window_extent(renderer)
        for text in ax.texts:
            n += 1
            assert lo <= text.xy[0] <= hi
            extent = text.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (text.get_text(), extent, box)
    bars = len(make_result()["rows"]) if figure is plot.bandwidth_figure else len(make_result()["rows"]) * 2 // 3
    assert n == bars  # one label per bar


def test_speedup_ticks_are_readable_and_inside_the_range(close_figures):
    fig = plot.speedup_figure(make_result())
    for ax in _panels(fig):
        lo, hi = ax.get_xlim()
        ticks = list(ax.get_xticks())
        assert all(t in plot.SPEEDUP_TICKS and lo <= t <= hi for t in ticks)
        assert {1, 2, 5, 10, 20} <= set(ticks) and len(ticks) <= 10  # 0.8x to 40x: more than powers of ten
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == [f"{t:g}x" for t in ticks]
    # A narrower range gets the finer ticks.
    result = make_result(("fp32",), ("norm-clip",))
    result["rows"] = [r for r in result["rows"] if r["workload"] == "big-set"]
    ax = _panels(plot.speedup_figure(result))[0]
    assert {0.75, 1, 1.5} <= set(ax.get_xticks())


def _whiskers(ax):
    """{(rounded y): (x low, x high)} of the panel's error bars."""
    out = {}
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            for (x0, y0), (x1, _) in c.lines[2][0].get_segments():
                out[round(y0, 6)] = (x0, x1)
    return out


def _bars(ax):
    """[(contender label, workload index, bar y centre, bar end x)] of the panel."""
    out = []
    for c in ax.containers:
        if isinstance(c, BarContainer):
            for patch in c.patches:
                y = patch.get_y() + patch.get_height() / 2
                out.append((c.get_label(), round(y), y, patch.get_x() + patch.get_width()))
    return out


def test_whiskers_show_the_p20_p80_spread(close_figures):
    result = make_result(("fp32",), ("norm-clip",))
    rows = {(r["workload"], r["contender"]): r for r in result["rows"]}
    labels = {plot.LABELS[c]: c for c in CONTENDERS}
    for figure in FIGURES:
        ax = _panels(figure(result))[0]
        whiskers = _whiskers(ax)
        bars = _bars(ax)
        assert len(whiskers) == len(bars)
        for label, w_i, y, end in bars:
            r, g = rows[(WORKLOADS[w_i], labels[label])], rows[(WORKLOADS[w_i], "gradclip")]
            if figure is plot.speedup_figure:  # the range of the ratio of quantiles
                expected = (r["p20_s"] / g["p80_s"], r["p80_s"] / g["p20_s"])
                assert end == pytest.approx(r["median_s"] / g["median_s"])
            else:  # fraction of ceiling: floor / p80 .. floor / p20, in %
                expected = (100 * r["floor_s"] / r["p80_s"], 100 * r["floor_s"] / r["p20_s"])
                assert end == pytest.approx(100 * r["floor_s"] / r["median_s"])
            assert whiskers[round(y, 6)] == pytest.approx(expected)
    assert "ratio of quantiles" in plot.speedup_figure(result).get_suptitle()


@pytest.mark.parametrize("figure", FIGURES)
@pytest.mark.parametrize("dtypes,modes", [(("fp32", "bf16"), ("norm-clip", "norm-noclip")),
                                          (("fp32",), ("norm-clip", "norm-noclip")),
                                          (("fp32",), ("norm-clip",))])
def test_legend_lists_the_contenders_in_the_order_of_the_bars(figure, dtypes, modes, close_figures):
    fig = figure(make_result(dtypes, modes))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    # The legend as seen: one row, read left to right.
    entries = sorted(legend.get_texts(), key=lambda t: t.get_window_extent(renderer).x0)
    rows_y = {round(t.get_window_extent(renderer).y0) for t in entries}
    assert len(rows_y) == 1
    seen = [t.get_text() for t in entries]
    labelled = 0
    for ax in _panels(fig):
        for w_i in range(len(WORKLOADS)):
            group = [(label, y) for label, w, y, _ in _bars(ax) if w == w_i]
            # The bars as seen, top to bottom (display y grows upwards).
            top_down = sorted(group, key=lambda b: -ax.transData.transform((1.0, b[1]))[1])
            assert [label for label, _ in top_down] == seen
        # The workloads too run top to bottom in the order of the results (where the panel shows their names).
        names = [t.get_text() for t in ax.get_yticklabels()]
        if names:
            labelled += 1
            ticks = sorted(zip(ax.get_yticks(), names), key=lambda t: -ax.transData.transform((1.0, t[0]))[1])
            assert [name for _, name in ticks] == list(WORKLOADS)
    assert labelled == len(dtypes)  # the first panel of each row


def _header_texts(fig):
    """Figure texts above every panel: the title area."""
    top = max(ax.get_position().y1 for ax in fig.axes)
    return [t.get_text() for t in fig.texts if t.get_position()[1] > top and t.get_text()]


@pytest.mark.parametrize("figure", FIGURES)
def test_caption_carries_the_conditions(figure, close_figures):
    quiet = figure(make_result())
    caption = quiet.get_suptitle()
    for part in ("Test CPU, 2 cores", "full run", "load average 0.50 at the start, 0.60 at the end", "quiet",
                 "commit abcdef123456", "torch 2.13.0+cpu", "Median of 9 interleaved repetitions"):
        assert part in caption.replace("\n", " "), part
    assert not any("NOISY" in t for t in _texts(quiet))
    assert not any("--quick" in t for t in _texts(quiet))

    noisy = figure(make_result(noisy=True, other_busy_cores=1.2))
    assert "NOISY" in noisy.get_suptitle()
    assert any("NOISY RUN" in t for t in _header_texts(noisy))

    quick = figure(make_result(quick=True))
    assert "--quick run" in quick.get_suptitle()
    assert any("--quick" in t for t in _header_texts(quick))


@pytest.mark.parametrize("figure", FIGURES)
@pytest.mark.parametrize("modes", [("norm-clip",), ("norm-clip", "norm-noclip")])
def test_caption_and_header_fit_the_figure(figure, modes, close_figures):
    long_name = "Some Vendor(R) Very Long Processor Model Name(TM) 9999X with a Suffix @ 3.20GHz"
    fig = figure(make_result(("fp32",), modes, cpu_model=long_name, noisy=True, quick=True))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] + [t for t in fig.texts if t.get_text() and t is not fig._suptitle] + list(fig.legends)
    assert len(texts) >= 3
    for text in texts:
        e = text.get_window_extent(renderer)
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, e
    # Nothing drawn on top of the panels: the caption is below them and the header and the legend above.
    panels = [ax.get_tightbbox(renderer) for ax in _panels(fig)]
    assert fig._suptitle.get_window_extent(renderer).y1 <= min(p.y0 for p in panels)
    for text in texts[1:]:
        assert text.get_window_extent(renderer).y0 >= max(p.y1 for p in panels)
    assert long_name in fig.get_suptitle().replace("\n", " ")


def test_an_old_results_file_still_plots(tmp_path):
    result = make_result()
    for key in ("loadavg_end", "other_busy_cores", "noisy", "quick"):
        del result["meta"][key]
    old = copy.deepcopy(result)
    paths = plot.plot_result(result, tmp_path, "old")
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert result == old  # plotting reads the result, never changes it
    import matplotlib.pyplot as plt

    fig = plot.speedup_figure(result)
    assert "full run" in fig.get_suptitle() and "NOISY" not in fig.get_suptitle()
    plt.close(fig)


def test_a_row_without_quantiles_plots_without_whisker(close_figures):
    result = make_result(("fp32",), ("norm-clip",))
    for r in result["rows"]:
        if r["contender"] == "torch_loop":
            r["p20_s"] = r["p80_s"] = None
    ax = _panels(plot.speedup_figure(result))[0]
    assert len(_bars(ax)) == 4 and len(_whiskers(ax)) == 2
    assert all(math.isfinite(v) for v in ax.get_xlim())


def test_legend_colours_match_the_bars_of_a_contender_absent_from_the_first_panel(close_figures):
    # The step mode's "the step alone" contender has bars only in the step panels.
    result = make_result(("fp32",), ("norm-clip", "step"))
    for r in [r for r in result["rows"] if r["mode"] == "step" and r["contender"] == "gradclip"]:
        r["speedup_vs_no_clip"] = 0.75
        result["rows"].append({**r, "contender": "no_clip", "median_s": 0.75 * r["median_s"],
                               "p20_s": 0.7 * r["median_s"], "p80_s": 0.8 * r["median_s"]})
    fig = plot.speedup_figure(result)
    (legend,) = fig.legends
    colours = {t.get_text(): tuple(h.get_facecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
    from matplotlib.colors import to_rgba

    assert colours[plot.LABELS["no_clip"]] == to_rgba(plot.COLORS["no_clip"])
    for contender in ("torch_foreach", "torch_loop", "no_clip"):
        assert colours[plot.LABELS[contender]] == to_rgba(plot.COLORS[contender]), contender
