"""Many small gradients: torch's clip_grad_norm_ against gradclip's on the same list and
against a GradBuffer (every gradient a view of one flat tensor), in one process, inputs
restored (untimed) before every call, clipping every call.

    python bench/grad_buffer.py [--tensors 5000] [--size 512] [--rounds 40]
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch

import gradclip
from gradclip.bench import env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=5000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    quiet = env.Quietness()
    torch.manual_seed(0)
    pristine = torch.randn(args.tensors, args.size) * 1e-2
    max_norm = 0.5 * float(pristine.norm())  # every call clips

    def plain_params():
        ps = [torch.nn.Parameter(torch.zeros(args.size)) for _ in range(args.tensors)]
        for p, row in zip(ps, pristine):
            p.grad = row.clone()
        return ps

    torch_params, gradclip_params, buffered = plain_params(), plain_params(), plain_params()
    buf = gradclip.GradBuffer(buffered)
    (flat,) = buf.flat
    pairs = {id(ps): [(p.grad.numpy(), row.numpy()) for p, row in zip(ps, pristine)]
             for ps in (torch_params, gradclip_params)}

    def restore(ps=None):
        if ps is None:
            np.copyto(flat.numpy(), pristine.numpy().reshape(-1))
        else:
            for dst, src in pairs[id(ps)]:
                np.copyto(dst, src)

    cases = {
        "torch clip_grad_norm_ (foreach)": (lambda: torch.nn.utils.clip_grad_norm_(torch_params, max_norm),
                                           lambda: restore(torch_params)),
        "gradclip.clip_grad_norm_ (the list)": (lambda: gradclip.clip_grad_norm_(gradclip_params, max_norm),
                                                lambda: restore(gradclip_params)),
        "GradBuffer.clip_grad_norm_": (lambda: buf.clip_grad_norm_(max_norm), restore),
    }
    totals = {k: float(fn()) for k, (fn, _) in cases.items()}  # warm-up and a check: one norm for all
    ref = totals["torch clip_grad_norm_ (foreach)"]
    assert all(abs(t - ref) <= 1e-5 * ref for t in totals.values()), totals
    times = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, (fn, reset) in cases.items():
            reset()
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    run = quiet.finish(os.cpu_count())
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["torch clip_grad_norm_ (foreach)"]
    print(f"{env.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"gradclip {gradclip.__version__} ({gradclip.build_info()['isa']}, {gradclip.get_num_threads()} threads); "
          f"{args.tensors} x {args.size} fp32, clipped every call; median of {args.rounds} interleaved rounds; load "
          f"average {run['loadavg_start']} -> {run['loadavg_end']}, other processes {run['other_busy_cores']} cores, "
          f"noisy={run['noisy']}")
    for k, m in medians.items():
        q = np.percentile(times[k], [20, 80]) * 1e3
        print(f"  {k:38s} {m * 1e3:8.3f} ms (p20-p80 {q[0]:.3f}-{q[1]:.3f})  {base / m:6.1f}x torch")


if __name__ == "__main__":
    main()
