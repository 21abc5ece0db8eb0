"""bfloat16 rescale and clip on the transformer-64m set: gradclip's avx512 kernels
(software rounding) against its avx512bf16 kernels (VCVTNEPS2BF16) and torch, in one
process, beside this machine's read and read+write ceilings.

    python bench/bf16_rescale.py        # needs a CPU with avx512_bf16
"""

import os
import statistics
import time

import torch

import gradclip
from gradclip import _core
from gradclip.bench import ceilings, env, workloads

ROUNDS, WARMUP = 25, 3


def main() -> None:
    if "avx512bf16" not in _core.supported_isas():
        raise SystemExit("this CPU has no avx512_bf16: nothing to compare")
    torch.manual_seed(0)
    grads = [torch.randn(shape, dtype=torch.bfloat16) for shape in workloads.get("transformer-64m").shapes]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(g.shape, dtype=g.dtype))
        p.grad = g
        params.append(p)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    quiet = env.Quietness()
    ceil = ceilings.measure(torch, "cpu", 256 << 20, 9)
    read, read_write = ceil["read_gbs"] * 1e9, ceil["read_write_gbs"] * 1e9
    one = torch.tensor(1.0)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def on(isa, fn):
        def run():
            _core.set_active_isa(isa)
            return timed(fn)
        return run

    def rescale():  # one read/write pass: the coefficient 0.9999 from a given norm
        gradclip.clip_grads_with_norm_(params, 0.9999, one)

    def clip():  # the norm pass, then the rescale
        gradclip.clip_grad_norm_(params, 1.0)

    cases = {
        "rescale, avx512 (software rounding)": on("avx512", rescale),
        "rescale, avx512bf16 (VCVTNEPS2BF16)": on("avx512bf16", rescale),
        "rescale, torch": lambda: timed(lambda: torch.nn.utils.clip_grads_with_norm_(params, 0.9999, one)),
        "clip, avx512": on("avx512", clip),
        "clip, avx512bf16": on("avx512bf16", clip),
        "clip, torch": lambda: timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
    }
    times = {k: [] for k in cases}
    for r in range(ROUNDS):
        if r % 5 == 0:  # fresh magnitudes: repeated scaling never drifts toward subnormals
            for g in grads:
                g.normal_()
        for k, fn in cases.items():
            times[k].append(fn())
    # read+write GB/s counts the bytes read and the bytes written.
    floors = {"rescale": 2 * nbytes / read_write, "clip": nbytes / read + 2 * nbytes / read_write}
    run = quiet.finish(os.cpu_count())
    print(f"{env.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {gradclip.get_num_threads()} "
          f"threads; transformer-64m bf16, {len(grads)} tensors, {nbytes / 2**20:.0f} MiB; ceilings read "
          f"{ceil['read_gbs']:.1f} GB/s, read+write {ceil['read_write_gbs']:.1f} GB/s; load average "
          f"{run['loadavg_start']} -> {run['loadavg_end']}, other processes {run['other_busy_cores']} cores, "
          f"noisy={run['noisy']}; medians of {ROUNDS - WARMUP} interleaved rounds")
    for k, ts in times.items():
        median = statistics.median(ts[WARMUP:])
        floor = floors[k.split(",")[0]]
        print(f"{k:38s} {median * 1e3:7.2f} ms  {100 * floor / median:4.0f}% of its floor")


if __name__ == "__main__":
    main()
