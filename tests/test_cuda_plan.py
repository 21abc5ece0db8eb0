"""The CUDA kernels' plan, checked on the host (no GPU needed).

csrc/cuda/plan.h holds the index arithmetic the kernels run: the flat space,
launch tables, blocks cut into segments, each thread's head/vector/tail
elements and the partial slots. gradclip._cuda_sim walks it
(csrc/cuda_sim/plan_coverage.cpp) counting visits instead of reading memory,
so these tests cover more sizes, misalignments and list lengths than running
the kernels on the host (test_cuda_sim.py) could afford: every element once,
every partial slot written once and read back by the finalize.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_cuda_sim

_cuda_sim = require_cuda_sim()

CHUNK = _cuda_sim.chunk
LAUNCH_TENSORS = _cuda_sim.max_tensors_per_launch
EDGE_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def coverage(numels, elem_bytes, misalign, plant=""):
    return _cuda_sim.plan_coverage(list(numels), list(elem_bytes), list(misalign), plant)


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
