"""pytest-benchmark suite for regression tracking; kept out of the test suite
(pyproject's testpaths = ["tests"]), so run it explicitly:

    python -m pytest bench -p no:cacheprovider                      # table
    python -m pytest bench -p no:cacheprovider --benchmark-autosave  # save to .benchmarks/
    python -m pytest bench -p no:cacheprovider --benchmark-compare   # against the last save

Same gradients, restore and contenders as ``python -m gradclip bench``
(imported from gradclip.bench), timed by pytest-benchmark's pedantic mode:
the untimed ``setup`` restores the pristine gradients before every round.
GRADCLIP_BENCH_WORKLOADS (comma list, default tiny-2000,transformer-64m),
GRADCLIP_BENCH_DTYPES (default fp32,bf16) and GRADCLIP_BENCH_ROUNDS
(default 30 for sets under 16M elements, else 10) narrow or widen it.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from gradclip.bench import workloads  # noqa: E402
from gradclip.bench.competitors import MODES, Case, Options, build, check  # noqa: E402
from gradclip.bench.runner import Gradients, _limit  # noqa: E402

WORKLOADS = os.environ.get("GRADCLIP_BENCH_WORKLOADS", "tiny-2000,transformer-64m").split(",")
DTYPES = os.environ.get("GRADCLIP_BENCH_DTYPES", "fp32,bf16").split(",")
CONTENDERS = ("gradclip", "torch_foreach", "torch_loop", "numpy")


def _cases():
    # Ordered so that each (workload, dtype) gradient set is built once.
    for w in WORKLOADS:
        for d in DTYPES:
            for m in MODES:
                for c in CONTENDERS:
                    if c == "numpy" and d != "fp32":
                        continue  # NumPy has no bfloat16; its float16 is not vectorised
                    yield pytest.param(w, d, m, c, id=f"{w}-{d}-{m}-{c}")


_current: dict = {}


def _gradients(workload: str, dtype: str) -> Gradients:
    key = (workload, dtype)
    if _current.get("key") != key:
        _current.clear()  # one set alive at a time: transformer-64m fp32 is 2 x 270 MB
        _current["key"] = key
        _current["grads"] = Gradients(torch, workloads.get(workload), dtype, "cpu", seed=0)
    return _current["grads"]


@pytest.mark.parametrize("workload,dtype,mode,contender", list(_cases()))
def test_clip(benchmark, workload: str, dtype: str, mode: str, contender: str) -> None:
    wl = workloads.get(workload)
    grads = _gradients(workload, dtype)
    case = Case(wl, dtype, "cpu", mode, grads.params, grads.grads, grads.pristine, grads.true_norm,
                _limit(mode, grads.true_norm))
    fn = build(contender, case, torch, Options(compile_max_tensors=0)).fn
    rounds = int(os.environ.get("GRADCLIP_BENCH_ROUNDS", "30" if wl.elements < 16_000_000 else "10"))
    itemsize = 4 if dtype == "fp32" else 2
    benchmark.group = f"{workload} {dtype} {mode}"
    benchmark.extra_info.update(tensors=wl.tensors, elements=wl.elements, gradient_bytes=wl.elements * itemsize)
    returned = benchmark.pedantic(fn, setup=grads.restore, rounds=rounds, warmup_rounds=1, iterations=1)
    # The last round's effect is still in the gradients: it must be this mode's work.
    problem, _ = check(case, torch, returned)
    assert problem is None, problem
