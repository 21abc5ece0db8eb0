"""examples/exploding_rnn.py, shortened: without clipping the gradient norm
explodes and the loss diverges; with norm clipping the RNN learns the adding
problem (Pascanu et al. 2013, qualitatively)."""

from __future__ import annotations

import importlib.util
import math
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
def runs(demo):
    threads = torch.get_num_threads()
    try:
        return demo.main(["--steps", "1000", "--no-plot"])
    finally:
        torch.set_num_threads(threads)  # main() pins torch to one thread


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
