"""Bitwise reproducibility: every ISA the CPU supports, every thread count, and
concurrent callers give identical norms and identical written bits."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import gradclip
from gradclip import _core
from conftest import (
    CHUNK_ELEMS,
    COMPILED_ISAS,
    INF,
    NAN,
    NORM_ORDERS,
    PARALLEL_MIN_ELEMS,
    SUPPORTED_ISAS,
    UNSUPPORTED_ISAS,
    assert_norm_close,
    assert_scaled,
    bits,
    clone_all,
    make_numpy,
    make_torch,
    ref_norm,
    run_python,
)


@contextlib.contextmanager
def active_isa(name: str):
    before = _core.active_isa()
    _core.set_active_isa(name)
    try:
        yield
    finally:
        _core.set_active_isa(before)


@contextlib.contextmanager
def num_threads(n: int):
    before = gradclip.get_num_threads()
    gradclip.set_num_threads(n)
    try:
        yield
    finally:
        gradclip.set_num_threads(before)


def mixed_list(sizes, seed: int, specials: bool = False):
    """Tensors of every dtype, cycling, with sizes that hit SIMD tails and chunk edges."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    out = []
    for i, n in enumerate(sizes):
        t = make_torch(n, dtypes[i % 4], seed + i, scale=2.0)
        if specials and n > 40:
            t[n // 3] = -0.0
            t[n // 2] = 1e-3
        out.append(t)
    return out


def battery(make_inputs):
    """Every operation on fresh copies of the inputs; returns everything
    observable (norms as float64 bits, written tensors as raw bits)."""
    results = {}
    for p in NORM_ORDERS:
        xs = make_inputs()
        results[f"global_norm/{p}"] = float(gradclip.global_norm(xs, p))
        results[f"tensor_norms/{p}"] = gradclip.tensor_norms(xs, p).numpy().tobytes()
        total = float(gradclip.tensor_norms(xs, p).max())
        xs = make_inputs()
        results[f"clip_by_global_norm_/{p}"] = float(gradclip.clip_by_global_norm_(xs, total / 5, p))
        results[f"clip_by_global_norm_/{p}/bits"] = b"".join(bits(x).tobytes() for x in xs)
        xs = make_inputs()
        results[f"clip_by_norm_/{p}"] = gradclip.clip_by_norm_(xs, total / 3, p).numpy().tobytes()
        results[f"clip_by_norm_/{p}/bits"] = b"".join(bits(x).tobytes() for x in xs)
        xs = make_inputs()
        results[f"normalize_/{p}"] = float(gradclip.normalize_(xs, 0.7, p))
        results[f"normalize_/{p}/bits"] = b"".join(bits(x).tobytes() for x in xs)
    xs = make_inputs()
    results["clip_by_value_"] = gradclip.clip_by_value_(xs, 0.9)
    results["clip_by_value_/bits"] = b"".join(bits(x).tobytes() for x in xs)
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in make_inputs()]
    for prm, g in zip(params, make_inputs()):
        prm.grad = g
    results["clip_grad_norm_"] = float(gradclip.clip_grad_norm_(params, 0.5))
    results["clip_grad_norm_/bits"] = b"".join(bits(prm.grad).tobytes() for prm in params)
    return results


def assert_same_results(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    differing = [k for k in a if not (a[k] == b[k] or (isinstance(a[k], float) and np.isnan(a[k]) and np.isnan(b[k])))]
    assert not differing, f"{what}: results differ bitwise for {differing}"


# --------------------------------------------------------------------------
# ISAs
# --------------------------------------------------------------------------

ISA_SIZES = [0, 1, 15, 16, 17, 31, 33, 100, 32767, 32768, 32769, 65537]


def test_isa_lists_are_consistent():
    info = gradclip.build_info()
    assert info["compiled_isas"] == COMPILED_ISAS and info["supported_isas"] == SUPPORTED_ISAS
    assert "scalar" in SUPPORTED_ISAS and set(SUPPORTED_ISAS) <= set(COMPILED_ISAS)
    assert info["isa"] == _core.active_isa() and info["isa"] in SUPPORTED_ISAS


def test_isa_fixture_sets_the_isa(isa):
    assert _core.active_isa() == isa
    assert gradclip.build_info()["isa"] == isa


def test_every_isa_gives_the_scalar_results_bitwise(isa):
    make = lambda: mixed_list(ISA_SIZES, seed=1000, specials=True)  # noqa: E731
    got = battery(make)
    with active_isa("scalar"):
        expected = battery(make)
    assert_same_results(got, expected, f"{isa} vs scalar")


@pytest.mark.parametrize("p", NORM_ORDERS)
def test_every_isa_with_nan_and_inf_in_simd_blocks_and_tails(isa, p):
    def make():
        xs = mixed_list([16, 17, 33, 32769], seed=1100)
        xs[0][3] = NAN      # inside a full 16-lane block
        xs[1][16] = -INF    # in the tail
        xs[3][32768] = INF  # first element of the second chunk
        return xs

    got = (float(gradclip.global_norm(make(), p)), gradclip.tensor_norms(make(), p).numpy().tobytes())
    xs = make()
    gradclip.clip_by_value_(xs, 0.25)
    got_bits = [bits(x).tobytes() for x in xs]
    with active_isa("scalar"):
        expected = (float(gradclip.global_norm(make(), p)), gradclip.tensor_norms(make(), p).numpy().tobytes())
        xs = make()
        gradclip.clip_by_value_(xs, 0.25)
        expected_bits = [bits(x).tobytes() for x in xs]
    assert np.isnan(got[0]) and np.isnan(expected[0])
    assert got[1] == expected[1]
    assert got_bits == expected_bits


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("size", [15, 16, 17, 31, 47, 33000])
def test_every_isa_scaling_and_clamping_of_numpy_arrays(isa, dtype, size):
    def make():
        return [make_numpy(size, dtype, 1200 + size, scale=4.0)]

    def run():
        xs = make()
        n = gradclip.clip_by_global_norm_(xs, 1.0)
        ys = make()
        changed = gradclip.clip_by_value_(ys, 1.5)
        return n, bits(xs[0]).tobytes(), changed, bits(ys[0]).tobytes()

    got = run()
    with active_isa("scalar"):
        expected = run()
    assert got == expected


# Coefficients that put x * coef in every float32 region: normal products (rounded to
# bfloat16 up, down, and to even), exact halvings, and products below FLT_MIN, where the
# AVX512_BF16 conversion instruction would flush to zero and the rounding must not.
BF16_COEFFICIENTS = [0.7, 0.5, 1 / 3, 2.0 ** -10, 1e-30, 2.0 ** -120, 1e-38]


@pytest.mark.parametrize("coef", BF16_COEFFICIENTS)
def test_every_isa_rounds_every_bf16_product_as_the_scalar_kernels(isa, coef):
    # Every bfloat16 pattern (NaNs, infinities, subnormals, zeros of both signs), at
    # offsets that put the rescale's vector blocks and tails on every pattern.
    patterns = np.arange(1 << 16, dtype=np.uint16)

    def rescaled(offset: int) -> np.ndarray:
        g = torch.from_numpy(np.concatenate([patterns[offset:], patterns[:offset]]).view(np.int16)).view(
            torch.bfloat16).clone()
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        gradclip.clip_grads_with_norm_([p], max_norm=coef, total_norm=torch.tensor(1.0, dtype=torch.float64))
        return p.grad.view(torch.int16).numpy().view(np.uint16)

    for offset in (0, 7):
        got = rescaled(offset)
        with active_isa("scalar"):
            expected = rescaled(offset)
        differ = np.flatnonzero(got != expected)
        assert differ.size == 0, (f"{isa}, coef {coef}: {differ.size} patterns differ from the scalar kernels, "
                                  f"first {got[differ[:4]]} vs {expected[differ[:4]]}")
    if coef <= 1e-30:
        subnormal = (expected & 0x7f80 == 0) & (expected & 0x7f != 0)
        assert subnormal.any()  # the test reaches the products a flushing conversion gets wrong


@pytest.mark.parametrize("name", UNSUPPORTED_ISAS or ["(none)"])
def test_unsupported_isa_is_refused(name):
    before = _core.active_isa()
    if name == "(none)":
        assert set(SUPPORTED_ISAS) == set(COMPILED_ISAS)  # every compiled ISA runs here
        return
    with pytest.raises(ValueError, match=f"this CPU cannot run '{name}'"):
        _core.set_active_isa(name)
    assert _core.active_isa() == before


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="not compiled into this build"):
        _core.set_active_isa("sse9")


def test_gradclip_isa_environment_caps_the_isa():
    for name in COMPILED_ISAS:
        out = run_python("import gradclip; print(gradclip.build_info()['isa'])", {"GRADCLIP_ISA": name})
        expected = name if name in SUPPORTED_ISAS else SUPPORTED_ISAS[-1]
        assert out.strip() == expected, f"GRADCLIP_ISA={name}"


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------

# > 2^18 elements in total (the threshold for using the pool), spread over
# tensors of every dtype with odd sizes so that chunks and tasks do not align.
BIG_SIZES = [200_003, 65_537, 33, 70_001, 40_000, 1, 32_768, 12_345]
assert sum(BIG_SIZES) > PARALLEL_MIN_ELEMS + 4 * CHUNK_ELEMS


def big_inputs():
    return mixed_list(BIG_SIZES, seed=1300, specials=True)


@pytest.fixture(scope="module")
def big_reference():
    with num_threads(1), active_isa("scalar"):
        return battery(big_inputs)


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 7])
def test_thread_count_does_not_change_any_bit(threads, big_reference, isa, restore_threads):
    gradclip.set_num_threads(threads)
    assert gradclip.get_num_threads() == threads
    assert_same_results(battery(big_inputs), big_reference, f"{threads} threads, {isa}")


def test_results_repeat_bitwise_across_runs(restore_threads):
    gradclip.set_num_threads(2)
    first = battery(big_inputs)
    assert_same_results(battery(big_inputs), first, "second run")


def test_concurrent_callers_get_identical_results(big_reference, restore_threads):
    gradclip.set_num_threads(2)
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = battery(big_inputs)
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for r in results:
        assert_same_results(r, big_reference, "concurrent caller")


def test_set_num_threads_zero_means_default(restore_threads):
    default = gradclip.build_info()["num_threads"]
    gradclip.set_num_threads(5)
    assert gradclip.get_num_threads() == 5
    gradclip.set_num_threads(0)
    assert gradclip.get_num_threads() >= 1
    out = run_python("import gradclip; print(gradclip.get_num_threads())", {"GRADCLIP_NUM_THREADS": "3"})
    assert out.strip() == "3"
    assert default >= 1


def test_large_lists_really_use_worker_threads():
    # In a fresh process (no pool yet): a list just below 2^18 elements runs on
    # the caller's thread; one above it starts the pool's worker threads.
    out = run_python(
        f"""
        import os, numpy as np, gradclip
        def count():
            return len(os.listdir('/proc/self/task'))
        gradclip.set_num_threads(4)
        base = count()
        small = [np.ones({PARALLEL_MIN_ELEMS} - 1, np.float32)]
        gradclip.global_norm(small); gradclip.clip_by_value_(small, 0.5); gradclip.clip_by_global_norm_(small, 1.0)
        after_small = count()
        big = [np.ones({PARALLEL_MIN_ELEMS + 4 * CHUNK_ELEMS}, np.float32)]
        gradclip.global_norm(big)
        print(base, after_small, count())
        """
    )
    base, after_small, after_big = map(int, out.split())
    assert after_small == base, "a list below 2^18 elements started threads"
    assert base < after_big <= base + 3, f"threads {base} -> {after_big}"


def test_big_list_results_are_correct_not_only_reproducible(restore_threads):
    gradclip.set_num_threads(4)
    xs = big_inputs()
    before = clone_all(xs)
    for p in NORM_ORDERS:
        assert_norm_close(gradclip.global_norm(xs, p), ref_norm(before, p), p, torch.float64)
    ref = ref_norm(before, 2.0)
    norm = gradclip.clip_by_global_norm_(xs, ref / 7)
    for x, b in zip(xs, before):
        assert_scaled(x, b, ref / 7, float(norm), 0.0)


_STRESS = """
import sys, time, numpy as np, gradclip
a = [np.random.default_rng(0).standard_normal((1 << 18) + 12_345).astype(np.float32)]  # 5 tasks
gradclip.set_num_threads(1)
expected = gradclip.global_norm(a)
gradclip.set_num_threads(8)  # more threads than cores: workers are preempted anywhere
t0 = time.time(); i = 0
while time.time() - t0 < {seconds}:
    got = gradclip.global_norm(a)  # one pool run per call, back to back
    if got != expected:
        print("MISMATCH at iteration", i, got, expected); sys.exit(3)
    i += 1
print(i)
"""


def test_pool_survives_many_back_to_back_runs_with_oversubscribed_threads():
    # About 10^5 consecutive pool runs per process (each call > 2^18
    # elements) with 8 threads, in 3 processes at once on a small machine.
    # Every call must return, with the single-thread bits. A correct pool
    # always passes (the limit is 3x the work time). The pool of ca6fbf5
    # miscounted its workers when a late one counted itself into a run that
    # had closed while the next run reset the counter; on the 2-core VM one
    # process in 3-4 hung within 20 s, and this test caught that hang in about
    # half of its runs (fixed in 4cc8bb7).
    seconds = 15
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _STRESS.format(seconds=seconds)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    outcomes = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=3 * seconds)
            outcomes.append((proc.returncode, out.strip(), err.strip()[-500:]))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            outcomes.append(("hung", "", ""))
    assert all(rc == 0 for rc, _, _ in outcomes), (
        f"thread pool stress: {outcomes} (\"hung\": a call never returned: the caller waits "
        "forever for workers that already left)"
    )


def test_a_thread_cap_holds_for_the_calling_thread_alone(restore_threads):
    gradclip.set_num_threads(2)
    seen = {}

    def other():
        seen["other"] = _core.num_threads()

    previous = _core.limit_calling_thread(1)
    try:
        assert previous == 0 and _core.num_threads() == 1
        t = threading.Thread(target=other)
        t.start()
        t.join()
        xs = mixed_list([PARALLEL_MIN_ELEMS * 2 + 17], seed=77)
        capped = float(gradclip.global_norm(xs))
    finally:
        assert _core.limit_calling_thread(previous) == 1
    assert seen["other"] == 2 and _core.num_threads() == 2
    assert float(gradclip.global_norm(xs)) == capped  # the thread count changes no bit
