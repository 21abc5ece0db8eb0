"""examples/exploding_rnn.py, shortened: without clipping the gradient norm
explodes and the loss diverges; with norm clipping the RNN learns the adding
problem (Pascanu et al. 2013, qualitatively)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "exploding_rnn.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("exploding_rnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def console_and_runs(demo):
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runs = demo.main(["--steps", "1000", "--no-plot"])
    finally:
        torch.set_num_threads(threads)  # main() pins torch to one thread
    return out.getvalue(), runs


@pytest.fixture(scope="module")
def runs(console_and_runs):
    return console_and_runs[1]


def tail_loss(run, n=100):
    return sum(run["loss"][-n:]) / n


def test_without_clipping_the_gradient_explodes_and_the_loss_diverges(demo, runs):
    run = runs["no clipping"]
    assert run["diverged_at"] is not None and run["diverged_at"] < 50
    first_norm = run["grad_norm"][0]
    largest = max(n for n in run["grad_norm"] if math.isfinite(n))
    assert largest > 50 * first_norm


def test_with_norm_clipping_it_learns(demo, runs):
    clipped = runs[f"norm clipping ({demo.CLIP_NORM})"]
    assert clipped["diverged_at"] is None and len(clipped["loss"]) == 1000
    assert tail_loss(clipped) < 0.5 * demo.BASELINE_LOSS  # well below predicting the mean
    # The same initialisation and batches: both runs start from the same gradient.
    assert clipped["grad_norm"][0] == runs["no clipping"]["grad_norm"][0]


def test_value_clipping_run_completes(demo, runs):
    run = runs[f"value clipping ({demo.CLIP_VALUE})"]
    assert run["diverged_at"] is None and all(math.isfinite(v) for v in run["loss"])


def test_plot_is_written(demo, runs, tmp_path):
    pytest.importorskip("matplotlib")  # in the [test] extra; optional for a bare install
    out = tmp_path / "rnn.png"
    demo.plot(runs, 1000, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _markers(fig, name):
    """[(axes, x, y)] of the divergence marks drawn for run ``name``."""
    return [(ax, line.get_xdata()[0], line.get_ydata()[0]) for ax in fig.axes for line in ax.get_lines()
            if line.get_gid() == f"diverged:{name}"]


def _passes_through(ax, x, y):
    """Whether a curve of ``ax`` (not a marker) has the point (x, y)."""
    return any(lx == x and ly == y for line in ax.get_lines() if line.get_gid() is None and len(line.get_xdata()) > 1
               for lx, ly in zip(line.get_xdata(), line.get_ydata()))


def test_the_divergence_mark_is_at_the_step_the_console_prints(demo, console_and_runs):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    console, runs = console_and_runs
    (printed,) = re.findall(r"^no clipping\s+diverged at step (\d+)", console, flags=re.M)
    step = int(printed)
    run = runs["no clipping"]
    # Steps count from 1 (the figure's x axis): the printed step is the first whose loss passed the limit.
    assert run["diverged_at"] == step == len(run["loss"])
    assert not run["loss"][step - 1] < demo.DIVERGED_LOSS
    assert all(v < demo.DIVERGED_LOSS for v in run["loss"][:step - 1])
    fig = demo.figure(runs, 1000)
    try:
        marks = _markers(fig, "no clipping")
        assert len(marks) == 2  # the loss panel and the gradient norm panel
        for ax, x, y in marks:
            assert x == step
            assert _passes_through(ax, x, y)  # on that step's point of the run's curve
        (loss_ax, _, loss_y), (norm_ax, _, norm_y) = marks
        assert loss_y == run["loss"][step - 1] and norm_y == run["grad_norm"][step - 1]
        assert not _markers(fig, f"norm clipping ({demo.CLIP_NORM})")  # no mark where nothing diverged
        # Both panels say what the marks and the lines are.
        for ax in (loss_ax, norm_ax):
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert "no clipping" in labels and any("diverged" in t for t in labels)
        loss_labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
        assert any(t.startswith("thin:") for t in loss_labels) and any(t.startswith("thick:") for t in loss_labels)
    finally:
        plt.close(fig)


def test_a_nan_loss_is_marked_at_its_step_at_the_last_finite_height(demo):
    assert demo.divergence_marker([2.0, 30.0, math.nan], 3) == (3, 30.0)
    assert demo.divergence_marker([2.0, 3000.0], 2) == (2, 3000.0)
