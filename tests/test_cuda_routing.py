"""CUDA routing checked without a GPU: a hand-made DLPack producer that claims
its memory is on cuda:0 (its pointer is never dereferenced on the host). The
intake must accept it, refuse to mix it with host memory (naming both items),
and reach the CUDA bridge, which fails with a clear error on this machine
before anything is launched or written."""

from __future__ import annotations

import numpy as np
import pytest

import gradclip
from gradclip import _core

from fake_cuda import FakeCudaArray

def test_cuda_memory_is_not_mixed_with_host_memory():
    host = np.ones(4, dtype=np.float32)
    before = host.copy()
    with pytest.raises(ValueError, match=r"arrays\[1\]: is on cuda:0 but arrays\[0\] is on the CPU; one call"):
        gradclip.clip_by_global_norm_([host, FakeCudaArray(8)], 0.1)
    np.testing.assert_array_equal(host, before)


def test_other_producers_export_without_a_stream():
    # Not torch or CuPy: gradclip launches on the legacy default stream, which the
    # producer orders its work before when given no stream (the DLPack rule).
    # (torch and CuPy get stream=-1: they run on their own current stream.)
    a = FakeCudaArray(8)
    with pytest.raises(ValueError, match="arrays\\[1\\]"):
        gradclip.global_norm([a, np.ones(2, dtype=np.float32)])
    assert a.export_stream is None


def test_two_cuda_devices_are_not_mixed():
    with pytest.raises(ValueError, match=r"arrays\[2\]: is on cuda:1 but arrays\[0\] is on cuda:0"):
        gradclip.global_norm([FakeCudaArray(8), FakeCudaArray(8, address=0x7F0000001000), FakeCudaArray(8, 1)])


@pytest.mark.skipif(gradclip.build_info()["cuda_compiled"] is False, reason="built without the CUDA module")
def test_cuda_input_reaches_the_bridge_and_fails_cleanly_without_a_gpu():
    pytest.importorskip("torch")
    if gradclip.build_info()["cuda_available"]:
        pytest.skip("a GPU is present; tests/test_cuda.py covers the real path")
    # Neither torch nor CuPy owns this array, so the bridge needs CuPy for device memory:
    # absent here, it must say so. With CuPy but no GPU the launch fails instead.
    with pytest.raises((ValueError, RuntimeError), match=r"torch or CuPy|gradclip CUDA"):
        _core.clip([FakeCudaArray(1000)], kind="none", order=2.0, argname="arrays")


@pytest.mark.parametrize(
    "entry_spans",
    [[0, 1, 0, 2, 1], [0, 0], [0, 1, 2, 3, 0, 1, 2, 3], [2, 1, 0, 1]],
    ids=["interleaved", "one-twice", "two-runs", "descending"],
)
def test_per_tensor_norms_of_repeated_entries_follow_the_list(entry_spans):
    # The device-result plumbing, on a host torch buffer standing in for device
    # memory: entry i gets its span's norm, gathered without an index array
    # (an index would be a host-to-device copy, which syncs and breaks graphs).
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from gradclip import _device

    spans = max(entry_spans) + 1
    values = torch.arange(1, spans + 1, dtype=torch.float32) * 0.5
    pad = torch.full((3,), -1.0)
    buf = torch.cat([pad, values, pad]).view(torch.uint8)
    result = SimpleNamespace(buffer=buf, f64=False, tensor_offset=12, span_count=spans, entry_spans=entry_spans)
    got = _device.per_tensor(result)
    assert got.tolist() == [values[s].item() for s in entry_spans]


@pytest.mark.parametrize("fn", ["clip_grad_value_", "clip_grad_norm_", "clip_grads_with_norm_"])
def test_drop_ins_across_devices_name_the_callers_index_and_write_nothing(fn):
    # A list over two devices goes through the per-device fallback; an error in
    # a later group must still name the index in the caller's list, and come
    # before any gradient is written.
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    cpu_grad = torch.full((64,), 5.0)
    params = [SimpleNamespace(grad=cpu_grad), SimpleNamespace(grad=FakeCudaArray(8)), SimpleNamespace(grad=None),
              SimpleNamespace(grad=torch.ones(4, dtype=torch.int32))]
    call = {
        "clip_grad_value_": lambda: gradclip.clip_grad_value_(params, 0.5),
        "clip_grad_norm_": lambda: gradclip.clip_grad_norm_(params, 0.5),
        "clip_grads_with_norm_": lambda: gradclip.clip_grads_with_norm_(params, 0.5, 100.0),
    }[fn]
    with pytest.raises(TypeError, match=r"parameters\[3\]\.grad: int32 data cannot"):
        call()
    assert bool((cpu_grad == 5.0).all())
