"""FSDP2 on CPU: gradclip's clip_grad_norm_ against torch's, on 2 ranks (gloo).

    python bench/distributed_clip.py [--layers 8] [--width 1024] [--repeat 30] [--out FILE.md]

Each rank holds its Shard(0) half of every parameter's gradient (fully_shard on
every layer and the root). Both clips are timed on the same gradients,
interleaved, after an untimed restore of the gradients before every call, in
two modes: nothing to clip (max_norm far above the norm) and clipping
(max_norm half the norm). Reported: median and p20/p80 per call on rank 0, the
collectives each makes per call (counted by wrapping torch.distributed), and
whether the two totals agree. One thread per rank: the two ranks share the
machine's cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from gradclip.bench.env import cpu_model


def _collectives(fn) -> int:
    """The collectives one call makes, as torch's profiler sees them (c10d ops,
    whichever API issued them: torch.distributed or DTensor's functional collectives)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    ops = ("allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "broadcast")
    return sum(1 for n in names if n.startswith(("c10d::", "_c10d_functional::")) and any(o in n for o in ops))


def _rank(rank: int, world: int, rendezvous: str, args, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ["GRADCLIP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import gradclip
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    x = torch.randn(16, args.width, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    params = list(model.parameters())
    saved = [p.grad.to_local().clone() for p in params]
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor())
    n_params = sum(p.numel() for p in params)

    def restore():
        for p, s in zip(params, saved):
            p.grad.to_local().copy_(s)

    contenders = {
        "gradclip": lambda m: gradclip.clip_grad_norm_(params, m),
        "torch": lambda m: torch.nn.utils.clip_grad_norm_(params, m),
    }
    rows = []
    for mode, max_norm in (("norm-noclip", norm * 2), ("norm-clip", norm * 0.5)):
        times = {k: [] for k in contenders}
        totals, collectives = {}, {}
        for name, fn in contenders.items():  # warm-up, and the counts
            restore()
            totals[name] = float(fn(max_norm).full_tensor())
            restore()
            collectives[name] = _collectives(lambda: fn(max_norm))
        for r in range(args.repeat):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                restore()
                dist.barrier()
                t0 = time.perf_counter()
                contenders[name](max_norm)
                times[name].append(time.perf_counter() - t0)
        for name in contenders:
            ts = sorted(times[name])
            rows.append({
                "mode": mode, "contender": name, "median_ms": statistics.median(ts) * 1e3,
                "p20_ms": ts[int(0.2 * (len(ts) - 1))] * 1e3, "p80_ms": ts[int(0.8 * (len(ts) - 1))] * 1e3,
                "collectives": collectives[name], "total": totals[name],
            })
    if rank == 0:
        lines = [
            f"# FSDP2 clip_grad_norm_ on {world} ranks (gloo, CPU)",
            "",
            f"{cpu_model()}, {os.cpu_count()} cores, 1 thread per rank; torch {torch.__version__}, gradclip "
            f"{gradclip.__version__} ({gradclip.build_info()['isa']}); {datetime.datetime.now().isoformat(timespec='seconds')}; "
            f"load average at start {os.getloadavg()[0]:.2f}.",
            f"Model: {args.layers} x Linear({args.width}, {args.width}), fully_shard per layer and at the root: "
            f"{len(params)} parameters, {n_params / 1e6:.1f}M elements, each rank holding half. "
            f"Median (p20-p80) of {args.repeat} interleaved calls on rank 0, gradients restored before each.",
            "",
            "| mode | contender | ms per call | p20-p80 | collectives per call | total norm |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r['mode']} | {r['contender']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} "
                         f"| {r['collectives']} | {r['total']:.6g} |")
        for mode in ("norm-noclip", "norm-clip"):
            g = next(r for r in rows if r["mode"] == mode and r["contender"] == "gradclip")
            t = next(r for r in rows if r["mode"] == mode and r["contender"] == "torch")
            lines.append(f"\n{mode}: gradclip {t['median_ms'] / g['median_ms']:.2f}x torch; totals differ by "
                         f"{abs(g['total'] - t['total']) / t['total']:.2g} (relative).")
        text = "\n".join(lines) + "\n"
        print(text)
        if out_path:
            with open(out_path, "w") as f:
                f.write(text)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    rendezvous = "file://" + os.path.join(tempfile.mkdtemp(prefix="gradclip-bench-"), "store")
    mp.spawn(_rank, args=(2, rendezvous, args, args.out), nprocs=2, join=True)


if __name__ == "__main__":
    main()
