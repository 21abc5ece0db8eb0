"""The engine's seam (gradclip._seam, gradclip._core.reduce): a list reduced in
parts, the parts' partial power sums stacked and every part finished with the
same stack, must behave as the whole list clipped in one call: the same total
(to float64 rounding of the reference), the same coefficient, the same
decision on a nonfinite norm in every part. The same on the CUDA kernels run
on the host (gradclip._cuda_sim), where the partials stay in "device" memory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradclip
from gradclip import _core, _seam
from conftest import (
    EPS,
    INF,
    NORM_IDS,
    NORM_ORDERS,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled,
    make_torch,
    norm_rtol,
    ref_norm,
)

SIZES = [1, 17, 1000, 40000, 3, 70001]


def parts_of(tensors, k):
    """The list cut into k consecutive parts."""
    cut = [round(i * len(tensors) / k) for i in range(k + 1)]
    return [tensors[cut[i] : cut[i + 1]] for i in range(k)]


def reduce_parts(parts, p, nonfinite="propagate", **kw):
    local = [_seam.reduce(part, order=p, argname="tensors", nonfinite=nonfinite, **kw) for part in parts]
    stack = np.stack([np.asarray(n.partials) for n in local])
    return local, stack


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_parts_finished_with_one_stack_clip_like_the_whole_list(p, dtype, k):
    tensors = [make_torch(n, dtype, seed=100 + i, scale=3.0) for i, n in enumerate(SIZES)]
    originals = [t.clone() for t in tensors]
    expected = ref_norm(originals, p)
    local, stack = reduce_parts(parts_of(tensors, k), p)
    assert stack.shape == (k, 1, 2) and stack.dtype == np.float64
    results = [n.finish(kind="global", limits=[1.0], eps=EPS, combined=stack, report=True) for n in local]
    totals = [r.total for r in results]
    assert len(set(totals)) == 1, f"the parts disagree on the total: {totals}"
    assert_norm_close(totals[0], expected, p, rtol=2 * norm_rtol(p))
    coefs = {float(r.group_coefs[0]) for r in results}
    assert len(coefs) == 1
    for got, original in zip(tensors, originals):
        assert_scaled(got, original, 1.0, expected, rtol=2 * norm_rtol(p))


def test_no_stack_finishes_on_the_local_sums():
    tensors = [make_torch(n, torch.float32, seed=7 + i) for i, n in enumerate(SIZES)]
    whole = [t.clone() for t in tensors]
    local = _seam.reduce(tensors, order=2.0, argname="tensors")
    r = local.finish(kind="global", limits=[0.5], eps=EPS)
    expected = gradclip.clip_by_global_norm_(whole, 0.5)
    assert r.total == expected  # the local path is the fused call's arithmetic, bit for bit
    for a, b in zip(tensors, whole):
        assert_bitwise_equal(a, b)


def test_huge_float64_parts_combine_without_overflow():
    # Each part's sum of squares overflows float64; the partials carry their
    # bases, so the combined norm is finite, as one call over the whole list.
    parts = [[make_torch(5000, torch.float64, seed=s, scale=1e200)] for s in (1, 2)]
    expected = ref_norm([t for part in parts for t in part], 2.0)
    assert math.isfinite(expected) and expected > 1e200
    local, stack = reduce_parts(parts, 2.0)
    r = local[0].finish(kind="none", combined=stack)
    assert_norm_close(r.total, expected, 2.0, rtol=2 * norm_rtol(2.0))
    single = gradclip.global_norm([t for part in parts for t in part])
    assert abs(r.total - single) <= 2 * norm_rtol(2.0) * single


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_nonfinite_part_holds_every_part(bad):
    parts = [[make_torch(100, torch.float32, seed=3)], [make_torch(100, torch.float32, seed=4)]]
    parts[1][0][10] = bad
    before = [t.clone() for part in parts for t in part]
    local, stack = reduce_parts(parts, 2.0, nonfinite="error")
    results = [n.finish(kind="global", limits=[0.1], eps=EPS, nonfinite="error", combined=stack, report=True)
               for n in local]
    assert [r.nonfinite for r in results] == [True, True]
    assert [r.held for r in results] == [True, True]
    assert not any(r.written for r in results)
    for t, b in zip([t for part in parts for t in part], before):
        assert_bitwise_equal(t, b)
    # The part without the bad value knows its own tensors were finite.
    assert results[0].nonfinite_indices.size == 0 and results[1].nonfinite_indices.tolist() == [0]


def test_groups_combine_group_by_group():
    tensors = [make_torch(n, torch.float64, seed=40 + i) for i, n in enumerate(SIZES)]
    groups = np.array([0, 1, 0, 1, 1, 0], np.int32)
    expected = [ref_norm([t for t, g in zip(tensors, groups) if g == want], 2.0) for want in (0, 1)]
    halves = parts_of(list(range(len(tensors))), 2)
    local = [_seam.reduce([tensors[i] for i in idx], order=2.0, argname="tensors", group_of_item=groups[idx],
                          n_groups=2) for idx in halves]
    stack = np.stack([n.partials for n in local])
    assert stack.shape == (2, 2, 2)
    results = [n.finish(kind="global", limits=[0.5, 1e9], eps=EPS, combined=stack, report=True) for n in local]
    for r in results:
        for g in (0, 1):
            assert_norm_close(r.group_norms[g], expected[g], 2.0, rtol=2 * norm_rtol(2.0))
        assert r.group_coefs[1] == 1.0 and r.group_coefs[0] < 1.0


def test_zero_policy_repairs_while_reducing():
    t = make_torch(64, torch.float32, seed=5)
    t[3] = float("nan")
    local = _seam.reduce([t], order=2.0, argname="tensors", nonfinite="zero")
    assert t[3].item() == 0.0
    total, nonfinite = local.summary()
    assert nonfinite and math.isfinite(total)
    r = local.finish(kind="none", report=True)
    assert r.zeroed == 1 and r.nonfinite_indices.tolist() == [0]


def test_misuse_is_refused():
    t = make_torch(10, torch.float32, seed=6)
    local = _seam.reduce([t], order=2.0, argname="tensors")
    with pytest.raises(ValueError, match=r"combined: expected a float64 array of shape \(k, 1, 2\)"):
        local.finish(kind="none", combined=np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"combined: expected a float64"):
        local.finish(kind="none", combined=np.zeros((1, 1, 2), np.float32))
    with pytest.raises(ValueError, match=r"limits: expected one per group \(1\), got 2"):
        local.finish(kind="global", limits=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"'zero' repairs while reducing"):
        local.finish(kind="none", nonfinite="zero")
    local.finish(kind="none")
    with pytest.raises(ValueError, match="this reduction is finished"):
        local.finish(kind="none")
    with pytest.raises(ValueError, match=r"n_groups: without group_of_item"):
        _core.reduce([t], argname="tensors", n_groups=2)


def test_reduce_checks_for_writing_before_anything():
    ro = np.ones(8, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=r"arrays\[1\]: array is read-only"):
        _seam.reduce([np.ones(4, np.float32), ro], order=2.0, argname="arrays")


# ---- the same on the CUDA kernels, run on the host ----

@pytest.fixture
def sim_backend():
    from conftest import require_cuda_sim
    from fake_cuda import host_allocate

    sim = require_cuda_sim()
    _core._use_cuda_backend(sim._api, host_allocate)
    try:
        yield sim
    finally:
        _core._use_cuda_backend(None, None)


@pytest.mark.parametrize("p", [1.0, 2.0, INF, 3.0], ids=["L1", "L2", "Linf", "L3"])
def test_parts_on_the_simulated_device(sim_backend, p):
    from fake_cuda import FakeCudaArray

    tensors = [make_torch(n, torch.float32, seed=200 + i, scale=2.0) for i, n in enumerate(SIZES)]
    originals = [t.clone() for t in tensors]
    expected = ref_norm(originals, p)
    parts = parts_of([FakeCudaArray.over(t) for t in tensors], 2)
    local = [_seam.reduce(part, order=p, argname="arrays") for part in parts]
    partials = [n.partials for n in local]
    assert all(isinstance(q, np.ndarray) and q.shape == (1, 2) for q in partials)  # views of "device" memory
    stack = torch.from_numpy(np.ascontiguousarray(np.stack(partials)).reshape(-1))
    combined = FakeCudaArray.over(stack)  # the stack, as device memory
    results = [n.finish(kind="global", limits=[1.0], eps=EPS, combined=combined, report=True) for n in local]
    assert results[0].total == results[1].total
    assert_norm_close(results[0].total, expected, p, rtol=2 * norm_rtol(p))  # a report is float64
    for got, original in zip(tensors, originals):
        assert_scaled(got, original, 1.0, expected, rtol=2 * norm_rtol(p))
    kernels = [name for name, *_ in sim_backend.launch_log()]
    assert kernels.count("finalize_kernel") == 4 and "scale_kernel" in kernels
