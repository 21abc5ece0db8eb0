"""gradclip in sharded training: the README's recipes, run on 4 CPU ranks (gloo).

    python examples/distributed.py

Each recipe clips with gradclip and checks the total against the norm of the
unsharded gradients, on every rank; it prints one line per recipe on rank 0.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist

import gradclip

WORLD = 4


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))


def full_norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors])).item()


def fsdp2(rank: int) -> float:
    from torch.distributed.fsdp import fully_shard

    m = model()
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    handle = gradclip.attach(opt, global_clipnorm=1.0)  # DTensor gradients: combined over the mesh
    m(batch(rank)).square().sum().backward()
    opt.step()
    total = handle.last.total_norm  # the global norm, the same on every rank
    # Or the drop-in, with torch's signature and result (a replicated DTensor):
    m(batch(rank)).square().sum().backward()
    gradclip.clip_grad_norm_(m.parameters(), max_norm=1.0)
    return total


def tensor_parallel_by_hand(rank: int) -> float:
    # W's rows split over the ranks; the bias is held whole by every rank.
    torch.manual_seed(1)
    w_full, b_grad = torch.randn(8 * WORLD, 5), torch.randn(5)
    w = torch.nn.Parameter(torch.zeros(8, 5))
    w.grad = w_full[8 * rank : 8 * (rank + 1)].clone()
    b = torch.nn.Parameter(torch.zeros(5))
    b.grad = b_grad.clone()
    total = gradclip.clip_grad_norm_([w, b], max_norm=1.0, process_group=dist.group.WORLD, replicated=[b])
    assert abs(float(total) - full_norm([w_full, b_grad])) <= 1e-6 * float(total)
    return float(total)


def ddp(rank: int) -> float:
    from torch.nn.parallel import DistributedDataParallel

    m = DistributedDataParallel(model())  # every rank holds the full, all-reduced gradients
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    handle = gradclip.attach(opt, global_clipnorm=1.0)  # no group needed
    m(batch(rank)).square().sum().backward()
    opt.step()
    return handle.last.total_norm


def zero(rank: int) -> float:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    m = DistributedDataParallel(model())
    opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    handle = gradclip.attach(opt, global_clipnorm=1.0)  # the wrapper, not its local opt.optim
    m(batch(rank)).square().sum().backward()
    opt.step()
    return handle.last.total_norm


def pipeline_stages(rank: int) -> float:
    # 2 x 2: data-parallel shard groups {0, 1}, {2, 3} and pipeline stages
    # {0, 2}, {1, 3}; every rank holds a different part of the gradients.
    shard_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    stage_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    torch.manual_seed(2)
    parts = [torch.randn(10) for _ in range(WORLD)]
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = parts[rank].clone()
    total = gradclip.clip_grad_norm_([p], max_norm=1.0,
                                     process_group=[shard_groups[rank // 2], stage_groups[rank % 2]])
    assert abs(float(total) - full_norm(parts)) <= 1e-6 * float(total)
    return float(total)


def run(rank: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    for recipe in (fsdp2, tensor_parallel_by_hand, ddp, zero, pipeline_stages):
        total = recipe(rank)
        totals = [None] * WORLD
        dist.all_gather_object(totals, total)
        assert len(set(totals)) == 1, f"{recipe.__name__}: the ranks disagree: {totals}"
        if rank == 0:
            print(f"{recipe.__name__:24s} total norm {total:.6g}, the same on all {WORLD} ranks")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    store = "file://" + os.path.join(tempfile.mkdtemp(prefix="gradclip-example-"), "store")
    mp.spawn(run, args=(store,), nprocs=WORLD, join=True)
