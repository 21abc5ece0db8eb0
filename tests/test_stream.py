"""The pipelined intake: while a long list of small tensors is being read (with
the GIL), the pool's workers already reduce the tensors read so far.

Whatever the scheduling, every norm must carry exactly the bits of the
reduction contract (csrc/cpu/isa_kernels.h): per chunk of 2^15 elements, 16
float64 lanes (element k into lane k % 16, in order), a fixed fold tree, chunk
partials added in order, span power sums added in list order of first
appearance. ``contract_power_sum`` below is that contract written in NumPy, so
these tests pin the bits independently of the implementation."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import gradclip
from conftest import CHUNK_ELEMS, as_f64, bits, clone_all, make_numpy, make_param, make_torch, run_python

THREADS = [1, 2, 3, 4, 7]


def contract_power_sum(x, p: float) -> float:
    """sum |x|^p (p = 1 or 2) of one tensor, exactly as every ISA computes it."""
    x64 = as_f64(x).ravel()
    total = 0.0
    for b in range(0, x64.size, CHUNK_ELEMS):
        c = x64[b : b + CHUNK_ELEMS]
        t = c * c if p == 2 else np.abs(c)  # exact for 16/32-bit data
        lanes = np.zeros(16)
        for j in range(16):
            seq = t[j::16]
            if seq.size:
                lanes[j] = np.cumsum(seq)[-1]  # cumsum adds left to right, as one lane does
        for step in (8, 4, 2, 1):
            lanes[:step] = lanes[:step] + lanes[step : 2 * step]
        total = total + float(lanes[0])
    return total


def contract_total(tensors, p: float) -> float:
    """The total over unique memory (first appearance, list order)."""
    seen, power = set(), 0.0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype) if isinstance(t, torch.Tensor) else (
            t.__array_interface__["data"][0], t.size, t.dtype)
        if key in seen:
            continue
        seen.add(key)
        power = power + contract_power_sum(t, p)
    return math.sqrt(power) if p == 2 else power


def root(power: float, p: float) -> float:
    return math.sqrt(power) if p == 2 else power


def small_sizes(n: int, seed: int):
    """Sizes from 1 to 2^16 (the largest the stream takes), mostly small, some
    crossing the 2^15 chunk edge, so that batches and chunks never align."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3000, n)
    sizes[::97] = rng.integers(CHUNK_ELEMS - 20, 2 * CHUNK_ELEMS + 1, sizes[::97].size)
    return [int(s) for s in sizes]


def torch_list(n: int, seed: int):
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    return [make_torch(s, dtypes[i % 4], seed + i) for i, s in enumerate(small_sizes(n, seed))]


@pytest.fixture(scope="module")
def long_list():
    return torch_list(1500, seed=7000)


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("threads", THREADS)
def test_long_list_of_small_tensors_has_the_contract_bits(long_list, p, threads, isa, restore_threads):
    gradclip.set_num_threads(threads)
    xs = long_list
    assert float(gradclip.global_norm(xs, p)) == np.float32(contract_total(xs, p))  # torch input: a float32 0-d result
    arrays = [x.float().numpy() for x in xs]
    assert gradclip.global_norm(arrays, p) == contract_total(arrays, p)  # NumPy input: the float64 itself
    per = gradclip.tensor_norms(arrays, p)
    expected = np.array([root(contract_power_sum(a, p), p) for a in arrays])
    assert per.tobytes() == expected.tobytes()


@pytest.mark.parametrize("threads", THREADS)
def test_clip_grad_norm_on_many_parameters_has_the_contract_bits(threads, restore_threads):
    gradclip.set_num_threads(threads)
    grads = [make_torch(s, torch.float32, 7100 + i) for i, s in enumerate(small_sizes(1200, 7100))]
    params = [make_param(g) for g in grads]
    before = clone_all(grads)
    total = contract_total(before, 2.0)
    got = gradclip.clip_grad_norm_(params, total / 3)
    assert got.dtype == torch.float32 and float(got) == np.float32(total)
    coef = np.float32(min(total / 3 / (total + 1e-6), 1.0))
    for g, b in zip(grads, before):
        assert bits(g).tobytes() == bits(torch.from_numpy(b.numpy() * coef)).tobytes()


def test_duplicates_and_aliases_are_counted_once_whatever_the_threads(restore_threads):
    base = [make_numpy(s, np.float32, 7200 + i) for i, s in enumerate(small_sizes(900, 7200))]
    # Repeats of earlier arrays, and other array objects over the same memory,
    # spread through the list so that some land in batches already reduced.
    items = []
    for i, a in enumerate(base):
        items.append(a)
        if i % 5 == 0:
            items.append(base[i // 2])
        if i % 7 == 0:
            items.append(base[i // 3][:])  # a new array object, same memory
    expected = contract_total(base, 2.0)
    for threads in THREADS:
        gradclip.set_num_threads(threads)
        assert gradclip.global_norm(items, 2.0) == expected
        per = gradclip.tensor_norms(items, 2.0)  # one value per entry, repeats included
        assert per.tobytes() == np.array([math.sqrt(contract_power_sum(a, 2.0)) for a in items]).tobytes()
    ys = clone_all(base)
    items = [y for y in ys] + [ys[3], ys[400], ys[899][:]]
    gradclip.set_num_threads(2)
    norm = gradclip.clip_by_global_norm_(items, expected / 4)
    assert norm == expected
    coef = np.float32(min(expected / 4 / (expected + 1e-6), 1.0))
    for y, a in zip(ys, base):  # every array scaled exactly once
        assert y.tobytes() == (a * coef).tobytes()


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_partial_overlap_late_in_a_long_list_writes_nothing(threads, restore_threads):
    gradclip.set_num_threads(threads)
    buf = make_numpy(700 * 512, np.float32, 7300)
    items = [buf[i * 512 : (i + 1) * 512] for i in range(700)]
    items.append(buf[650 * 512 + 100 : 650 * 512 + 300])  # inside items[650]
    before = buf.copy()
    with pytest.raises(ValueError, match=r"arrays\[700\]: overlaps the memory of arrays\[650\]"):
        gradclip.clip_by_global_norm_(items, 1e-3)
    assert buf.tobytes() == before.tobytes()


class GradProperty(torch.Tensor):
    """A tensor subclass whose .grad is a Python property: the value is what it returns."""

    @property
    def grad(self):  # type: ignore[override]
        return self._stored

    @grad.setter
    def grad(self, value):
        self.__dict__["_stored"] = value


class LoggingTensor(torch.Tensor):
    """Overrides __torch_function__, which torch's own .grad getter goes through."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is torch.Tensor.grad:  # the .grad getter
            LoggingTensor.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclass_with_a_grad_property(restore_threads):
    gradclip.set_num_threads(2)
    grads = [make_torch(900, torch.float32, 7600 + i) for i in range(400)]
    params = []
    for g in grads:
        t = torch.zeros(900).as_subclass(GradProperty)
        t.grad = g
        params.append(t)
    params[17].grad = None  # skipped, as torch skips it
    expected = contract_total([g for i, g in enumerate(grads) if i != 17], 2.0)
    assert float(gradclip.clip_grad_norm_(params, 1e9)) == np.float32(expected)
    torch_total = torch.nn.utils.clip_grad_norm_(params, 1e9)
    assert math.isclose(float(torch_total), expected, rel_tol=1e-5)


def test_torch_function_subclass_grad_is_read_as_torch_reads_it(restore_threads):
    gradclip.set_num_threads(2)
    grads = [make_torch(700, torch.float32, 7700 + i) for i in range(500)]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(700)).as_subclass(LoggingTensor)
        p.grad = g
        params.append(p)
    LoggingTensor.seen.clear()
    total = gradclip.clip_grad_norm_(params, 1e9)
    assert len(LoggingTensor.seen) >= len(params), "gradclip read .grad without torch's __torch_function__ hook"
    assert float(total) == np.float32(contract_total(grads, 2.0))
    LoggingTensor.seen.clear()
    torch.nn.utils.clip_grad_norm_(params, 1e9)
    assert len(LoggingTensor.seen) >= len(params)


class ReentrantGrad(torch.Tensor):
    """Its .grad property calls gradclip itself while the outer call is reading the list."""

    @property
    def grad(self):  # type: ignore[override]
        inner = self.__dict__["_inner"]
        self.__dict__["_inner_norm"] = gradclip.global_norm(inner)
        return self.__dict__["_stored"]


def test_reentrant_call_from_a_grad_property_does_not_deadlock(restore_threads):
    gradclip.set_num_threads(2)
    inner = [make_numpy(3000, np.float32, 7800 + i) for i in range(300)]  # starts workers of its own
    grads = [make_torch(1500, torch.float32, 7900 + i) for i in range(600)]
    params = []
    for i, g in enumerate(grads):
        t = torch.zeros(1500).as_subclass(ReentrantGrad)
        t.__dict__["_stored"] = g
        t.__dict__["_inner"] = inner if i % 50 == 0 else inner[:1]
        params.append(t)
    done = []
    worker = threading.Thread(target=lambda: done.append(gradclip.clip_grad_norm_(params, 1e9)))
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "reentrant call hung"
    assert float(done[0]) == np.float32(contract_total(grads, 2.0))
    assert params[0].__dict__["_inner_norm"] == contract_total(inner, 2.0)


def test_concurrent_callers_with_long_lists(restore_threads):
    gradclip.set_num_threads(3)
    lists = [[make_numpy(s, np.float32, 8000 + 1000 * k + i) for i, s in enumerate(small_sizes(700, 8000 + k))]
             for k in range(4)]
    expected = [contract_total(xs, 2.0) for xs in lists]
    results = [[] for _ in lists]

    def work(k):
        for _ in range(5):
            results[k].append(gradclip.global_norm(lists[k], 2.0))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for k in range(4):
        assert results[k] == [expected[k]] * 5


def test_long_list_of_small_tensors_starts_the_workers_while_it_is_read():
    # In a fresh process: 1000 tensors of 200 elements (200k elements, below the
    # 2^18 that a one-shot pass needs to use the pool) do start the workers,
    # because the list is long; a short list of the same size in total does not.
    out = run_python(
        """
        import os, numpy as np, gradclip
        def count():
            return len(os.listdir('/proc/self/task'))
        gradclip.set_num_threads(4)
        base = count()
        gradclip.global_norm([np.ones(20_000, np.float32) for _ in range(4)])
        after_short = count()
        gradclip.global_norm([np.ones(200, np.float32) for _ in range(1000)])
        print(base, after_short, count())
        """
    )
    base, after_short, after_long = map(int, out.split())
    assert after_short == base, "a short list started threads"
    assert base < after_long <= base + 3, f"threads {base} -> {after_long}"
