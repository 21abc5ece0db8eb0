"""Exploding gradients in a vanilla RNN, and what clipping does about them.

A qualitative reproduction of Pascanu, Mikolov and Bengio (2013), "On the
difficulty of training recurrent neural networks": a tanh RNN learns the
adding problem with plain SGD at a large learning rate, three times from the
same initialisation and the same batches:

* no clipping: the gradient norm spikes, the loss blows up (NaN) early on;
* value clipping (each gradient element clamped to [-v, v]);
* norm clipping (all gradients rescaled so that their global norm is <= c).

The recurrent weights start with spectral norm 2 (the exploding regime the
paper analyses: ||W_hh|| > 1 lets gradients grow exponentially with the
sequence length). Clipping runs through ``gradclip.attach``, whose per-step
records also give the pre-clip gradient norm that is plotted.

Adding problem: each input step is (value, marker) with value ~ U(0, 1); two
steps are marked, one in each half of the sequence; the target is the sum of
the two marked values. Predicting the mean (1.0) gives an MSE of 1/6.

    python examples/exploding_rnn.py            # ~15 s on 2 cores; writes examples/exploding_rnn.png
    python examples/exploding_rnn.py --steps 500 --out /tmp/short.png
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import gradclip

# One hyperparameter set for every run; only the clipping differs.
SEQ_LEN = 10
HIDDEN = 32
BATCH = 50
LR = 0.2
RECURRENT_SPECTRAL_NORM = 2.0
CLIP_VALUE = 0.05
CLIP_NORM = 0.5
DIVERGED_LOSS = 1e3  # a loss this large (or NaN) ends a run: the weights are lost
BASELINE_LOSS = 1.0 / 6.0  # MSE of always answering 1.0 (variance of a sum of two U(0, 1))

METHODS = {
    "no clipping": {},
    f"value clipping ({CLIP_VALUE})": {"clipvalue": CLIP_VALUE},
    f"norm clipping ({CLIP_NORM})": {"global_clipnorm": CLIP_NORM},
}


def adding_problem(gen: torch.Generator, batch: int, seq_len: int):
    values = torch.rand(batch, seq_len, generator=gen)
    markers = torch.zeros(batch, seq_len)
    half = seq_len // 2
    rows = torch.arange(batch)
    markers[rows, torch.randint(0, half, (batch,), generator=gen)] = 1.0
    markers[rows, torch.randint(half, seq_len, (batch,), generator=gen)] = 1.0
    inputs = torch.stack([values, markers], dim=2)
    targets = (values * markers).sum(dim=1, keepdim=True)
    return inputs, targets


class VanillaRNN(torch.nn.Module):
    def __init__(self, hidden: int, spectral_norm: float):
        super().__init__()
        self.rnn = torch.nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.readout = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            w = torch.randn(hidden, hidden) / math.sqrt(hidden)
            self.rnn.weight_hh_l0.copy_(w * (spectral_norm / torch.linalg.matrix_norm(w, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.readout(states[:, -1])


def train(clip_options: Dict[str, float], steps: int, seed: int = 0) -> Dict[str, List[float]]:
    """One run; returns per-step loss and pre-clip gradient norm (cut short
    when the loss diverges). Steps are counted from 1, as on the figure's x
    axis: ``loss[s - 1]`` is step s's, and ``diverged_at`` is the step whose
    loss diverged (None if none did)."""
    torch.manual_seed(seed)
    model = VanillaRNN(HIDDEN, RECURRENT_SPECTRAL_NORM)
    data = torch.Generator().manual_seed(seed + 1)  # the same batches for every method
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    handle = gradclip.attach(optimizer, **clip_options, named_parameters=model.named_parameters())
    losses: List[float] = []
    grad_norms: List[float] = []
    diverged_at: Optional[int] = None
    for step in range(1, steps + 1):
        inputs, targets = adding_problem(data, BATCH, SEQ_LEN)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        grad_norms.append(handle.last.total_norm)
        if not losses[-1] < DIVERGED_LOSS:  # also NaN
            diverged_at = step
            break
    handle.remove()
    return {"loss": losses, "grad_norm": grad_norms, "diverged_at": diverged_at}


def smooth(values: List[float]) -> List[float]:
    """Mean over the last tenth of the steps so far: a window that suits a log step axis."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    return [(prefix[i + 1] - prefix[i - i // 10]) / (i // 10 + 1) for i in range(len(values))]


def summarise(name: str, run: Dict) -> str:
    losses, norms = run["loss"], run["grad_norm"]
    tail = losses[-max(len(losses) // 10, 1):]
    finite_norms = [n for n in norms if math.isfinite(n)]
    end = f"diverged at step {run['diverged_at']}" if run["diverged_at"] is not None else (
        f"final loss {sum(tail) / len(tail):.4f}")
    return f"{name:24s} {end:28s} largest gradient norm {max(finite_norms, default=math.nan):.3g}"


def divergence_marker(series: List[float], step: int) -> Tuple[int, float]:
    """Where the x marks a run's divergence on a curve: at the step the console
    names, on that step's value (or, where it is NaN or infinite, at the height
    of the last finite value before it)."""
    finite = [v for v in series[:step] if math.isfinite(v)]
    return step, finite[-1] if finite else math.nan


def figure(runs: Dict[str, Dict], steps: int):
    """The two panels (a matplotlib Figure, not saved): loss, and gradient norm before clipping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    diverged = False
    for (name, run), color in zip(runs.items(), ("tab:red", "tab:orange", "tab:blue")):
        x = range(1, len(run["loss"]) + 1)  # step s at x = s; log x axis: the first steps are where a run explodes
        ax_loss.plot(x, run["loss"], color=color, lw=0.5, alpha=0.35)
        ax_loss.plot(x, smooth(run["loss"]), color=color, lw=1.8, label=name)
        ax_norm.plot(x, run["grad_norm"], color=color, lw=0.6, alpha=0.8, label=name)
        if run["diverged_at"] is not None:
            diverged = True
            for ax, series in ((ax_loss, run["loss"]), (ax_norm, run["grad_norm"])):
                mx, my = divergence_marker(series, run["diverged_at"])
                ax.plot([mx], [my], "x", color=color, ms=10, mew=2, gid=f"diverged:{name}")
    ax_loss.axhline(BASELINE_LOSS, color="gray", ls="--", lw=1, label="predicting the mean (MSE 1/6)")
    ax_loss.set(xscale="log", yscale="log", xlabel="SGD step", ylabel="training loss (MSE)",
                title=f"adding problem, T={SEQ_LEN}, lr={LR}", xlim=(1, steps))
    ax_norm.set(xscale="log", yscale="log", xlabel="SGD step", ylabel="gradient norm before clipping",
                title="global gradient norm", xlim=(1, steps))
    # What the line widths and the x mean, as legend entries of their own (in gray: they hold for every run).
    x_mark = Line2D([], [], color="black", marker="x", ls="none", ms=8, mew=2,
                    label=f"loss diverged (> {DIVERGED_LOSS:g} or NaN): run stopped")
    handles, _ = ax_loss.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", lw=0.5, alpha=0.6, label="thin: loss of each step"),
                Line2D([], [], color="gray", lw=1.8, label="thick: mean over the last 10% of steps so far")]
    ax_loss.legend(handles=handles + ([x_mark] if diverged else []), fontsize=8)
    handles, _ = ax_norm.get_legend_handles_labels()
    ax_norm.legend(handles=handles + ([x_mark] if diverged else []), fontsize=8, loc="upper right")
    return fig


def plot(runs: Dict[str, Dict], steps: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs, steps)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a 32-unit RNN gains nothing from more
    runs = {}
    for name, options in METHODS.items():
        start = time.perf_counter()
        runs[name] = train(options, args.steps, args.seed)
        print(summarise(name, runs[name]), f"({time.perf_counter() - start:.1f} s)")
    if not args.no_plot:
        plot(runs, args.steps, args.out)
        print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
