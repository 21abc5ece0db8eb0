"""One clip_grad_norm_ call on ~64M float32 gradient elements, for Nsight Compute.

The measured call runs between cudaProfilerStart and cudaProfilerStop, after
untimed warm-up calls, so ``ncu --profile-from-start off`` sees only its kernels:

    ncu --profile-from-start off --metrics dram__bytes_write.sum,dram__bytes_read.sum \\
        python3 bench/gpu_unclipped.py                  # gradclip, nothing to clip
    ... python3 bench/gpu_unclipped.py --impl torch     # torch.nn.utils.clip_grad_norm_(foreach=True)
    ... python3 bench/gpu_unclipped.py --clip           # max_norm = half the norm: every element rewritten

Unclipped, gradclip should read the gradients once (256 MiB for the default
64Mi elements) and write next to nothing; torch reads them, then reads and
rewrites them. After the profiled call the script also times --time calls with
CUDA events (meaningless under ncu; useful when run on its own).
"""

from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=("gradclip", "torch"), default="gradclip")
    ap.add_argument("--clip", action="store_true", help="max_norm = 0.5 x the norm (default: 2 x, nothing to clip)")
    ap.add_argument("--elements", type=int, default=64 << 20, help="float32 elements in all (default 64Mi)")
    ap.add_argument("--tensors", type=int, default=64, help="split into this many equal tensors (default 64)")
    ap.add_argument("--time", type=int, default=20, metavar="N", help="timed calls after the profiled one (0: none)")
    args = ap.parse_args(argv)

    import torch

    import gradclip

    if not torch.cuda.is_available():
        print("gpu_unclipped.py: torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    per = args.elements // args.tensors
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    params = []
    for _ in range(args.tensors):
        p = torch.nn.Parameter(torch.empty(per, device=dev))  # never read: only its .grad matters
        p.grad = torch.randn(per, generator=gen, device=dev).mul_(0.01)
        params.append(p)
    norm = float(gradclip.get_total_norm([p.grad for p in params]))
    max_norm = norm * (0.5 if args.clip else 2.0)

    if args.impl == "gradclip":
        def call(limit):
            return gradclip.clip_grad_norm_(params, limit)
    else:
        def call(limit):
            return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)

    # Warm-up with nothing to clip (module loading, allocator, the same kernels).
    for _ in range(3):
        call(math.inf if args.impl == "gradclip" else 1e30)
    torch.cuda.synchronize()

    torch.cuda.profiler.start()
    total = call(max_norm)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()

    nbytes = per * args.tensors * 4
    print(f"{args.impl} {'clip' if args.clip else 'noclip'}: {args.tensors} tensors, {per * args.tensors} float32 "
          f"elements ({nbytes / 2**20:.0f} MiB); total norm {float(total):.6g} (expected {norm:.6g}), "
          f"max_norm {max_norm:.6g}")

    if args.time > 0:
        limit = max_norm if not args.clip else norm * 1e-3  # keeps clipping on every call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        call(limit)
        start.record()
        for _ in range(args.time):
            call(limit)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / args.time
        moved = nbytes * (3 if args.clip or args.impl == "torch" else 1)  # read; or read + read/write
        print(f"timed: {ms:.3f} ms per call over {args.time} calls, {moved / ms / 1e6:.0f} GB/s of the bytes "
              f"that must move ({'read + read/write' if moved > nbytes else 'one read'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
