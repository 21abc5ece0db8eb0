"""The public API on "CUDA" arrays, end to end, without a GPU.

Arrays here are host memory presented as cuda:0 memory (fake_cuda.py), and
gradclip._core is pointed at gradclip._cuda_sim's kernel table with NumPy
buffers for its device memory (``_core._use_cuda_backend``). A call then runs
its real CUDA path: the intake's device checks, the bridge's output layout and
workspace, kernels.cu's launch code and kernels (on host fibers), and the
Python side that turns device results into arrays (gradclip._device), here
NumPy arrays standing for device arrays. What only a GPU shows (streams,
graphs, torch's and CuPy's allocators, speed) is tests/test_cuda.py's.

Tolerances are those of tests/test_cuda_sim.py (the same kernels); results
are float32 unless an input is float64, and ``assert_norm_close`` rounds its
bracket to the result dtype.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gradclip
from gradclip import _core
from conftest import (
    EPS,
    INF,
    NAN,
    NORM_IDS,
    NORM_ORDERS,
    TORCH_DTYPE_IDS,
    TORCH_DTYPES,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled,
    expected_scaled,
    make_torch,
    norm_rtol,
    ref_coef,
    kernel_names,
    ref_norm,
    require_cuda_sim,
    result_dtype_of,
)
from fake_cuda import FakeCudaArray, host_allocate

_cuda_sim = require_cuda_sim()

CHUNK = _cuda_sim.chunk
SIZES = [1, 7, 16, 33, CHUNK - 1, CHUNK + 3, 2 * CHUNK + 1, 9 * CHUNK + 3]  # the last: > 8 blocks


@pytest.fixture(autouse=True)
def sim_backend():
    _core._use_cuda_backend(_cuda_sim._api, host_allocate)
    _cuda_sim.launch_log()
    try:
        yield
    finally:
        _core._use_cuda_backend(None, None)


def on_sim(tensors):
    """Host copies of the tensors (1-D) presented as cuda:0 arrays, and the copies."""
    hosts = [t.reshape(-1).clone() for t in tensors]
    return [FakeCudaArray.over(h) for h in hosts], hosts


def kernels_launched():
    return kernel_names(_cuda_sim.launch_log())


# --------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_global_and_tensor_norms(dtype, p):
    tensors = [make_torch(n, dtype, seed=i) for i, n in enumerate(SIZES)]
    arrays, _ = on_sim(tensors)
    rd = result_dtype_of(tensors)
    total = gradclip.global_norm(arrays, ord=p)
    # A "device" 0-d result (a NumPy scalar here), not a float, of the documented dtype.
    assert isinstance(total, np.generic) and total.dtype == torch.empty((), dtype=rd).numpy().dtype
    assert_norm_close(total, ref_norm(tensors, p), p, rd)
    norms = gradclip.tensor_norms(arrays, ord=p)
    assert norms.dtype == total.dtype and norms.shape == (len(tensors),)
    for got, t in zip(norms, tensors):
        assert_norm_close(got, ref_norm([t], p), p, rd)
    assert kernels_launched() == ["norm_kernel", "finalize_kernel"] * 2


def test_an_array_listed_twice_is_counted_once_and_reported_in_list_order():
    tensors = [make_torch(n, torch.float32, seed=20 + i) for i, n in enumerate([100, CHUNK + 1, 5])]
    arrays, hosts = on_sim(tensors)
    listed = [arrays[0], arrays[1], arrays[0], arrays[2], arrays[1]]
    norms = gradclip.tensor_norms(listed)
    expected = [ref_norm([tensors[i]], 2.0) for i in (0, 1, 0, 2, 1)]
    for got, e in zip(norms, expected):
        assert_norm_close(got, e, 2.0, np.float32)
    total = ref_norm(tensors, 2.0)
    assert_norm_close(gradclip.global_norm(listed), total, 2.0, np.float32)
    gradclip.clip_by_global_norm_(listed, 0.5)  # each array scaled once
    for h, t in zip(hosts, tensors):
        assert_scaled(h, t, 0.5, total, norm_rtol(2.0))
    assert kernels_launched() == ["norm_kernel", "finalize_kernel"] * 2 + ["norm_kernel", "finalize_kernel",
                                                                         "scale_kernel"]


def test_empty_list_and_empty_arrays():
    assert float(gradclip.global_norm([])) == 0.0
    assert kernels_launched() == []  # no array, no device
    arrays, _ = on_sim([torch.zeros(0), torch.zeros(0, dtype=torch.float16)])
    assert float(gradclip.global_norm(arrays)) == 0.0
    assert gradclip.tensor_norms(arrays).tolist() == [0.0, 0.0]
    assert kernels_launched() == ["norm_kernel", "finalize_kernel"] * 2


# --------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
def test_clip_by_global_norm(dtype, p):
    tensors = [make_torch(n, dtype, seed=40 + i) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    total = ref_norm(tensors, p)
    got = gradclip.clip_by_global_norm_(arrays, 0.5, ord=p)
    assert_norm_close(got, total, p, result_dtype_of(tensors))
    for h, t in zip(hosts, tensors):
        assert_scaled(h, t, 0.5, total, norm_rtol(p))
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "scale_kernel"]


def test_unclipped_call_changes_no_bit_and_still_makes_three_launches():
    tensors = [make_torch(n, torch.bfloat16, seed=60 + i) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    gradclip.clip_by_global_norm_(arrays, 1e9)
    for h, t in zip(hosts, tensors):
        assert_bitwise_equal(h, t)
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "scale_kernel"]


def test_clip_by_norm_per_array_and_normalize():
    tensors = [make_torch(n, torch.float32, seed=70 + i, scale=s) for i, (n, s) in
               enumerate([(300, 1.0), (CHUNK + 5, 0.001), (64, 3.0)])]
    arrays, hosts = on_sim(tensors)
    gradclip.clip_by_norm_(arrays, 2.0)
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "scale_kernel"]
    for h, t in zip(hosts, tensors):
        norm = ref_norm([t], 2.0)
        if ref_coef(2.0, norm) == 1.0:
            assert_bitwise_equal(h, t)
        else:
            assert_scaled(h, t, 2.0, norm, norm_rtol(2.0))
    arrays, hosts = on_sim(tensors)
    gradclip.normalize_(arrays, 3.0)
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "scale_kernel"]
    total = ref_norm(tensors, 2.0)
    lo, hi = 3.0 / (total * (1 + norm_rtol(2.0))), 3.0 / (total * (1 - norm_rtol(2.0)))
    for h, t in zip(hosts, tensors):
        e1, e2 = expected_scaled(t, lo), expected_scaled(t, hi)
        got = h.double().numpy()
        assert np.all((got >= np.minimum(e1, e2)) & (got <= np.maximum(e1, e2)))


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_error_if_nonfinite_raises_and_writes_nothing(bad):
    tensors = [make_torch(CHUNK + 1, torch.float32, seed=80), make_torch(50, torch.float32, seed=81)]
    tensors[1][9] = bad
    arrays, hosts = on_sim(tensors)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_by_global_norm_(arrays, 1e-3, error_if_nonfinite=True)
    for h, t in zip(hosts, tensors):
        assert_bitwise_equal(h, t)
    # The rescale still runs (the hold is decided on the device) and writes nothing.
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "scale_kernel"]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_by_value(dtype):
    tensors = [make_torch(n, dtype, seed=90 + i, scale=2.0) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    changed = gradclip.clip_by_value_(arrays, 1.0)
    assert isinstance(changed, np.bool_) and bool(changed)  # a "device" flag, not a Python bool
    for h, t in zip(hosts, tensors):
        assert_bitwise_equal(h, t.clone().clamp_(-1.0, 1.0))
    assert not bool(gradclip.clip_by_value_(arrays, 1.0))  # nothing left outside
    assert kernels_launched() == ["clamp_kernel", "clamp_kernel"]


# --------------------------------------------------------------------------
# The torch drop-ins, with .grad attributes holding "CUDA" arrays
# --------------------------------------------------------------------------


def test_clip_grad_norm_drop_in():
    tensors = [make_torch(n, torch.float32, seed=100 + i) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    params = [SimpleNamespace(grad=a) for a in arrays] + [SimpleNamespace(grad=None)]
    total = ref_norm(tensors, 2.0)
    got = gradclip.clip_grad_norm_(params, 1.0)
    assert_norm_close(got, total, 2.0, np.float32)
    for h, t in zip(hosts, tensors):
        assert_scaled(h, t, 1.0, total, norm_rtol(2.0))
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "scale_kernel"]


@pytest.mark.parametrize("norm_dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_grads_with_a_norm_in_device_memory(norm_dtype):
    # The coefficient is computed on the device from the norm where it lies:
    # one launch, no read of the norm on the host.
    tensors = [make_torch(n, torch.float32, seed=110 + i) for i, n in enumerate([CHUNK + 2, 9])]
    arrays, hosts = on_sim(tensors)
    norm_host = torch.tensor([4.0], dtype=norm_dtype)
    norm = FakeCudaArray.over(norm_host)
    gradclip.clip_grads_with_norm_([SimpleNamespace(grad=a) for a in arrays], 1.0, norm)
    coef = ref_coef(1.0, 4.0, EPS)
    for h, t in zip(hosts, tensors):
        assert_bitwise_equal(h, torch.from_numpy(expected_scaled(t, coef)).to(t.dtype))
    assert kernels_launched() == ["scale_kernel"]


def test_clip_grad_value_drop_in():
    tensors = [make_torch(n, torch.float16, seed=120 + i, scale=3.0) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    gradclip.clip_grad_value_([SimpleNamespace(grad=a) for a in arrays], 0.5)
    for h, t in zip(hosts, tensors):
        assert_bitwise_equal(h, t.clone().clamp_(-0.5, 0.5))
    assert kernels_launched() == ["clamp_kernel"]


# --------------------------------------------------------------------------
# The training front end: a report read back from the device
# --------------------------------------------------------------------------

TRAINING_OPTIONS = [dict(global_clipnorm=0.5), dict(clipnorm=0.3), dict(clipvalue=0.02), {}]
TRAINING_IDS = ["global", "per-tensor", "value", "measure"]


@pytest.mark.parametrize("options", TRAINING_OPTIONS, ids=TRAINING_IDS)
def test_clip_gradients_report_matches_the_cpu(options):
    # The CUDA backend reads back what the finalize kernel decided (norms,
    # coefficients, the nonfinite flag, the clamp's flags); the record must say
    # what the CPU's says, and the gradients must be clipped alike.
    tensors = [make_torch(n, torch.float32, seed=300 + i, scale=0.05) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    cpu = [t.clone() for t in tensors]
    got = gradclip.clip_gradients_([SimpleNamespace(grad=a) for a in arrays], **options)
    want = gradclip.clip_gradients_([SimpleNamespace(grad=c) for c in cpu], **options)
    assert (got.clipped, got.skipped, got.nonfinite_tensors) == (want.clipped, want.skipped, want.nonfinite_tensors)
    assert got.total_norm == pytest.approx(want.total_norm, rel=norm_rtol(2.0))
    if math.isnan(want.clip_coef):
        assert math.isnan(got.clip_coef)
    else:
        assert got.clip_coef == pytest.approx(want.clip_coef, rel=2 * norm_rtol(2.0))
    for (name, g), (_, w) in zip(got.tensor_norms().items(), want.tensor_norms().items()):
        assert g == pytest.approx(w, rel=norm_rtol(2.0)), name
    for h, c in zip(hosts, cpu):
        torch.testing.assert_close(h, c, rtol=2e-7, atol=0.0)
    # One launch sequence (the rescale returns at once for coefficients of 1), then one read-back.
    apply = "clamp_kernel" if "clipvalue" in options else "scale_kernel"
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", apply]


@pytest.mark.parametrize("options", TRAINING_OPTIONS[:3], ids=TRAINING_IDS[:3])
@pytest.mark.parametrize("policy", ["skip", "error", "propagate"])
def test_clip_gradients_nonfinite_policies_on_the_device(options, policy):
    tensors = [make_torch(n, torch.float32, seed=320 + i) for i, n in enumerate([40, CHUNK + 5, 9])]
    tensors[1][17] = float("nan")
    arrays, hosts = on_sim(tensors)
    params = [SimpleNamespace(grad=a) for a in arrays]
    if policy == "error":
        with pytest.raises(gradclip.NonfiniteGradientError, match=r"parameters\[1\]") as info:
            gradclip.clip_gradients_(params, nonfinite=policy, **options)
        assert info.value.names == ["parameters[1]"]
    else:
        record = gradclip.clip_gradients_(params, nonfinite=policy, **options)
        assert record.skipped == (policy == "skip") and record.nonfinite_tensors == 1
        assert record.nonfinite_names() == ["parameters[1]"]
    if policy in ("skip", "error"):  # held on the device: the kernels wrote nothing
        for h, t in zip(hosts, tensors):
            assert_bitwise_equal(h, t)
    elif "global_clipnorm" in options:  # torch's NaN total spreads to every gradient
        assert all(bool(torch.isnan(h).all()) for h in hosts)
    elif "clipnorm" in options:  # a per-tensor NaN norm spreads within its tensor only
        assert [bool(torch.isnan(h).all()) for h in hosts] == [False, True, False]


def test_adaptive_clipper_on_the_device():
    # AutoClip goes through the engine's seam: a reduction (its partials and
    # total in device memory, read back once for the clipper), then the finish.
    tensors = [make_torch(n, torch.float32, seed=340 + i) for i, n in enumerate(SIZES)]
    arrays, hosts = on_sim(tensors)
    cpu = [t.clone() for t in tensors]
    clipper, cpu_clipper = gradclip.AutoClip(percentile=50), gradclip.AutoClip(percentile=50)
    cpu_clipper.update(0.5 * ref_norm(tensors, 2.0))  # a history that makes this step clip
    clipper.update(0.5 * ref_norm(tensors, 2.0))
    got = gradclip.clip_gradients_([SimpleNamespace(grad=a) for a in arrays], global_clipnorm=clipper)
    want = gradclip.clip_gradients_([SimpleNamespace(grad=c) for c in cpu], global_clipnorm=cpu_clipper)
    assert got.clipped and want.clipped
    assert got.threshold == pytest.approx(want.threshold, rel=norm_rtol(2.0))
    assert got.clip_coef == pytest.approx(want.clip_coef, rel=2 * norm_rtol(2.0))
    for h, c in zip(hosts, cpu):
        torch.testing.assert_close(h, c, rtol=2e-7, atol=0.0)
    assert kernels_launched() == ["norm_kernel", "finalize_kernel", "finalize_kernel", "scale_kernel"]


def test_the_backend_override_is_restored_and_checked():
    _core._use_cuda_backend(None, None)
    # The real path again: on this machine it cannot run a fake-address array
    # and says why (no CUDA module, or no framework to allocate device memory).
    with pytest.raises(ValueError, match="CUDA module|torch or CuPy"):
        gradclip.global_norm([FakeCudaArray(100)])
    assert _cuda_sim.launch_log() == []
    with pytest.raises(ValueError):
        _core._use_cuda_backend(object(), host_allocate)  # not a capsule
    with pytest.raises(ValueError, match="incorrect name"):
        _core._use_cuda_backend(_core_capsule_named(b"not.gradclip"), host_allocate)
    with pytest.raises(TypeError, match="allocate"):
        _core._use_cuda_backend(_cuda_sim._api, None)


def _core_capsule_named(name: bytes):
    """A capsule with another name (and a pointer nobody may read)."""
    import ctypes

    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    _core_capsule_named.keep = name  # the capsule keeps a pointer to its name
    return new(ctypes.c_void_p(8), name, None)
