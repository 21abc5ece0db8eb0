"""Whole training iterations (forward, backward, clip, fused AdamW step) with the clip's
norm read at the step or during backward, against torch's clip and against no clip.

    python bench/backward_norms.py [--layers 16] [--width 2048] [--batch 8] [--rounds 12] [--ddp]

* no clip: backward, then ``opt.step()``;
* torch: backward, ``torch.nn.utils.clip_grad_norm_``, ``opt.step()``;
* gradclip folded: ``attach`` (one read pass at the step, the coefficient folded into
  the fused step's grad_scale);
* gradclip folded, measured in backward: ``attach(..., measure_in_backward=True)``: the
  hooks read each large gradient right after autograd wrote it.

With ``--ddp`` the same runs on 2 ranks (gloo, one thread each, DDP with its default
buckets), and the last contender is ``attach(..., measure_in_backward=ddp_model)``: the
communication hook reads each bucket once all-reduced.

Each contender trains its own copy of the same model on the same batches; every step
clips (max_norm is small). Reported per contender: the median iteration, and its
optimizer part (clip + step) alone; the clip's cost is either less the no-clip run's.
Honest accounting: the iteration includes the hooks' time inside backward.
"""

import argparse
import os
import statistics
import time

import torch

import gradclip
from gradclip.bench import env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--ddp", action="store_true", help="2 ranks (gloo), DDP, measured in its communication hook")
    args = ap.parse_args()
    if args.ddp:
        import tempfile

        import torch.multiprocessing as mp

        store = "file://" + os.path.join(tempfile.mkdtemp(prefix="gradclip-bench-"), "store")
        mp.start_processes(_rank, args=(2, store, args), nprocs=2, start_method="spawn")
    else:
        _run(args, rank=0, world=1)


def _rank(rank, world, store, args) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["GRADCLIP_NUM_THREADS"] = "1"  # the two ranks share the machine's cores
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        _run(args, rank, world)
    finally:
        dist.destroy_process_group()


def _run(args, rank: int, world: int) -> None:
    quiet = env.Quietness()

    def model():
        torch.manual_seed(0)
        layers = []
        for _ in range(args.layers):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers)

    measured = "gradclip folded, measured in DDP's hook" if world > 1 else "gradclip folded, measured in backward"
    names = ("no clip", "torch", "gradclip folded", measured)
    runs = {}
    for name in names:
        m = model()
        measure = name.endswith("backward")
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            m = DistributedDataParallel(m)
            measure = m if name == measured else False
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
        if name == "torch":
            params = list(m.parameters())

            def optimizer_part(opt=opt, params=params):
                torch.nn.utils.clip_grad_norm_(params, 1e-3)
                opt.step()
        else:
            if name.startswith("gradclip"):
                handle = gradclip.attach(opt, global_clipnorm=1e-3, measure_in_backward=measure)
                assert handle.fold
            optimizer_part = opt.step
        runs[name] = (m, opt, optimizer_part)
    batches = [torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(world * k + rank))
               for k in range(args.rounds + 2)]
    iteration = {n: [] for n in names}
    optimizer_part_s = {n: [] for n in names}
    for r, x in enumerate(batches):
        order = names if r % 2 == 0 else tuple(reversed(names))
        for name in order:
            m, opt, step = runs[name]
            t0 = time.perf_counter()
            m(x).square().mean().backward()
            t1 = time.perf_counter()
            step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            if r >= 2:  # two warm-up rounds
                iteration[name].append(t2 - t0)
                optimizer_part_s[name].append(t2 - t1)
    run = quiet.finish(os.cpu_count())
    if rank:
        return
    n = sum(p.numel() for p in runs["torch"][0].parameters())
    med = {k: statistics.median(v) for k, v in iteration.items()}
    opt_med = {k: statistics.median(v) for k, v in optimizer_part_s.items()}
    bare_iter, bare_step = med["no clip"], opt_med["no clip"]
    print(f"{env.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"gradclip {gradclip.__version__} ({gradclip.build_info()['isa']}); {args.layers} x Linear({args.width}, "
          f"{args.width}) + Tanh, {n / 1e6:.1f}M fp32 parameters, batch {args.batch}"
          f"{f', {world} ranks (DDP, gloo), rank 0 timed' if world > 1 else ''}; medians of {args.rounds} "
          f"interleaved rounds; load average {run['loadavg_start']} -> {run['loadavg_end']}, other processes "
          f"{run['other_busy_cores']} cores, noisy={run['noisy']}")
    print(f"{'':40s} {'iteration':>10s} {'clip + step':>12s} {'clip adds (iteration)':>22s} {'(step part)':>12s}")
    for k in names:
        print(f"{k:40s} {med[k] * 1e3:8.1f} ms {opt_med[k] * 1e3:9.1f} ms "
              f"{(med[k] - bare_iter) * 1e3:+12.1f} ms = {100 * (med[k] - bare_iter) / bare_step:5.1f}% "
              f"{100 * (opt_med[k] - bare_step) / bare_step:10.1f}%")
    print("(% of the bare fused step's median)")


if __name__ == "__main__":
    main()
