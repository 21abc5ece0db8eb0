"""A training step's optimizer part with clipping: fused AdamW plus the clip,
three ways, interleaved on the same gradients.

    python bench/fold_step.py [--layers 16] [--width 2048] [--repeat 15] [--out FILE.md]

* torch: ``torch.nn.utils.clip_grad_norm_`` then ``opt.step()``;
* gradclip, fold=False: ``attach`` rewrites the gradients, then the step;
* gradclip, folded (the default for fused optimizers): one read pass for the
  norm, the coefficient handed to the fused step as its grad_scale.

Every step clips (max_norm is a tenth of the norm). The gradients are restored
(untimed) before each call; the optimizer state moves on, the same for all.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

from gradclip.bench.env import cpu_model

import gradclip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])

    contenders = {}
    grads = None
    for name in ("torch", "gradclip, fold=False", "gradclip, folded"):
        m = model()
        params = list(m.parameters())
        if grads is None:
            grads = [torch.randn_like(p) * 1e-3 for p in params]
            norm = float(torch.nn.utils.get_total_norm(grads))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        if name == "torch":
            def step(opt=opt, params=params):
                torch.nn.utils.clip_grad_norm_(params, norm * 0.1)
                opt.step()
        else:
            handle = gradclip.attach(opt, global_clipnorm=norm * 0.1, fold=name.endswith("folded"))
            assert handle.fold == name.endswith("folded")
            step = opt.step
        contenders[name] = (params, step)
    times = {name: [] for name in contenders}
    for r in range(args.repeat + 2):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            params, step = contenders[name]
            for p, g in zip(params, grads):
                p.grad.copy_(g)
            t0 = time.perf_counter()
            step()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in contenders["torch"][0])
    lines = [
        "# Fused AdamW step with clipping: torch, gradclip, gradclip folded into the step",
        "",
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, gradclip "
        f"{gradclip.get_num_threads()} threads ({gradclip.build_info()['isa']}); torch {torch.__version__}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at the end. {args.layers} x Linear({args.width}, {args.width}), fp32, "
        f"{n / 1e6:.1f}M parameters; every step clips. Median (p20-p80) of {args.repeat} interleaved steps, "
        "gradients restored before each.",
        "",
        "| clip + fused AdamW step | ms per step | p20-p80 | vs torch |",
        "|---|---:|---:|---:|",
    ]
    base = statistics.median(times["torch"])
    for name, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * 1e3:.2f} | {ts[int(0.2 * (len(ts) - 1))] * 1e3:.2f}-"
                     f"{ts[int(0.8 * (len(ts) - 1))] * 1e3:.2f} | {base / med:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
