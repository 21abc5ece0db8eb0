"""Sharded training on CPU with gloo: 2 and 4 ranks as processes on 127.0.0.1.

Each test spawns its ranks (torch.multiprocessing, bounded in time); every rank
runs one scenario and checks it against torch's own result on the same
DTensors and against a single-process reference on the unsharded gradients
(float64). A rank that fails raises there, and the test shows its traceback.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import time
import warnings

import pytest
import torch

import gradclip

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

pytestmark = pytest.mark.slow

INF = math.inf
TIMEOUT_S = 180


def _entry(rank: int, world: int, rendezvous: str, name: str, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    os.environ.setdefault("GRADCLIP_NUM_THREADS", "1")  # ranks share the machine's cores
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    # A rank stuck in a collective (another rank failed before it) raises
    # after this long instead of hanging the test.
    # The ranks meet through a file (no port to pick, so none to collide on).
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        globals()[name](rank, world, *args)
        # Whatever holds the group (DDP's reducer, ZeRO) goes before the group does.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, scenario, *args) -> None:
    import tempfile

    import torch.multiprocessing as mp

    rendezvous = "file://" + os.path.join(tempfile.mkdtemp(prefix="gradclip-dist-"), "store")
    ctx = mp.start_processes(_entry, args=(world, rendezvous, scenario.__name__, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario.__name__}: the ranks did not finish within {TIMEOUT_S} s")


# --------------------------------------------------------------------------
# helpers run on the ranks
# --------------------------------------------------------------------------


def _reference_norm(grads, p: float) -> float:
    """The norm of the unsharded gradients in float64, scaled first so that
    even values near 1e200 neither overflow nor underflow."""
    x = torch.cat([g.double().reshape(-1) for g in grads])
    scale = x.abs().max().item() or 1.0
    return torch.linalg.vector_norm(x / scale, p).item() * scale


def _close(got: float, want: float, rtol: float, what: str) -> None:
    assert got == want or abs(got - want) <= rtol * abs(want), f"{what}: {got!r} against {want!r}"


class _CountAllGathers:
    """Counts the collectives gradclip makes (it gathers with all_gather only)."""

    def __enter__(self):
        self.count = 0
        self._orig = dist.all_gather

        def counting(*a, **k):
            self.count += 1
            return self._orig(*a, **k)

        dist.all_gather = counting
        return self

    def __exit__(self, *exc):
        dist.all_gather = self._orig


def _dtensor_params(mesh, fulls, grads, placements):
    from torch.distributed.tensor import distribute_tensor

    params = []
    for f, g, pl in zip(fulls, grads, placements):
        p = torch.nn.Parameter(distribute_tensor(f.clone(), mesh, pl))
        p.grad = distribute_tensor(g.clone(), mesh, pl)
        params.append(p)
    return params


def _local(params):
    return [p.grad.to_local().clone() for p in params]


# --------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------


def _dtensor_drop_ins(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # the same full tensors on every rank
    # uneven rows (7 over 2 ranks), an empty local shard (1 row), 1-D, replicated
    fulls = [torch.randn(7, 3), torch.randn(1, 5), torch.randn(8), torch.randn(4, 4)]
    grads = [torch.randn_like(f) * 3 for f in fulls]
    placements = [[Shard(0)], [Shard(0)], [Shard(0)], [Replicate()]]
    for p in (2.0, 1.0, 3.0, INF):
        ours, theirs = _dtensor_params(mesh, fulls, grads, placements), _dtensor_params(mesh, fulls, grads, placements)
        with _CountAllGathers() as n:
            total = gradclip.clip_grad_norm_(ours, 0.5, p)
        assert n.count == 1, f"p={p}: {n.count} collectives"
        assert isinstance(total, DTensor) and all(pl.is_replicate() for pl in total.placements)
        reference = _reference_norm(grads, p)
        _close(float(total.full_tensor()), reference, 1e-6, f"p={p} total")
        coef = min(0.5 / (reference + 1e-6), 1.0)
        # torch has no inf norm of an empty local shard (it raises on that rank only)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5, p) if p != INF else None
        if expected is not None:
            assert total.dtype == expected.dtype
            _close(float(total.full_tensor()), float(expected.full_tensor()), 1e-5, f"p={p} against torch")
        for a, g, pl in zip(ours, grads, placements):
            want = g * coef
            got_full = a.grad.full_tensor()
            torch.testing.assert_close(got_full, want, rtol=2e-6, atol=0.0)
    # get_total_norm on DTensors, and clip_grads_with_norm_ with a DTensor norm
    ours, theirs = _dtensor_params(mesh, fulls, grads, placements), _dtensor_params(mesh, fulls, grads, placements)
    got = gradclip.get_total_norm([q.grad for q in ours])
    assert isinstance(got, DTensor)
    _close(float(got.full_tensor()), _reference_norm(grads, 2.0), 1e-6, "get_total_norm")
    gradclip.clip_grads_with_norm_(ours, 0.3, got)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.3, torch.nn.utils.get_total_norm([q.grad for q in theirs]))
    for a, b in zip(_local(ours), _local(theirs)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0.0)
    # A Partial gradient (values still to be summed over the ranks) is reduced
    # for its norm, as torch does, and its local values scaled by the same
    # coefficient, so that the pending sum is the clipped gradient.
    from torch.distributed.tensor import Partial

    partial_locals = [torch.randn(6, generator=torch.Generator().manual_seed(20 + r)) for r in range(world)]
    summed = sum(partial_locals)
    sharded = torch.randn(10) * 2
    ours = _dtensor_params(mesh, [torch.zeros(10)], [sharded], [[Shard(0)]])
    q = torch.nn.Parameter(DTensor.from_local(torch.zeros(6), mesh, [Partial()]))
    q.grad = DTensor.from_local(partial_locals[rank].clone(), mesh, [Partial()])
    total = gradclip.clip_grad_norm_(ours + [q], 0.5)
    reference = _reference_norm([sharded, summed], 2.0)
    _close(float(total.full_tensor()), reference, 1e-6, "with a Partial gradient")
    coef = min(0.5 / (reference + 1e-6), 1.0)
    torch.testing.assert_close(q.grad.full_tensor(), summed * coef, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[0].grad.full_tensor(), sharded * coef, rtol=2e-6, atol=0.0)
    with pytest.raises(ValueError, match=r"parameters\[0\]\.grad: a DTensor with a Partial placement"):
        gradclip.clip_grad_value_([q], 0.1)
    # clip_grad_value_ clamps the local shards exactly as torch does
    ours, theirs = _dtensor_params(mesh, fulls, grads, placements), _dtensor_params(mesh, fulls, grads, placements)
    gradclip.clip_grad_value_(ours, 0.7)
    torch.nn.utils.clip_grad_value_(theirs, 0.7)
    for a, b in zip(_local(ours), _local(theirs)):
        assert torch.equal(a, b)


def _dtensor_nonfinite_and_overflow(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    # float64 gradients near 1e200: every rank's sum of squares overflows alone,
    # yet the norm is finite and the combine keeps it so.
    fulls = [torch.randn(64, 3, dtype=torch.float64)]
    grads = [torch.randn(64, 3, dtype=torch.float64) * 1e200]
    params = _dtensor_params(mesh, fulls, grads, [[Shard(0)]])
    total = gradclip.clip_grad_norm_(params, 1.0)
    reference = _reference_norm(grads, 2.0)
    assert math.isfinite(reference)
    _close(float(total.full_tensor()), reference, 1e-13, "float64 near 1e200")
    # A NaN in one rank's shard: every rank raises (the same decision), nothing is written.
    grads = [torch.randn(8, 3)]
    grads[0][7, 1] = float("nan")  # on the last rank's shard only
    params = _dtensor_params(mesh, [torch.randn(8, 3)], grads, [[Shard(0)]])
    before = _local(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for a, b in zip(_local(params), before):
        assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


def _two_dimensional_meshes(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(2)
    fulls = [torch.randn(6, 8), torch.randn(5, 4), torch.randn(8)]
    grads = [torch.randn_like(f) for f in fulls]
    for name, placements in {
        "HSDP (Replicate x Shard)": [[Replicate(), Shard(0)]] * 3,
        "FSDP + TP (Shard x Shard)": [[Shard(0), Shard(1)], [Shard(0), Shard(1)], [Shard(0), Replicate()]],
    }.items():
        ours = _dtensor_params(mesh, fulls, grads, placements)
        theirs = _dtensor_params(mesh, fulls, grads, placements)
        with _CountAllGathers() as n:
            total = gradclip.clip_grad_norm_(ours, 0.5)
        assert n.count == 1, f"{name}: {n.count} collectives"
        expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        _close(float(total.full_tensor()), _reference_norm(grads, 2.0), 1e-6, name)
        _close(float(total.full_tensor()), float(expected.full_tensor()), 1e-5, f"{name} against torch")
        for a, b in zip(_local(ours), _local(theirs)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0)
    # FSDP + TP as torchtitan builds it: parallelize_module on the tp dimension
    # (the FSDP shards of tp shards are _StridedShard placements), fully_shard on dp.
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def build():
        torch.manual_seed(3)
        m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
        parallelize_module(m, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(m, mesh=mesh["dp"])
        return m

    ours, theirs = build(), build()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(mesh.get_coordinate()[0]))
    for m in (ours, theirs):
        m(x).square().sum().backward()
    with _CountAllGathers() as n:
        total = gradclip.clip_grad_norm_(ours.parameters(), 0.5)
    assert n.count == 1
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
    _close(float(total.full_tensor()), float(expected.full_tensor()), 1e-6, "FSDP + TP (parallelize_module)")
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad.to_local(), b.grad.to_local(), rtol=1e-5, atol=1e-7)


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 5))


def _fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    reference = _mlp(3)  # unsharded, the same initial weights
    models = [_mlp(3), _mlp(3)]
    for m in models:
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(m)
    ours, theirs = models
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.01)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=0.01)
    handle = gradclip.attach(opt_ours, global_clipnorm=0.05)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(world * 8, 12, generator=g)
        mine = x[rank * 8 : (rank + 1) * 8]  # data parallel: each rank its own batch
        for m, o in ((ours, opt_ours), (theirs, opt_theirs)):
            o.zero_grad()
            (m(mine).square().mean() * 50).backward()
        opt_ref.zero_grad()
        (reference(x).square().mean() * 50).backward()  # FSDP averages the ranks' gradients
        ref_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch_total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        opt_ours.step()
        opt_theirs.step()
        opt_ref.step()
        _close(handle.last.total_norm, float(ref_total), 1e-5, f"step {step}: attach's total")
        _close(handle.last.total_norm, float(torch_total.full_tensor()), 1e-5, f"step {step}: against torch")
        assert handle.last.clipped
    for a, b, r in zip(ours.parameters(), theirs.parameters(), reference.parameters()):
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.full_tensor(), r.detach(), rtol=1e-4, atol=1e-5)
    # Folded into a fused AdamW step (attach's default there): the norm combined over
    # the mesh, its coefficient the step's grad_scale; the same training as torch's
    # clip then the same fused step.
    folded, plain = _mlp(3), _mlp(3)
    for m in (folded, plain):
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(m)
    opt_folded = torch.optim.AdamW(folded.parameters(), lr=0.01, fused=True)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.01, fused=True)
    handle = gradclip.attach(opt_folded, global_clipnorm=0.05)
    assert handle.fold
    for step in range(3):
        x = torch.randn(8, 12, generator=torch.Generator().manual_seed(300 + 10 * step + rank))
        for m, o in ((folded, opt_folded), (plain, opt_plain)):
            o.zero_grad()
            (m(x).square().mean() * 50).backward()
        torch_total = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt_folded.step()
        opt_plain.step()
        _close(handle.last.total_norm, float(torch_total.full_tensor()), 1e-5, f"step {step}: folded on FSDP2")
        assert handle.last.clipped
    for a, b in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=1e-5, atol=1e-6)
    # The drop-in on FSDP2 parameters, as torch's: a DTensor total, the same value.
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(200 + rank))
    for m in models:
        m.zero_grad()
        m(x).sum().backward()
    total = gradclip.clip_grad_norm_(ours.parameters(), 1e9)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1e9)
    _close(float(total.full_tensor()), float(expected.full_tensor()), 1e-5, "clip_grad_norm_ on FSDP2")


def _process_groups(rank, world):
    # Hand-made tensor parallel: W's rows are split over the ranks, the bias is
    # held whole by every rank.
    torch.manual_seed(4)
    w_full, b = torch.randn(8, 5) * 2, torch.randn(5)
    rows = w_full.shape[0] // world
    reference = _reference_norm([w_full, b], 2.0)
    coef = min(0.5 / (reference + 1e-6), 1.0)

    def shard_params():
        w = torch.nn.Parameter(torch.zeros(rows, 5))
        w.grad = w_full[rank * rows : (rank + 1) * rows].clone()
        bias = torch.nn.Parameter(torch.zeros(5))
        bias.grad = b.clone()
        return w, bias

    w, bias = shard_params()
    with _CountAllGathers() as n:
        total = gradclip.clip_grad_norm_([w, bias], 0.5, process_group=dist.group.WORLD, replicated=[bias])
    assert n.count == 1
    _close(float(total), reference, 1e-6, "total over the group")
    torch.testing.assert_close(w.grad, w_full[rank * rows : (rank + 1) * rows] * coef, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(bias.grad, b * coef, rtol=2e-6, atol=0.0)
    got = gradclip.get_total_norm([w_full[rank * rows : (rank + 1) * rows], b], process_group=dist.group.WORLD,
                                  replicated=[b])
    _close(float(got), reference, 1e-6, "get_total_norm over the group")
    # The training front end over the group: the record's total is the global
    # norm; a NaN on one rank makes every rank skip (the same decision).
    w, bias = shard_params()
    opt = torch.optim.SGD([w, bias], lr=1.0)
    handle = gradclip.attach(opt, global_clipnorm=0.5, nonfinite="skip", process_group=dist.group.WORLD,
                             replicated=[bias])
    opt.step()
    _close(handle.last.total_norm, reference, 1e-6, "attach's total")
    w, bias = shard_params()
    if rank == world - 1:
        w.grad[0, 0] = float("nan")
    opt = torch.optim.SGD([w, bias], lr=1.0)
    handle = gradclip.attach(opt, global_clipnorm=0.5, nonfinite="skip", process_group=dist.group.WORLD,
                             replicated=[bias])
    opt.step()
    assert handle.last.skipped, f"rank {rank} did not skip"
    assert torch.equal(w.detach(), torch.zeros(rows, 5)) and torch.equal(bias.detach(), torch.zeros(5))
    # Folded into a fused step: the coefficient of the norm over the group goes to the
    # step's grad_scale; the same update as clipping by hand first, and every rank skips.
    for nan in (False, True):
        (w, bias), (w_ref, bias_ref) = shard_params(), shard_params()
        if nan and rank == 0:
            w.grad[1, 1] = w_ref.grad[1, 1] = float("nan")
        opt = torch.optim.SGD([w, bias], lr=1.0, fused=True)
        handle = gradclip.attach(opt, global_clipnorm=0.5, nonfinite="skip", process_group=dist.group.WORLD,
                                 replicated=[bias])
        assert handle.fold
        opt.step()
        assert handle.last.skipped == nan, rank
        if nan:
            assert torch.equal(w.detach(), torch.zeros(rows, 5)) and torch.equal(bias.detach(), torch.zeros(5))
            continue
        _close(handle.last.total_norm, reference, 1e-6, "attach's total, folded")
        torch.testing.assert_close(w.detach(), -w_ref.grad * coef, rtol=2e-6, atol=0.0)
        torch.testing.assert_close(bias.detach(), -bias_ref.grad * coef, rtol=2e-6, atol=0.0)
    # A found_inf (as a GradScaler sets it) on one rank only: that rank must still take
    # part in the norm's collective (else the other waits forever); its fused step then
    # skips the update, the other's does not.
    w, bias = shard_params()
    opt = torch.optim.SGD([w, bias], lr=1.0, fused=True)
    handle = gradclip.attach(opt, global_clipnorm=0.5, process_group=dist.group.WORLD, replicated=[bias])
    opt.found_inf = torch.full((), 1.0 if rank == 0 else 0.0)
    opt.step()
    del opt.found_inf
    _close(handle.last.total_norm, reference, 1e-6, "attach's total beside a found_inf")
    assert torch.equal(w.detach(), torch.zeros(rows, 5)) == (rank == 0)


def _pipeline_groups(rank, world):
    # 4 ranks: data-parallel shard groups {0, 1}, {2, 3} and pipeline stages
    # {0, 2}, {1, 3}; every rank holds a different part of the model.
    shard_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    stage_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    torch.manual_seed(5)
    parts = [torch.randn(10 + r) for r in range(world)]
    mine = torch.nn.Parameter(torch.zeros_like(parts[rank]))
    mine.grad = parts[rank].clone()
    with _CountAllGathers() as n:
        total = gradclip.clip_grad_norm_([mine], 1.0, process_group=[shard_groups[rank // 2], stage_groups[rank % 2]])
    assert n.count == 2  # one per group
    reference = _reference_norm(parts, 2.0)
    _close(float(total), reference, 1e-6, "total over shard groups and stages")
    torch.testing.assert_close(mine.grad, parts[rank] * min(1.0 / (reference + 1e-6), 1.0), rtol=2e-6, atol=0.0)


def _zero_redundancy(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    models = [DistributedDataParallel(_mlp(6)), DistributedDataParallel(_mlp(6))]
    zero = ZeroRedundancyOptimizer(models[0].parameters(), optimizer_class=torch.optim.SGD, lr=0.5)
    plain = torch.optim.SGD(models[1].parameters(), lr=0.5)
    handle = gradclip.attach(zero, global_clipnorm=0.02)
    for step in range(2):
        x = torch.randn(6, 12, generator=torch.Generator().manual_seed(10 * step + rank))
        for m, o in zip(models, (zero, plain)):
            o.zero_grad()
            m(x).square().sum().backward()
        expected = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.02)
        zero.step()
        plain.step()
        _close(handle.last.total_norm, float(expected), 1e-6, f"step {step}")
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    handle.remove()
    del zero, plain, models


def _ddp_measured_buckets(rank, world):
    # attach(..., measure_in_backward=ddp_model): each bucket's gradients are measured
    # in DDP's communication hook once all-reduced. Training must equal the folded clip
    # that reads everything at the step (a second DDP copy), with and without
    # gradient_as_bucket_view, several buckets, and gradient accumulation under
    # no_sync(); every hooked gradient's measurement is used; a gradient changed after
    # backward is read again.
    from torch.nn.parallel import DistributedDataParallel

    def big_mlp():
        torch.manual_seed(8)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                                   torch.nn.Tanh(), torch.nn.Linear(256, 7))

    for as_view in (False, True):
        ddp = [DistributedDataParallel(big_mlp(), gradient_as_bucket_view=as_view, bucket_cap_mb=0.2)
               for _ in range(2)]
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in ddp]
        early = gradclip.attach(opts[0], global_clipnorm=0.5, measure_in_backward=ddp[0])
        plain = gradclip.attach(opts[1], global_clipnorm=0.5)
        assert early.fold and plain.fold
        n_params = len(list(ddp[0].parameters()))
        for step in range(6):
            accumulate = 1 + step % 3
            for micro in range(accumulate):
                x = torch.randn(5, 64, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
                for m in ddp:
                    if micro < accumulate - 1:
                        with m.no_sync():
                            (m(x) * 10).square().mean().backward()
                    else:
                        (m(x) * 10).square().mean().backward()
            used = early._backward_norms.used
            if step == 4:  # changed in place after the hook measured it: must be read again
                for m in ddp:
                    m.module[2].weight.grad.mul_(3.0)
            for o in opts:
                o.step()
                o.zero_grad()
            used = early._backward_norms.used - used
            # At step 4 the changed gradient is read again (with gradient_as_bucket_view its
            # bucket's other views share its version counter, so they are read again too).
            assert used == n_params if step != 4 else used < n_params, (as_view, step, used)
            a, b = plain.last, early.last
            _close(b.total_norm, a.total_norm, 1e-12, f"as_view={as_view} step {step}")
            assert b.tensor_norms() == pytest.approx(a.tensor_norms(), rel=1e-12)
            assert a.clipped and b.clipped
        for p, q in zip(ddp[0].parameters(), ddp[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        # The measured clip is of the reduced gradient: every rank holds the same total.
        totals = [None] * world
        dist.all_gather_object(totals, early.last.total_norm)
        assert len(set(totals)) == 1, totals
        early.remove()
        plain.remove()
        del ddp, opts
    # find_unused_parameters: a layer the forward skips keeps its old .grad (DDP does
    # not write it), different on each rank; the bucket held something else, so its
    # measurement must not be used. Then: remove() and a new attach() on the same
    # model take the hook up again; two at once are refused; Join's all-reduce of a
    # rank out of inputs runs outside backward and is not measured.
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.body, self.unused = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.body(x)

    ddp = [DistributedDataParallel(Branchy(), find_unused_parameters=True) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in ddp]
    early = gradclip.attach(opts[0], global_clipnorm=0.05, measure_in_backward=ddp[0])
    plain = gradclip.attach(opts[1], global_clipnorm=0.05)
    for step in range(3):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7 * step + rank))
        for m in ddp:
            m.module.unused.weight.grad = torch.full((64, 64), 1.0 + rank + step)  # stale, this rank's own
            (m(x) * 10).square().mean().backward()
        for o in opts:
            o.step()
        _close(early.last.total_norm, plain.last.total_norm, 1e-12, f"find_unused step {step}")
    early.remove()
    again = gradclip.attach(opts[0], global_clipnorm=0.05, measure_in_backward=ddp[0])
    with pytest.raises(ValueError, match="already measured for another attach"):
        gradclip.attach(opts[1], global_clipnorm=0.05, measure_in_backward=ddp[0])
    from torch.distributed.algorithms.join import Join

    batches = 2 + rank  # uneven: rank 0 joins early and shadows the others' all-reduces
    with Join([ddp[0]]):
        for step in range(batches):
            x = torch.randn(5, 64, generator=torch.Generator().manual_seed(50 + step))
            opts[0].zero_grad()
            (ddp[0](x) * 10).square().mean().backward()
            opts[0].step()
            assert again.last.clipped
    again.remove()
    plain.remove()
    del ddp, opts
    # Refusals: the plain hooks among ranks, a DDP model with a hook of its own.
    model = DistributedDataParallel(big_mlp())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with pytest.raises(ValueError, match="one of several ranks.*measure_in_backward=ddp_model"):
        gradclip.attach(opt, global_clipnorm=0.5, measure_in_backward=True)
    model.register_comm_hook(None, lambda state, bucket: torch.futures.Future())
    with pytest.raises(ValueError, match="DDP takes one only"):
        gradclip.attach(opt, global_clipnorm=0.5, measure_in_backward=model)
    del model, opt


def _grad_buffer_under_ddp(rank, world):
    # DDP copies the reduced buckets into the buffer's views (gradient_as_bucket_view=False):
    # nothing to repair. With bucket views DDP re-points .grad at its buckets each backward:
    # the buffer copies them back (repairs grow), and the clip is still torch's.
    from torch.nn.parallel import DistributedDataParallel

    for as_view in (False, True):
        models = [_mlp(11), _mlp(11)]
        ddp = [DistributedDataParallel(m, gradient_as_bucket_view=as_view) for m in models]
        buf = gradclip.GradBuffer(models[0].parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(3):
                x = torch.randn(6, 12, generator=torch.Generator().manual_seed(10 * step + rank))
                for m in ddp:
                    (m(x).square().sum() * 10).backward()
                total = buf.clip_grad_norm_(0.05)
                expected = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.05)
                _close(float(total), float(expected), 1e-6, f"as_view={as_view} step {step}")
                for a, b in zip(models[0].parameters(), models[1].parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)
                buf.zero_grad()
                models[1].zero_grad(set_to_none=False)
        assert (buf.repairs > 0) == as_view, (as_view, buf.repairs)
        del ddp, buf


def _fsdp1(rank, world):
    # FSDP1 hands the optimizer flat local shards (plain tensors): attach refuses
    # to clip them by a local norm, and with process_group= matches FSDP's own
    # model.clip_grad_norm_.
    from torch.distributed.fsdp import FullyShardedDataParallel

    models = [FullyShardedDataParallel(_mlp(7), device_id=torch.device("cpu")) for _ in range(2)]
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(rank))
    for m in models:
        m(x).square().sum().backward()
    opt = torch.optim.SGD(models[0].parameters(), lr=0.1)
    handle = gradclip.attach(opt, global_clipnorm=0.5)
    with pytest.raises(ValueError, match=r"FSDP \(FullyShardedDataParallel\) flat shard.*process_group"):
        opt.step()
    handle.remove()
    ours = gradclip.clip_grad_norm_(list(models[0].parameters()), 0.5, process_group=models[0].process_group)
    theirs = models[1].clip_grad_norm_(0.5)
    _close(float(ours), float(theirs), 1e-6, "FSDP1 with process_group")
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0.0)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_dtensor_drop_ins_follow_torch_and_the_unsharded_reference():
    run_ranks(2, _dtensor_drop_ins)


def test_dtensor_overflow_and_nonfinite_decision_on_every_rank():
    run_ranks(2, _dtensor_nonfinite_and_overflow)


def test_two_dimensional_meshes_hsdp_and_fsdp_with_tp():
    run_ranks(4, _two_dimensional_meshes)


def test_fsdp2_attach_and_drop_in():
    run_ranks(2, _fsdp2)


def test_plain_shards_over_a_process_group_with_replicated_tensors():
    run_ranks(2, _process_groups)


def test_shard_groups_and_pipeline_stages():
    run_ranks(4, _pipeline_groups)


def test_zero_redundancy_optimizer():
    run_ranks(2, _zero_redundancy)


def test_ddp_buckets_measured_in_the_communication_hook():
    run_ranks(2, _ddp_measured_buckets)


def test_grad_buffer_under_ddp():
    run_ranks(2, _grad_buffer_under_ddp)


def test_fsdp1_flat_shards_need_the_group():
    run_ranks(2, _fsdp1)


def test_refusals_in_one_process():
    # Without a mesh or a group nothing is combined: plain tensors with
    # replicated= but no group, and FSDP1 flat shards under attach, are refused.
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="process_group: plain tensors need the group"):
        gradclip.clip_grad_norm_([w], 1.0, replicated=[w])
    with pytest.raises(ValueError, match="agc over sharded gradients"):
        gradclip.clip_gradients_([w], agc=0.01, process_group=object())


def test_the_readme_recipes_run():
    # examples/distributed.py: FSDP2, tensor parallel by hand, DDP, ZeRO and
    # pipeline stages on 4 ranks, each checked against the unsharded norm.
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"
    done = subprocess.run([sys.executable, "-W", "ignore", str(example)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "total norm" in line]
    assert [line.split()[0] for line in lines] == ["fsdp2", "tensor_parallel_by_hand", "ddp", "zero",
                                                  "pipeline_stages"]
