"""The CUDA kernels' plan, checked on the host (no GPU needed).

csrc/cuda/plan.h holds the index arithmetic the kernels run: the flat space,
launch tables, blocks cut into segments, each thread's head/vector/tail
elements, the partial slots, and the overflow-safe partials and their fold.
gradclip._core compiles the same header into a host emulation
(csrc/cuda/plan_emulator.cpp); these tests check it covers every element once
and computes the norms the float64 reference gives.

Tolerance of the emulated norms: a thread sums at most 34 elements of a
segment (8192 / 256 from its vectors, plus one head and one tail element), the
256 thread sums are added in order, then a tensor's segments, then the
tensors: fewer than 2200 float64 additions of non-negative terms per result,
the bound behind ``norm_rtol`` (conftest.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradclip import _core

from conftest import INF, NAN, NORM_IDS, NORM_ORDERS, TORCH_DTYPE_IDS, TORCH_DTYPES, make_torch, norm_rtol, ref_norm

CHUNK = 8192  # plan.h kChunk
LAUNCH_TENSORS = 2000  # plan.h kMaxTensorsPerLaunch
EDGE_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def coverage(numels, elem_bytes, misalign, plant=""):
    return _core._cuda_plan_coverage(list(numels), list(elem_bytes), list(misalign), plant)


@pytest.mark.parametrize("elem_bytes", [2, 4, 8])
def test_every_element_once_at_edges(elem_bytes):
    for misalign in range(0, 16, elem_bytes):
        numels = EDGE_SIZES + EDGE_SIZES[::-1]
        assert coverage(numels, [elem_bytes] * len(numels), [misalign] * len(numels)) == []


def test_more_tensors_than_one_launch_holds():
    rng = np.random.default_rng(7)
    n = 2 * LAUNCH_TENSORS + 321
    numels = rng.choice([0, 1, 5, 100, CHUNK - 3, CHUNK + 3], size=n).tolist()
    elem_bytes = rng.choice([2, 4, 8], size=n).tolist()
    misalign = [int(rng.integers(0, 16 // e)) * e for e in elem_bytes]
    assert coverage(numels, elem_bytes, misalign) == []


def test_all_empty_and_no_tensors():
    assert coverage([0, 0, 0], [4, 4, 4], [0, 0, 0]) == []
    assert coverage([], [], []) == []


@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(0, 40), st.integers(CHUNK - 20, CHUNK + 20), st.integers(0, 5 * CHUNK)),
            st.sampled_from([2, 4, 8]),
            st.integers(0, 7),
        ),
        max_size=30,
    )
)
def test_every_element_once_random_lists(tensors):
    numels = [t[0] for t in tensors]
    elem_bytes = [t[1] for t in tensors]
    misalign = [(t[2] * t[1]) % 16 for t in tensors]
    assert coverage(numels, elem_bytes, misalign) == []


@pytest.mark.parametrize("plant", ["skip_tail", "double_head", "slot_shift"])
def test_planted_walk_errors_are_caught(plant):
    # Sizes with a head (misaligned), vectors and a tail in several tensors.
    errors = coverage([9, CHUNK + 3, 20000, 5], [4, 2, 8, 4], [4, 2, 8, 0], plant)
    assert errors, f"the coverage check missed the planted bug {plant!r}"


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_emulated_norms_match_reference(dtype, p):
    tensors = [make_torch(n, dtype, seed=i) for i, n in enumerate(EDGE_SIZES)]
    tensors.append(make_torch(CHUNK + 9, dtype, seed=99)[1:])  # misaligned start
    r = _core._cuda_plan_norms(tensors, p)
    for i, t in enumerate(tensors):
        expected = ref_norm([t], p)
        assert math.isclose(r["norms"][i], expected, rel_tol=norm_rtol(p), abs_tol=0.0) or r["norms"][i] == expected, (
            i, r["norms"][i], expected)
    total = ref_norm(tensors, p)
    assert math.isclose(r["total"], total, rel_tol=norm_rtol(p)) or r["total"] == total


def test_emulated_rescue_float64_overflow_and_underflow():
    big = torch.full((3 * CHUNK + 1,), 1e200, dtype=torch.float64)
    tiny = torch.full((CHUNK + 7,), 3e-200, dtype=torch.float64)
    r = _core._cuda_plan_norms([big, tiny], 2.0)
    assert r["rescued_segments"] > 0
    assert math.isclose(r["norms"][0], 1e200 * math.sqrt(big.numel()), rel_tol=1e-12)
    assert math.isclose(r["norms"][1], 3e-200 * math.sqrt(tiny.numel()), rel_tol=1e-12)
    assert math.isclose(r["total"], r["norms"][0], rel_tol=1e-12)


@pytest.mark.parametrize("p", [2.0, 3.5], ids=["L2", "L3.5"])
def test_emulated_partials_that_overflow_only_when_added(p):
    # Each block's power sum is finite (just under float64's max for L2); their
    # sum is not, but the norm is. Found in review: the plain partials were added
    # unchecked and gave inf, where the CPU gives the finite norm.
    x = 1.3e154 if p == 2.0 else 1e88
    separate = [torch.tensor([x], dtype=torch.float64) for _ in range(3)]
    one = torch.zeros(2 * CHUNK + 1, dtype=torch.float64)
    one[0] = one[CHUNK] = one[2 * CHUNK] = x  # three blocks of one tensor
    expected = x * 3.0 ** (1.0 / p)
    for tensors in (separate, [one]):
        r = _core._cuda_plan_norms(tensors, p)
        assert math.isclose(r["total"], expected, rel_tol=1e-12), (len(tensors), r["total"])
        cpu = _core.norms(tensors, p, "t", False, False)["total"]
        assert math.isclose(r["total"], cpu, rel_tol=1e-12), (r["total"], cpu)
    assert math.isclose(_core._cuda_plan_norms([one], p)["norms"][0], expected, rel_tol=1e-12)


def test_emulated_rescue_generic_p_float32():
    # |x|^10 of 1e38 overflows float64; the true norm is finite.
    x = torch.full((1000,), 1e38, dtype=torch.float32)
    r = _core._cuda_plan_norms([x], 10.0)
    expected = float(x[0]) * 1000 ** 0.1
    assert math.isclose(r["total"], expected, rel_tol=1e-12)


def test_emulated_float32_never_overflows():
    x = torch.full((CHUNK * 2,), 1e25, dtype=torch.float32)
    r = _core._cuda_plan_norms([x], 2.0)
    assert r["rescued_segments"] == 0  # float64 squares of float32 cannot overflow
    assert math.isclose(r["total"], float(x[0]) * math.sqrt(x.numel()), rel_tol=1e-12)


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_emulated_nonfinite(p):
    a = make_torch(CHUNK + 5, torch.float32, seed=1)
    b = a.clone()
    b[CHUNK + 2] = INF
    c = a.clone()
    c[3] = NAN
    r = _core._cuda_plan_norms([a, b, c], p)
    assert math.isfinite(r["norms"][0])
    assert r["norms"][1] == INF
    assert math.isnan(r["norms"][2]) and math.isnan(r["total"])
