"""The CUDA backend on a real GPU: every public function on torch CUDA tensors
(and CuPy arrays), against the float64 reference (conftest.py) and against
torch's own CUDA results.

Every test here is marked ``cuda`` and skips unless torch sees a GPU and
gradclip was built with its CUDA module (``build_info()["cuda_available"]``);
``-m cuda`` runs only these, ``-m "not cuda"`` leaves them out.

Inputs are views into larger "guarded" buffers: ``offset`` elements before each
view and GUARD after it hold SENTINEL, and every test checks that they still do
(a vector store past a tensor's end, or a misplaced head/tail, shows up there).
With ``offset`` > 0 every view's data pointer is off the 16-byte vector grid.

Tolerances
----------
* Against the float64 reference (the main oracle). The kernels sum |x|^p in
  float64: a thread adds at most 34 elements of a segment, 256 thread sums are
  folded by a fixed tree, a tensor's segments serially (<= 8) or by a warp,
  then the tensors: fewer than 2200 additions of non-negative terms per result
  for every list in this file (the plan test_cuda_plan.py checks on the host;
  the one larger tensor, of 2^31 + 17 elements, sums exact multiples of 1/4),
  the bound behind ``conftest.norm_rtol`` (1e-12 * max(1, 1/p); inf norms are
  exact). A float32 result must be that value rounded to float32
  (``assert_norm_close`` rounds its bracket). Scaled elements go through
  ``conftest.assert_scaled``: the arithmetic is specified (float32 and 16-bit
  data times float32(coef), rounded to nearest even; float64 in float64), so
  only the norm's uncertainty widens the bracket, and a norm that is given
  (clip_grads_with_norm_) makes the comparison bitwise.
* Against torch on the same GPU:
  - norms, strictly: torch's CUDA vector_norm of the tensors upcast exactly to
    float64, combined as its get_total_norm does (per-tensor norms, then the
    norm of those). Its float64 tree reductions and pow are far inside
    norm_rtol too, so the two agree within 2 * norm_rtol (before gradclip's
    rounding to float32, which assert_norm_close applies). This also covers
    16-bit inputs, whose own torch norm is rounded to 16 bits.
  - norms, loosely, against torch's own float32 result (TORCH_NORM_RTOL):
    torch accumulates float32 in float32; for these lists of < 2e5 non-negative
    terms a sum's error is ~sqrt(n) * 2^-24 ~ 2.5e-5 (more on a CPU-like serial
    loop), doubled by the root for p = 0.5: rtol 1e-4, a guard against gross
    disagreement, not the accuracy check (the reference is). float64: 1e-12.
    inf norms are a max of exact values: rtol 0.
  - scaled gradients against ``torch.nn.utils.clip_grad_norm_(foreach=True)``
    (TORCH_SCALED_RTOL / _ATOL): float32 1e-4 (torch's norm, above, plus its
    float32 coefficient division, a few ulps); float64 1e-12; float16 2^-9 and
    bfloat16 2^-6, because torch rounds its per-tensor norms, the total and
    the coefficient to 16 bits and both sides round the product to 16 bits:
    four roundings of u = 2^-11 / 2^-8, 4u <= 2^-9 / 2^-6. float16 products
    among the subnormals get an absolute 2^-23 (two subnormal steps). Where
    torch's 16-bit norm overflows (fp16 L1 / L0.5 of these lists exceed 65504)
    torch zeroes every gradient, a documented difference: that comparison is
    skipped.
  - value clipping: bit-exact, NaN payloads aside (see that test for the one
    sign-of-zero difference of torch's CUDA foreach clamp).
"""

from __future__ import annotations

import copy
import math
import sys
import types
import warnings
from typing import Callable, Dict, List, Sequence

import numpy as np
import pytest
import torch

import gradclip
from conftest import (
    EPS,
    INF,
    NAN,
    as_f64,
    assert_bitwise_equal,
    assert_norm_close,
    assert_same_or_both_nan,
    assert_scaled,
    expected_scaled,
    make_numpy,
    make_param,
    make_torch,
    norm_rtol,
    ref_coef,
    ref_norm,
    result_dtype_of,
)


def _cuda_ready() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when a driver is present but unusable
        try:
            return bool(torch.cuda.is_available()) and bool(gradclip.build_info()["cuda_available"])
        except Exception:  # noqa: BLE001 - any failure to probe means: no usable GPU here
            return False


CUDA_READY = _cuda_ready()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not CUDA_READY,
        reason="needs a CUDA GPU visible to torch and gradclip built with its CUDA module "
        "(gradclip.build_info()['cuda_available'])",
    ),
]

DEV = torch.device("cuda", 0)

CHUNK = 8192  # plan.h kChunk: elements per block
LAUNCH_TENSORS = 2000  # plan.h kMaxTensorsPerLaunch
# Around the vector widths (2, 4 or 8 elements of 16 bytes), the chunk edges, and a
# tensor of more than kSerialFoldSegments (8) segments, folded by a warp.
EDGE_SIZES = [0, 1, 7, 8, 9, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 9 * CHUNK + 3]
TRANSPOSED_SHAPE = (33, 65)  # added to each list as a transposed (dense, non-contiguous) view
OFFSETS = [0, 3]  # elements before each view: 0 is 16-byte aligned; 3 is not for any dtype (6, 12 or 24 bytes)
GUARD = 24  # elements after each view
SENTINEL = 1000.0  # exact in every dtype; any stray scale or clamp below 1000 changes it

CUDA_NORM_ORDERS = [1.0, 2.0, INF, 3.5, 0.5]
CUDA_NORM_IDS = ["L1", "L2", "Linf", "L3.5", "L0.5"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]

TORCH_NORM_RTOL = {torch.float32: 1e-4, torch.float64: 1e-12}
TORCH_SCALED_RTOL = {torch.float32: 1e-4, torch.float64: 1e-12, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
TORCH_SCALED_ATOL = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-23, torch.bfloat16: 0.0}

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def host(t: torch.Tensor) -> torch.Tensor:
    """A host copy (always a copy, so that it never aliases the tensor)."""
    return t.detach().to("cpu", copy=True)


def int_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of the same size (any layout; no copy)."""
    return t.detach().view(_INT_OF_SIZE[t.element_size()])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch is asked to compute a reference norm in (16-bit data upcast exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_device_result(x, like: torch.Tensor, shape, dtype: torch.dtype, what: str) -> None:
    assert isinstance(x, torch.Tensor), f"{what}: expected a torch tensor, got {type(x).__name__}"
    assert x.device == like.device, f"{what}: result on {x.device}, expected {like.device}"
    assert x.dtype == dtype, f"{what}: result dtype {x.dtype}, expected {dtype}"
    assert tuple(x.shape) == tuple(shape), f"{what}: result shape {tuple(x.shape)}, expected {tuple(shape)}"


def torch_norm_of(tensors: Sequence[torch.Tensor], p: float, dtype: torch.dtype = torch.float64) -> float:
    """torch's CUDA norm of the list, by its own get_total_norm scheme (per-tensor
    vector_norm, then the norm of those), on the tensors upcast exactly to dtype.
    Empty tensors are left out (torch cannot take their inf norm)."""
    norms = [torch.linalg.vector_norm(t.detach().to(dtype), p) for t in tensors if t.numel() > 0]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms), p))


def assert_close_to_torch64(got, tensors: Sequence[torch.Tensor], p: float, result_dtype: torch.dtype) -> None:
    """A gradclip norm against torch's float64 norm of the same values (module docstring)."""
    assert_norm_close(got, torch_norm_of(tensors, p), p, result_dtype, rtol=2.0 * norm_rtol(p))


def assert_close_to_torch_norm(got: float, expected: float, p: float, dtype: torch.dtype, what: str) -> None:
    if math.isnan(expected):
        assert math.isnan(got), f"{what}: {got!r}, torch gives NaN"
        return
    rtol = 0.0 if p == INF else TORCH_NORM_RTOL[dtype]
    assert got == expected or abs(got - expected) <= rtol * abs(expected), (
        f"{what}: {got!r} against torch's {expected!r} (relative {abs(got - expected) / abs(expected):.3g}, "
        f"rtol {rtol:g})"
    )


def assert_close_to_torch(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor], what: str) -> None:
    """Scaled gradients against torch's, with the per-dtype tolerances above. In
    a list of mixed dtypes torch's coefficient carries the rounding of its
    16-bit per-tensor norms, so every tensor gets the loosest tolerance of the list."""
    assert len(ours) == len(theirs), f"{what}: {len(ours)} tensors against torch's {len(theirs)}"
    rtol = max((TORCH_SCALED_RTOL[t.dtype] for t in ours), default=0.0)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = host(a), host(b)
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=TORCH_SCALED_ATOL[a.dtype], equal_nan=True,
            check_stride=False, msg=lambda m, i=i, d=a.dtype: f"{what}[{i}] ({d}) against torch: {m}",
        )


def assert_values_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal as numbers: NaN matches NaN and -0 matches +0."""
    a, b = as_f64(host(actual)).ravel(), as_f64(host(expected)).ravel()
    bad = np.flatnonzero(~((a == b) | (np.isnan(a) & np.isnan(b))))
    assert bad.size == 0, f"{what}: {bad.size} elements differ; first at {bad[0]}: {a[bad[0]]!r} vs {b[bad[0]]!r}"


def assert_scaled_between(actual, original, c_lo: float, c_hi: float, what: str) -> None:
    """``actual`` is ``original`` scaled (with the specified rounding) by some
    coefficient in [c_lo, c_hi]."""
    e1, e2 = expected_scaled(original, c_lo).ravel(), expected_scaled(original, c_hi).ravel()
    lo, hi = np.minimum(e1, e2), np.maximum(e1, e2)
    got = as_f64(actual).ravel()
    bad = np.flatnonzero(~((got >= lo) & (got <= hi)))
    assert bad.size == 0, (
        f"{what}: {bad.size} of {got.size} elements outside the bracket; first at {bad[0]}: {got[bad[0]]!r} "
        f"not in [{lo[bad[0]]!r}, {hi[bad[0]]!r}]"
    )


class Guarded:
    """CUDA tensors as views into guarded buffers (see the module docstring)."""

    def __init__(self, dtypes, seed: int, offset: int = 0, scale: float = 1.0, sizes: Sequence[int] = EDGE_SIZES,
                 transposed: bool = True):
        if isinstance(dtypes, torch.dtype):
            dtypes = [dtypes]
        shapes = [(int(n),) for n in sizes] + ([TRANSPOSED_SHAPE] if transposed else [])
        self.offset = offset
        self.buffers: List[torch.Tensor] = []
        self.views: List[torch.Tensor] = []
        for i, shape in enumerate(shapes):
            dtype = dtypes[i % len(dtypes)]
            n = math.prod(shape)
            buf = torch.full((offset + n + GUARD,), SENTINEL, dtype=dtype, device=DEV)
            flat = buf[offset : offset + n]
            view = flat.view(shape[1], shape[0]).t() if len(shape) == 2 else flat
            view.copy_(make_torch(shape, dtype, seed * 1000 + i, scale).to(DEV))
            self.buffers.append(buf)
            self.views.append(view)
        self.snapshot()

    def snapshot(self) -> None:
        """Records the current values as the originals (host copies and bits)."""
        self.originals = [host(v) for v in self.views]
        self.bits = [int_bits(v).clone() for v in self.views]

    def params(self) -> List[torch.nn.Parameter]:
        """Parameters whose .grad is each view itself (modified in place)."""
        return [make_param(v) for v in self.views]

    def torch_params(self) -> List[torch.nn.Parameter]:
        """Parameters holding device copies of the non-empty originals, for torch."""
        return [make_param(o.to(DEV)) for o in self.originals if o.numel() > 0]

    def nonempty(self) -> List[torch.Tensor]:
        return [v for v in self.views if v.numel() > 0]

    def assert_guards(self) -> None:
        for i, (buf, v) in enumerate(zip(self.buffers, self.views)):
            outside = torch.cat([buf[: self.offset], buf[self.offset + v.numel() :]])
            bad = int((outside != SENTINEL).sum())
            assert bad == 0, (
                f"tensor {i} ({v.dtype}, {v.numel()} elements at offset {self.offset}): {bad} elements of the "
                "memory around it were written"
            )

    def assert_untouched(self, what: str = "input") -> None:
        for i, (v, b) in enumerate(zip(self.views, self.bits)):
            if not torch.equal(int_bits(v), b):
                assert_bitwise_equal(host(v), self.originals[i], f"{what} {i}")
        self.assert_guards()

    def assert_misaligned(self) -> None:
        for v in self.nonempty():
            assert v.data_ptr() % 16 == (self.offset * v.element_size()) % 16
            if self.offset:
                assert v.data_ptr() % 16 != 0, "the view was meant to start off the 16-byte grid"


# --------------------------------------------------------------------------
# Norms: get_total_norm, global_norm, tensor_norms
# --------------------------------------------------------------------------

NORM_FUNCS = ["get_total_norm", "global_norm", "tensor_norms"]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("p", CUDA_NORM_ORDERS, ids=CUDA_NORM_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fn", NORM_FUNCS)
def test_norms_match_reference_and_torch(fn, dtype, p, offset):
    g = Guarded(dtype, seed=11 + NORM_FUNCS.index(fn) * 10 + offset, offset=offset)
    g.assert_misaligned()
    assert not g.views[-1].is_contiguous()  # the transposed one
    out_dtype = result_dtype_of(g.views)
    if fn == "tensor_norms":
        got = gradclip.tensor_norms(g.views, ord=p)
        assert_device_result(got, g.views[0], (len(g.views),), out_dtype, fn)
        values = host(got).tolist()
        for i, (v, o) in enumerate(zip(g.views, g.originals)):
            assert_norm_close(values[i], ref_norm([o], p), p, out_dtype)
            assert_close_to_torch64(values[i], [v], p, out_dtype)
    else:
        if fn == "get_total_norm":
            got = gradclip.get_total_norm(g.views, norm_type=p)
        else:
            got = gradclip.global_norm(g.views, ord=p)
        assert_device_result(got, g.views[0], (), out_dtype, fn)
        assert_norm_close(got, ref_norm(g.originals, p), p, out_dtype)
        assert_close_to_torch64(got, g.views, p, out_dtype)
        if fn == "get_total_norm" and dtype in (torch.float32, torch.float64):
            expected = torch.nn.utils.get_total_norm(g.nonempty(), norm_type=p, foreach=True)
            assert expected.dtype == got.dtype and expected.device == got.device
            assert_close_to_torch_norm(float(got), float(expected), p, dtype, "torch.nn.utils.get_total_norm")
    g.assert_untouched(f"{fn} input")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gradclip._cuda_sim is built on Linux")
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("p", [1.0, 2.0, INF], ids=["L1", "L2", "Linf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_and_host_simulation_agree_bitwise(dtype, p, offset):
    # The same kernels run on the host (gradclip._cuda_sim, tests/test_cuda_sim.py)
    # and here. For L1, L2 and inf every operation is an IEEE-rounded add,
    # multiply, sqrt or divide in a fixed order (no contraction: --fmad=false),
    # so the two must agree to the bit, which shows the host tests speak for
    # the GPU. Host copies keep each view's address modulo 16, hence its
    # head/vector/tail split and fold order. (Generic p uses pow, whose device
    # rounding may differ by an ulp.)
    from gradclip import _cuda_sim

    g = Guarded(dtype, seed=61 + offset, offset=offset)
    host_buffers = [host(b) for b in g.buffers]
    specs = [(hb.data_ptr() + offset * hb.element_size(), v.numel(), str(dtype).replace("torch.", ""), 0)
             for hb, v in zip(host_buffers, g.views)]
    out_f64 = dtype == torch.float64
    sim = _cuda_sim.run(specs, "norms", p=p, out_f64=out_f64)
    got = host(gradclip.tensor_norms(g.views, ord=p)).tolist()
    assert got == sim["per_tensor"], "per-tensor norms differ between the GPU and the host simulation"
    assert float(gradclip.global_norm(g.views, ord=p)) == sim["total"]

    max_norm = 0.5
    _cuda_sim.run(specs, "clip_global", p=p, limits=[max_norm], eps=EPS, out_f64=out_f64)
    gradclip.clip_by_global_norm_(g.views, max_norm, ord=p)
    for i, (hb, b) in enumerate(zip(host_buffers, g.buffers)):
        assert_bitwise_equal(host(b), hb, f"clipped buffer {i}")


# --------------------------------------------------------------------------
# Clipping: every scaling function, clipped, against the reference and torch
# --------------------------------------------------------------------------

CLIP_FUNCS = [
    "clip_grad_norm_",
    "clip_by_global_norm_",
    "clip_grads_with_norm_-tensor",
    "clip_grads_with_norm_-host-tensor",
    "clip_grads_with_norm_-float",
    "clip_by_norm_",
    "normalize_",
]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("p", CUDA_NORM_ORDERS, ids=CUDA_NORM_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fn", CLIP_FUNCS)
def test_clipping_matches_reference_and_torch(fn, dtype, p, offset):
    g = Guarded(dtype, seed=101 + CLIP_FUNCS.index(fn) * 10 + offset, offset=offset)
    g.assert_misaligned()
    orig = g.originals
    ref, rtol = ref_norm(orig, p), norm_rtol(p)
    out_dtype, cdt = result_dtype_of(g.views), compute_dtype(dtype)
    theirs = g.torch_params()
    their_grads = [t.grad for t in theirs]
    ours_nonempty = g.nonempty()

    if fn in ("clip_grad_norm_", "clip_by_global_norm_"):
        max_norm = ref / 3.0
        torch64 = torch_norm_of(g.views, p)
        if fn == "clip_grad_norm_":
            params = g.params()
            total = gradclip.clip_grad_norm_(params, max_norm, norm_type=p)
            assert all(prm.grad is v for prm, v in zip(params, g.views)), "the .grad tensors must be modified in place"
        else:
            total = gradclip.clip_by_global_norm_(g.views, max_norm, ord=p)
        assert_device_result(total, g.views[0], (), out_dtype, fn)
        assert_norm_close(total, ref, p, out_dtype)
        assert_norm_close(total, torch64, p, out_dtype, rtol=2.0 * norm_rtol(p))
        for i, (v, o) in enumerate(zip(g.views, orig)):
            assert_scaled(host(v), o, max_norm, ref, rtol)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=p, foreach=True)
        if math.isfinite(float(expected)):  # else torch's 16-bit norm overflowed (module docstring)
            assert_close_to_torch(ours_nonempty, their_grads, fn)

    elif fn.startswith("clip_grads_with_norm_"):
        max_norm = ref / 3.0
        params = g.params()
        if fn == "clip_grads_with_norm_-tensor":
            total = gradclip.get_total_norm(g.views, norm_type=p)  # a CUDA tensor, read where it lies
            given = float(total)
            assert gradclip.clip_grads_with_norm_(params, max_norm, total) is None
            torch_total = total.clone()
        elif fn == "clip_grads_with_norm_-host-tensor":
            total = torch.tensor(ref, dtype=torch.float64)  # in host memory: the coefficient is computed there
            given = ref
            assert gradclip.clip_grads_with_norm_(params, max_norm, total) is None
            torch_total = total.to(DEV)
        else:
            given = ref
            assert gradclip.clip_grads_with_norm_(params, max_norm, given) is None
            torch_total = torch.tensor(given, dtype=torch.float64, device=DEV)
        for v, o in zip(g.views, orig):
            assert_scaled(host(v), o, max_norm, given, rtol=0.0)  # the norm is given: bitwise
        torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, torch_total, foreach=True)
        assert_close_to_torch(ours_nonempty, their_grads, fn)

    elif fn == "clip_by_norm_":
        refs = [ref_norm([o], p) for o in orig]
        positive = sorted(r for r in refs if r > 0)
        max_norm = positive[len(positive) // 2]  # about half the tensors are clipped
        norms = gradclip.clip_by_norm_(g.views, max_norm, ord=p)
        assert_device_result(norms, g.views[0], (len(g.views),), out_dtype, fn)
        values = host(norms).tolist()
        for i, (v, o) in enumerate(zip(g.views, orig)):
            assert_norm_close(values[i], refs[i], p, out_dtype)
            assert_scaled(host(v), o, max_norm, refs[i], rtol)
        # torch: clip_grad_norm_ on each tensor by itself.
        mine, theirs_ok = [], []
        for v, t in zip(ours_nonempty, theirs):
            if math.isfinite(float(torch.nn.utils.clip_grad_norm_([t], max_norm, norm_type=p, foreach=True))):
                mine.append(v)
                theirs_ok.append(t.grad)
        assert_close_to_torch(mine, theirs_ok, fn)

    else:  # normalize_
        target = ref / 3.0
        before = gradclip.normalize_(g.views, target, ord=p)
        assert_device_result(before, g.views[0], (), out_dtype, fn)
        assert_norm_close(before, ref, p, out_dtype)
        for v, o in zip(g.views, orig):
            # target < norm: the coefficient target / norm is torch's rule with eps = 0
            assert_scaled(host(v), o, target, ref, rtol, eps=0.0)
        total_t = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.to(cdt), p) for t in their_grads]), p)
        for t in their_grads:
            t.mul_(target / total_t)
        assert_close_to_torch(ours_nonempty, their_grads, fn)
    g.assert_guards()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_normalize_scales_up_too_and_leaves_zeros_alone(dtype):
    g = Guarded(dtype, seed=201, offset=1, sizes=[CHUNK + 1, 17, 0])
    ref, rtol = ref_norm(g.originals, 2.0), norm_rtol(2.0)
    target = 3.0 * ref
    before = gradclip.normalize_(g.views, target)
    assert_norm_close(before, ref, 2.0, result_dtype_of(g.views))
    for i, (v, o) in enumerate(zip(g.views, g.originals)):
        assert_scaled_between(host(v), o, target / (ref * (1 + rtol)), target / (ref * (1 - rtol)), f"tensor {i}")
    zeros = Guarded(dtype, seed=202, offset=1, sizes=[100, 9], transposed=False, scale=0.0)
    assert float(gradclip.normalize_(zeros.views, 1.0)) == 0.0
    zeros.assert_untouched("all-zero input")
    g.assert_guards()


# --------------------------------------------------------------------------
# Nothing to clip: not one bit changes
# --------------------------------------------------------------------------

UNCLIPPED_FUNCS = [
    "clip_grad_norm_",
    "clip_grad_norm_-coef-exactly-1",
    "clip_by_global_norm_",
    "clip_grads_with_norm_",
    "clip_by_norm_",
    "clip_grad_value_",
    "clip_by_value_",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fn", UNCLIPPED_FUNCS)
def test_unclipped_call_leaves_gradients_bit_identical(fn, dtype):
    g = Guarded(dtype, seed=301 + UNCLIPPED_FUNCS.index(fn), offset=1)
    out_dtype = result_dtype_of(g.views)
    orders = [None] if "value" in fn else CUDA_NORM_ORDERS
    for p in orders:
        if fn == "clip_grad_value_":
            assert gradclip.clip_grad_value_(g.params(), 1e4) is None  # far above every |x| (< 10)
        elif fn == "clip_by_value_":
            changed = gradclip.clip_by_value_(g.views, 1e4)
            assert_device_result(changed, g.views[0], (), torch.bool, fn)
            assert not bool(changed)
        else:
            ref = ref_norm(g.originals, p)
            if fn == "clip_grad_norm_":
                total = gradclip.clip_grad_norm_(g.params(), ref * 3.0 + 1.0, norm_type=p)
                assert_norm_close(total, ref, p, out_dtype)
            elif fn == "clip_grad_norm_-coef-exactly-1":
                # max_norm / (norm + eps) just above 1: the coefficient is clamped to exactly 1
                gradclip.clip_grad_norm_(g.params(), ref * (1 + 1e-9) + EPS, norm_type=p)
            elif fn == "clip_by_global_norm_":
                gradclip.clip_by_global_norm_(g.views, INF, ord=p)
            elif fn == "clip_grads_with_norm_":
                total = gradclip.get_total_norm(g.views, norm_type=p)
                gradclip.clip_grads_with_norm_(g.params(), float(total) * 2.0 + 1.0, total)
            else:
                largest = max(ref_norm([o], p) for o in g.originals)
                gradclip.clip_by_norm_(g.views, largest * 2.0 + 1.0, ord=p)
        torch.cuda.synchronize()
        g.assert_untouched(f"{fn} (p={p})")


# --------------------------------------------------------------------------
# Value clipping: bit-exact with torch
# --------------------------------------------------------------------------

CLIP_VALUES = [0.0, 0.1, 1.0 / 3.0, 0.5, 1.0 + 2.0**-11 + 2.0**-40, 2.5, 300.7, 1e4, INF]
CLIP_VALUE_IDS = ["0", "0.1", "1/3", "0.5", "1+2^-11+2^-40", "2.5", "300.7", "1e4", "inf"]
SPECIALS = [0.0, -0.0, NAN, INF, -INF, 0.1, -0.1, 0.5, -0.5, 2.5, -2.5, 1e-8, -3.0, 3.0, 1.0 + 2.0**-10, 300.5,
            -301.0, 1e4, -1e4]


def bound_in(dtype: torch.dtype, clip_value: float) -> float:
    """The bound rounded to dtype as torch's Scalar conversion does (double -> float -> 16-bit)."""
    if dtype == torch.float64:
        return clip_value
    return float(torch.tensor(clip_value, dtype=torch.float32).to(dtype))


def special_values(dtype: torch.dtype, clip_value: float) -> torch.Tensor:
    """NaN, infinities, signed zeros, and the rounded bound with its neighbours in dtype."""
    t = torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)
    b = bound_in(dtype, clip_value)
    if 0.0 < b < INF:
        ib = torch.tensor([b], dtype=torch.float64).to(dtype).view(_INT_OF_SIZE[t.element_size()])
        near = torch.cat([ib - 1, ib, ib + 1]).view(dtype)
        t = torch.cat([t, near, -near])
    return t


def value_grads(dtype: torch.dtype, clip_value: float, seed: int, offset: int) -> Guarded:
    g = Guarded(dtype, seed, offset=offset, scale=2.0)
    specials = special_values(dtype, clip_value)
    gen = torch.Generator().manual_seed(seed)
    for i, (v, o) in enumerate(zip(g.views, g.originals)):
        n = o.numel()
        if n == 0:
            continue
        flat = o.reshape(-1).clone()
        k = min(n, specials.numel())
        flat[torch.randperm(n, generator=gen)[:k]] = specials.roll(i)[:k]
        v.copy_(flat.view(o.shape).to(DEV))
    g.snapshot()
    return g


@pytest.mark.parametrize("api", ["clip_grad_value_", "clip_by_value_"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("clip_value", CLIP_VALUES, ids=CLIP_VALUE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_value_clipping_bit_exact_with_torch(dtype, clip_value, offset, api):
    g = value_grads(dtype, clip_value, seed=401 + offset, offset=offset)
    g.assert_misaligned()
    theirs_cuda = g.torch_params()
    theirs_cpu = [make_param(o.clone()) for o in g.originals if o.numel() > 0]
    if api == "clip_grad_value_":
        assert gradclip.clip_grad_value_(g.params(), clip_value) is None
    else:
        changed = gradclip.clip_by_value_(g.views, clip_value)
        assert_device_result(changed, g.views[0], (), torch.bool, api)
    torch.nn.utils.clip_grad_value_(theirs_cuda, clip_value, foreach=True)
    torch.nn.utils.clip_grad_value_(theirs_cpu, clip_value)  # on the CPU: a per-tensor clamp_
    for i, (v, tc, tg) in enumerate(zip(g.nonempty(), theirs_cpu, theirs_cuda)):
        ours = host(v)
        assert_same_or_both_nan(ours, tc.grad, f"{api} tensor {i} against torch on the CPU")
        if clip_value == 0.0:
            # torch's CUDA foreach clamp (ForeachMinMaxFunctors.cuh: `a > b ? a : b`) returns the
            # bound on a tie, so with bounds -0/+0 every zero and every clamped negative element
            # comes out +0; gradclip, like torch's CPU clamp, keeps -0 and clamps negatives to -0.
            assert_values_equal(ours, tg.grad, f"{api} tensor {i} against torch on CUDA")
        else:
            assert_same_or_both_nan(ours, host(tg.grad), f"{api} tensor {i} against torch on CUDA")
    if api == "clip_by_value_":
        really = any(not torch.equal(int_bits(v), b) for v, b in zip(g.views, g.bits))
        assert bool(changed) == really
    g.assert_guards()


# --------------------------------------------------------------------------
# Mixed dtypes, repeats, empty tensors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("p", CUDA_NORM_ORDERS, ids=CUDA_NORM_IDS)
@pytest.mark.parametrize("with_f64", [True, False], ids=["with-f64", "no-f64"])
def test_mixed_dtypes_in_one_call(with_f64, p):
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if with_f64 else [])
    sizes = [CHUNK + 1, 17, 3 * CHUNK + 5, 8, 1, 0, 9 * CHUNK + 3, 100]
    out_dtype = torch.float64 if with_f64 else torch.float32
    rtol = norm_rtol(p)

    g = Guarded(dtypes, seed=501, offset=1, sizes=sizes)
    ref = ref_norm(g.originals, p)
    torch64 = torch_norm_of(g.views, p)
    for name, got in (("get_total_norm", gradclip.get_total_norm(g.views, norm_type=p)),
                      ("global_norm", gradclip.global_norm(g.views, ord=p))):
        assert_device_result(got, g.views[0], (), out_dtype, name)
        assert_norm_close(got, ref, p, out_dtype)
        assert_norm_close(got, torch64, p, out_dtype, rtol=2.0 * rtol)
    norms = gradclip.tensor_norms(g.views, ord=p)
    assert_device_result(norms, g.views[0], (len(g.views),), out_dtype, "tensor_norms")
    for value, o in zip(host(norms).tolist(), g.originals):
        assert_norm_close(value, ref_norm([o], p), p, out_dtype)
    g.assert_untouched("norm input")

    theirs = g.torch_params()
    total = gradclip.clip_grad_norm_(g.params(), ref / 3.0, norm_type=p)
    assert_device_result(total, g.views[0], (), out_dtype, "clip_grad_norm_")
    assert_norm_close(total, ref, p, out_dtype)
    for v, o in zip(g.views, g.originals):
        assert v.dtype == o.dtype
        assert_scaled(host(v), o, ref / 3.0, ref, rtol)
    expected = torch.nn.utils.clip_grad_norm_(theirs, ref / 3.0, norm_type=p, foreach=True)
    if math.isfinite(float(expected)):
        assert_close_to_torch(g.nonempty(), [t.grad for t in theirs], "clip_grad_norm_ (mixed)")
    g.assert_guards()

    v = value_grads(torch.float32, 0.5, seed=502, offset=1)  # one float32 list, then other dtypes mixed in
    mixed = Guarded(dtypes, seed=503, offset=3, sizes=sizes, scale=2.0)
    items = v.views + mixed.views
    originals = v.originals + mixed.originals
    changed = gradclip.clip_by_value_(items, 0.5)
    assert bool(changed)
    theirs_cpu = [make_param(o.clone()) for o in originals]
    torch.nn.utils.clip_grad_value_(theirs_cpu, 0.5)
    for i, (t, e) in enumerate(zip(items, theirs_cpu)):
        assert_same_or_both_nan(host(t), e.grad, f"clip_by_value_ (mixed) tensor {i}")
    v.assert_guards()
    mixed.assert_guards()


def test_a_tensor_listed_twice_is_counted_once_and_scaled_once():
    sizes = [CHUNK + 3, 100, 17]
    g = Guarded(torch.float32, seed=601, offset=1, sizes=sizes, transposed=False)
    ref = ref_norm(g.originals, 2.0)
    rtol = norm_rtol(2.0)
    pa, pb, pc = g.params()
    shared = make_param(g.views[1])  # a second parameter whose .grad is the same tensor as pb's
    total = gradclip.clip_grad_norm_([pa, pb, pa, pc, shared], ref / 3.0)
    assert_norm_close(total, ref, 2.0, torch.float32)  # torch would count a and b twice
    for v, o in zip(g.views, g.originals):
        assert_scaled(host(v), o, ref / 3.0, ref, rtol)  # scaled twice would be coef^2
    # The same bits as the list without repeats (unique tensors are summed in list order).
    fresh = Guarded(torch.float32, seed=601, offset=1, sizes=sizes, transposed=False)
    total_fresh = gradclip.clip_grad_norm_(fresh.params(), ref / 3.0)
    assert_bitwise_equal(host(total), host(total_fresh), "total norm")
    for v, f in zip(g.views, fresh.views):
        assert_bitwise_equal(host(v), host(f), "scaled gradient")

    h = Guarded(torch.float32, seed=602, offset=1, sizes=sizes, transposed=False)
    a, b, c = h.views
    b_2d = b.view(10, 10)  # the same memory, dtype and extent as b: the same tensor
    per = gradclip.tensor_norms([a, b, a, c, b_2d])
    assert_device_result(per, a, (5,), torch.float32, "tensor_norms")
    per = host(per)
    assert_bitwise_equal(per[2], per[0], "repeated entry")
    assert_bitwise_equal(per[4], per[1], "repeated entry")
    for value, o in zip(per.tolist(), [h.originals[i] for i in (0, 1, 0, 2, 1)]):
        assert_norm_close(value, ref_norm([o], 2.0), 2.0, torch.float32)
    assert_bitwise_equal(host(gradclip.global_norm([a, b, a, c, b_2d])), host(gradclip.global_norm([a, b, c])))
    ref_h = ref_norm(h.originals, 2.0)
    gradclip.clip_by_global_norm_([a, b, a, c, b_2d], ref_h / 3.0)
    for v, o in zip(h.views, h.originals):
        assert_scaled(host(v), o, ref_h / 3.0, ref_h, rtol)
    h.assert_guards()

    k = Guarded(torch.bfloat16, seed=603, offset=1, sizes=sizes, transposed=False)
    a, b, c = k.views
    refs = [ref_norm([o], 2.0) for o in k.originals]
    limit = min(refs) / 2.0  # every tensor is clipped
    norms = gradclip.clip_by_norm_([a, a, b, c, b], limit)
    assert_device_result(norms, a, (5,), torch.float32, "clip_by_norm_")
    for value, r in zip(host(norms).tolist(), [refs[i] for i in (0, 0, 1, 2, 1)]):
        assert_norm_close(value, r, 2.0, torch.float32)
    for v, o, r in zip(k.views, k.originals, refs):
        assert_scaled(host(v), o, limit, r, rtol)
    pa, pb, pc = (make_param(v) for v in (a, b, c))
    before = [host(v) for v in (a, b, c)]
    gradclip.clip_grads_with_norm_([pa, pa, pb, pc, pb], 1.0, 4.0)
    for v, o in zip((a, b, c), before):
        assert_scaled(host(v), o, 1.0, 4.0, rtol=0.0)
    k.assert_guards()


ALL_FUNCS = [
    "get_total_norm", "global_norm", "tensor_norms", "clip_grad_norm_", "clip_by_global_norm_",
    "clip_grads_with_norm_", "clip_by_norm_", "normalize_", "clip_grad_value_", "clip_by_value_",
]


@pytest.mark.parametrize("p", [2.0, INF], ids=["L2", "Linf"])
@pytest.mark.parametrize("fn", ALL_FUNCS)
def test_all_empty_list(fn, p):
    views = [
        torch.empty(0, device=DEV),
        torch.empty((0, 3), dtype=torch.float16, device=DEV),
        torch.empty(0, dtype=torch.bfloat16, device=DEV),
    ]
    params = [make_param(v) for v in views]
    like = views[0]
    if fn == "get_total_norm":
        r = gradclip.get_total_norm(views, norm_type=p)
        expected = torch.nn.utils.get_total_norm(views, norm_type=2.0)  # torch refuses the inf norm of empties
        assert expected.device == r.device and float(expected) == 0.0
    elif fn == "global_norm":
        r = gradclip.global_norm(views, ord=p)
    elif fn == "tensor_norms":
        r = gradclip.tensor_norms(views, ord=p)
    elif fn == "clip_grad_norm_":
        r = gradclip.clip_grad_norm_(params, 1.0, norm_type=p)
    elif fn == "clip_by_global_norm_":
        r = gradclip.clip_by_global_norm_(views, 1.0, ord=p)
    elif fn == "clip_grads_with_norm_":
        r = gradclip.clip_grads_with_norm_(params, 1.0, torch.zeros((), device=DEV))
    elif fn == "clip_by_norm_":
        r = gradclip.clip_by_norm_(views, 1.0, ord=p)
    elif fn == "normalize_":
        r = gradclip.normalize_(views, 1.0, ord=p)
    elif fn == "clip_grad_value_":
        r = gradclip.clip_grad_value_(params, 1.0)
    else:
        r = gradclip.clip_by_value_(views, 1.0)
    torch.cuda.synchronize()
    if fn in ("tensor_norms", "clip_by_norm_"):
        assert_device_result(r, like, (3,), torch.float32, fn)
        assert host(r).tolist() == [0.0, 0.0, 0.0]
    elif fn in ("clip_grads_with_norm_", "clip_grad_value_"):
        assert r is None
    elif fn == "clip_by_value_":
        assert_device_result(r, like, (), torch.bool, fn)
        assert not bool(r)
    else:
        assert_device_result(r, like, (), torch.float32, fn)
        assert float(r) == 0.0
    for v, prm in zip(views, params):
        assert v.numel() == 0 and prm.grad is v


# --------------------------------------------------------------------------
# More tensors than one launch holds
# --------------------------------------------------------------------------


def test_more_tensors_than_one_launch_holds():
    n = 2500
    rng = np.random.default_rng(2500)
    sizes = rng.choice([0, 1, 3, 8, 17, 100, 1000, CHUNK - 1, CHUNK + 1], size=n,
                       p=[0.05, 0.1, 0.1, 0.1, 0.15, 0.2, 0.2, 0.05, 0.05]).tolist()
    for i in (LAUNCH_TENSORS - 1, LAUNCH_TENSORS, 2400):
        sizes[i] = 100  # tensors on both sides of the table boundary, and one deep in the second table
    all_dtypes = [torch.float32, torch.bfloat16, torch.float16]
    dtypes = [all_dtypes[k] for k in rng.integers(0, 3, size=n)]
    g = Guarded(dtypes, seed=701, offset=1, sizes=sizes, transposed=False)
    rtol = norm_rtol(2.0)

    for p in (2.0, INF, 1.0):
        ref = ref_norm(g.originals, p)
        assert_norm_close(gradclip.get_total_norm(g.views, norm_type=p), ref, p, torch.float32)
    per = gradclip.tensor_norms(g.views)
    assert_device_result(per, g.views[0], (n,), torch.float32, "tensor_norms")
    for i, (value, o) in enumerate(zip(host(per).tolist(), g.originals)):
        assert_norm_close(value, ref_norm([o], 2.0), 2.0, torch.float32)

    ref = ref_norm(g.originals, 2.0)
    total = gradclip.clip_grad_norm_(g.params(), ref / 3.0)
    assert_norm_close(total, ref, 2.0, torch.float32)
    for v, o in zip(g.views, g.originals):
        assert_scaled(host(v), o, ref / 3.0, ref, rtol)
    g.assert_guards()

    # Value clipping: the change flags of both tables (|x| < 10 everywhere, the bound is 100).
    g.snapshot()
    assert not bool(gradclip.clip_by_value_(g.views, 100.0))
    g.assert_untouched("clip_by_value_ with nothing to clamp")
    for i in (2400, LAUNCH_TENSORS - 1, LAUNCH_TENSORS):
        g.views[i][-1] = 500.0
        assert bool(gradclip.clip_by_value_(g.views, 100.0)), f"a clamp in tensor {i} was not reported"
        assert float(g.views[i][-1]) == 100.0
        assert not bool(gradclip.clip_by_value_(g.views, 100.0))
    g.assert_guards()


# --------------------------------------------------------------------------
# NaN and inf
# --------------------------------------------------------------------------

NONFINITE_SIZES = [0, 1, 17, CHUNK + 1, 3 * CHUNK + 5]


def poisoned(dtype: torch.dtype, bad: float, seed: int) -> Guarded:
    g = Guarded(dtype, seed, offset=1, sizes=NONFINITE_SIZES)
    g.views[3][-1] = bad  # the last element of tensor 3: the tail of its second block
    g.snapshot()
    return g


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("p", CUDA_NORM_ORDERS, ids=CUDA_NORM_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_propagates_like_torch(dtype, p, bad):
    g = poisoned(dtype, bad, seed=801)
    theirs = g.torch_params()
    total = gradclip.clip_grad_norm_(g.params(), 1.0, norm_type=p)
    expected_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=p, foreach=True)
    if math.isnan(bad):
        assert math.isnan(float(total)) and math.isnan(float(expected_total))
        for v in g.nonempty():
            assert bool(torch.isnan(v).all()), "a NaN total must make every gradient NaN"
    else:
        assert float(total) == INF == float(expected_total)
        for v, o in zip(g.views, g.originals):
            finite = torch.isfinite(o)
            got = host(v)
            assert bool((got[finite] == 0).all()), "an inf total zeroes the finite elements"
            assert bool(torch.isnan(got[~finite]).all()), "inf * 0 is NaN"
    for i, (v, t) in enumerate(zip(g.nonempty(), theirs)):
        assert_same_or_both_nan(host(v), host(t.grad), f"tensor {i} against torch")
    g.assert_guards()


@pytest.mark.parametrize("bad", [NAN, INF, None], ids=["nan", "inf", "finite"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_by_global_norm_", "get_total_norm"])
def test_error_if_nonfinite(fn, dtype, bad):
    g = poisoned(dtype, bad, seed=802) if bad is not None else Guarded(dtype, 803, offset=1, sizes=NONFINITE_SIZES)

    def call(views, flag):
        if fn == "clip_grad_norm_":
            return gradclip.clip_grad_norm_([make_param(v) for v in views], 0.5, error_if_nonfinite=flag)
        if fn == "clip_by_global_norm_":
            return gradclip.clip_by_global_norm_(views, 0.5, error_if_nonfinite=flag)
        return gradclip.get_total_norm(views, error_if_nonfinite=flag)

    if bad is not None:
        with pytest.raises(RuntimeError, match="non-finite"):
            call(g.views, True)
        torch.cuda.synchronize()
        g.assert_untouched(f"{fn} after the error")
    else:
        other = Guarded(dtype, 803, offset=1, sizes=NONFINITE_SIZES)
        got, expected = call(g.views, True), call(other.views, False)
        assert_bitwise_equal(host(got), host(expected), "norm")
        for v, w in zip(g.views, other.views):
            assert_bitwise_equal(host(v), host(w), "gradient")
        g.assert_guards()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_error_if_nonfinite_on_a_total_beyond_float32(dtype):
    # The device's float64 total is finite, the stored float32 total is inf: the
    # finalize must hold the gradients (found in review: it scaled, then raised).
    grads = [torch.full((2,), 3e38, dtype=dtype, device=DEV), torch.ones(CHUNK + 1, dtype=dtype, device=DEV)]
    before = [host(x) for x in grads]
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_grad_norm_([make_param(x) for x in grads], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_by_global_norm_(grads, 1.0, error_if_nonfinite=True)
    torch.cuda.synchronize()
    for x, b in zip(grads, before):
        assert_bitwise_equal(host(x), b, "gradient after the error")
    total = gradclip.clip_grad_norm_([make_param(x) for x in grads], 1.0)
    assert float(total) == INF and 0 < float(grads[0][0]) < 1.0


# --------------------------------------------------------------------------
# Overflow safety
# --------------------------------------------------------------------------


@pytest.mark.parametrize("p", CUDA_NORM_ORDERS, ids=CUDA_NORM_IDS)
def test_float32_squares_beyond_float32_give_the_true_norm(p):
    x = torch.full((CHUNK + 5,), 1e25, dtype=torch.float32, device=DEV)
    y = make_torch(1000, torch.float32, seed=901, scale=1e25).to(DEV)
    originals = [host(x), host(y)]
    ref = ref_norm(originals, p)
    total = gradclip.get_total_norm([x, y], norm_type=p)
    assert math.isfinite(float(total))
    assert_norm_close(total, ref, p, torch.float32)
    print(f"p={p}: gradclip {float(total):.6g}, torch {float(torch.nn.utils.get_total_norm([x, y], p)):.6g}, "
          f"reference {ref:.6g}")
    clipped = gradclip.clip_grad_norm_([make_param(x), make_param(y)], 1.0, norm_type=p)
    assert_bitwise_equal(host(clipped), host(total), "clip_grad_norm_'s norm")
    for v, o in zip((x, y), originals):
        assert_scaled(host(v), o, 1.0, ref, norm_rtol(p))


def test_float16_norm_beyond_float16_range():
    grads = [torch.full((100,), 5120.0, dtype=torch.float16, device=DEV) for _ in range(4)]  # norm 51200 each
    total = gradclip.get_total_norm(grads)
    assert total.dtype == torch.float32 and float(total) == 102400.0  # exact; torch's float16 norm is inf
    originals = [host(g) for g in grads]
    assert float(gradclip.clip_grad_norm_([make_param(g) for g in grads], 1.0)) == 102400.0
    for g, o in zip(grads, originals):
        assert_scaled(host(g), o, 1.0, 102400.0, rtol=0.0)


@pytest.mark.parametrize("p", CUDA_NORM_ORDERS, ids=CUDA_NORM_IDS)
def test_float64_overflow_and_underflow_rescue(p):
    f64 = torch.float64
    big = torch.full((3 * CHUNK + 1,), 1e200, dtype=f64)
    tiny = torch.full((CHUNK + 7,), 3e-200, dtype=f64)
    # blocks of very different scales inside one tensor
    mixed = torch.cat([torch.full((CHUNK,), 1e-200, dtype=f64), make_torch(CHUNK, f64, 902),
                       torch.full((5,), 1e200, dtype=f64), make_torch(100, f64, 903, scale=1e-200)])
    noisy_tiny = make_torch(2 * CHUNK + 3, f64, 904, scale=1e-200)  # every square underflows
    noisy_big = make_torch(CHUNK + 11, f64, 905, scale=1e200)  # every square overflows
    originals = [big, tiny, mixed, noisy_tiny, noisy_big]
    tensors = [t.to(DEV, copy=True) for t in originals]
    rtol = norm_rtol(p)

    per = gradclip.tensor_norms(tensors, ord=p)
    assert_device_result(per, tensors[0], (5,), f64, "tensor_norms")
    values = host(per).tolist()
    for i, o in enumerate(originals):
        assert_norm_close(values[i], ref_norm([o], p), p, f64)
    if p == 2.0:
        assert math.isclose(values[0], 1e200 * math.sqrt(big.numel()), rel_tol=1e-12)
        assert math.isclose(values[1], 3e-200 * math.sqrt(tiny.numel()), rel_tol=1e-12)
    ref = ref_norm(originals, p)
    total = gradclip.get_total_norm(tensors, norm_type=p)
    assert_norm_close(total, ref, p, f64)
    print(f"p={p}: gradclip {values}, torch {[float(torch.linalg.vector_norm(t, p)) for t in tensors]}")

    clipped = gradclip.clip_grad_norm_([make_param(t) for t in tensors], 1.0, norm_type=p)
    assert_bitwise_equal(host(clipped), host(total), "clip_grad_norm_'s norm")
    for t, o in zip(tensors, originals):
        assert_scaled(host(t), o, 1.0, ref, rtol)


@pytest.mark.parametrize("p", [1500.0, 1e5], ids=["L1500", "L1e5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_very_large_p_gives_the_finite_norm(dtype, p):
    # Ordinary data: |x|^p overflows and underflows; the blocks are redone
    # divided by their largest |x| (core/norm_rescue.h). torch gives inf.
    g = Guarded(dtype, seed=906, sizes=[3 * CHUNK + 7, 100, CHUNK - 1], transposed=False)
    out_dtype = result_dtype_of(g.views)
    values = host(gradclip.tensor_norms(g.views, ord=p)).tolist()
    for got, o in zip(values, g.originals):
        assert_norm_close(got, ref_norm([o], p), p, out_dtype)
    assert_norm_close(gradclip.global_norm(g.views, ord=p), ref_norm(g.originals, p), p, out_dtype)
    g.assert_untouched()


# --------------------------------------------------------------------------
# Streams and CUDA graphs
# --------------------------------------------------------------------------


def test_runs_on_the_callers_stream():
    g = Guarded([torch.float32, torch.bfloat16], seed=1001, offset=1, sizes=[40 * CHUNK + 3, 1000, 17])
    params = g.params()
    new = [make_torch(o.shape, o.dtype, seed=1100 + i, scale=4.0) for i, o in enumerate(g.originals)]
    new_dev = [n.to(DEV) for n in new]
    ref = ref_norm(new, 2.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # `side` is busy for a while; the new values land only after that, in stream
        # order. Work launched on any other stream would see the old values.
        torch.cuda._sleep(50_000_000)
        for v, n in zip(g.views, new_dev):
            v.copy_(n)
        total = gradclip.clip_grad_norm_(params, ref / 3.0)
        clipped = [v.clone() for v in g.views]
        per = gradclip.tensor_norms(g.views)
        changed = gradclip.clip_by_value_(g.views, 0.01)
    side.synchronize()
    assert_norm_close(total, ref, 2.0, torch.float32)
    for c, n in zip(clipped, new):
        assert_scaled(host(c), n, ref / 3.0, ref, norm_rtol(2.0))
    for value, c in zip(host(per).tolist(), clipped):
        assert_norm_close(value, ref_norm([host(c)], 2.0), 2.0, torch.float32)
    assert bool(changed)
    expected = [make_param(host(c)) for c in clipped]
    torch.nn.utils.clip_grad_value_(expected, 0.01)
    for v, e in zip(g.views, expected):
        assert_bitwise_equal(host(v), e.grad, "clamped on the side stream")
    g.assert_guards()


GRAPH_CASES = ["clip_grad_norm_", "get_total_norm+clip_grads_with_norm_", "clip_by_norm_", "clip_grad_value_",
               "clip_by_value_"]


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_cuda_graph_capture_and_replay(case):
    sizes = [3 * CHUNK + 5, 1000, 17, 0, 9 * CHUNK + 3]
    g = Guarded([torch.float32, torch.bfloat16, torch.float16], seed=1201, offset=1, sizes=sizes)
    params = g.params()

    def step(ps):
        grads = [p.grad for p in ps]
        if case == "clip_grad_norm_":
            return gradclip.clip_grad_norm_(ps, 1.0)
        if case == "get_total_norm+clip_grads_with_norm_":
            total = gradclip.get_total_norm(grads)
            gradclip.clip_grads_with_norm_(ps, 1.0, total)
            return total
        if case == "clip_by_norm_":
            return gradclip.clip_by_norm_(grads, 1.0)
        if case == "clip_grad_value_":
            return gradclip.clip_grad_value_(ps, 0.5)
        return gradclip.clip_by_value_(grads, 0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch's graph docs ask
        for _ in range(3):
            step(params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(params)

    for trial, scale in enumerate([3.0, 1e-4, 0.3]):  # clipped, nothing to clip, clipped
        new = [make_torch(o.shape, o.dtype, seed=1300 + 100 * trial + i, scale=scale) for i, o in enumerate(g.originals)]
        for v, n in zip(g.views, new):
            v.copy_(n.to(DEV))
        graph.replay()
        eager = [make_param(n.to(DEV)) for n in new]
        expected = step(eager)
        torch.cuda.synchronize()
        if expected is None:
            assert captured is None
        elif expected.dtype == torch.bool:
            assert bool(captured) == bool(expected), f"replay {trial}: change flag"
        else:
            assert_bitwise_equal(host(captured), host(expected), f"replay {trial}: result")
        for i, (v, e) in enumerate(zip(g.views, eager)):
            assert_bitwise_equal(host(v), host(e.grad), f"replay {trial}: tensor {i}")
        if case == "clip_grad_norm_":
            assert_norm_close(captured, ref_norm(new, 2.0), 2.0, torch.float32)
    g.assert_guards()


# --------------------------------------------------------------------------
# 64-bit indexing
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_tensor_of_more_than_2_pow_31_elements():
    n = 2**31 + 17
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2**30:
        pytest.skip(f"needs 8 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    # The values of torch.ones(n, dtype=bf16) * 0.5, without the temporary.
    x = torch.full((n,), 0.5, dtype=torch.bfloat16, device=DEV)
    try:
        l2 = 0.5 * math.sqrt(n)  # the power sum n / 4 is exact in float64
        assert_norm_close(gradclip.get_total_norm(x), l2, 2.0, torch.float32)
        assert_norm_close(gradclip.global_norm(x, ord=1.0), 0.5 * n, 1.0, torch.float32)
        assert float(gradclip.global_norm(x, ord=INF)) == 0.5
        max_norm = l2 / 4.0
        total = gradclip.clip_by_global_norm_(x, max_norm)
        assert_norm_close(total, l2, 2.0, torch.float32)
        expected = float(expected_scaled(torch.tensor([0.5], dtype=torch.bfloat16), ref_coef(max_norm, l2))[0])
        assert expected == 0.125
        assert float(x.min()) == float(x.max()) == expected, "some elements were not scaled, or scaled twice"
        assert bool((x[2**31 - 5 :] == expected).all())  # across the 2^31 boundary to the end
    finally:
        del x
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Launch count
# --------------------------------------------------------------------------


def _device_activity(fn: Callable[[], object]) -> List[str]:
    """Names of the GPU activities (kernels, copies, memsets) of one call of fn,
    after one untimed warm-up call."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's own notices are not under test
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [name for name in names if "Sync" not in name]  # synchronisation records are not launches


@pytest.mark.parametrize("n_tensors, limit", [(200, 3), (2500, 5)])
def test_launch_count(n_tensors, limit):
    rng = np.random.default_rng(n_tensors)
    sizes = rng.integers(1, 50_000 if n_tensors <= 200 else 2_000, size=n_tensors).tolist()
    g = Guarded(torch.float32, seed=1401, sizes=sizes, transposed=False)
    params, theirs = g.params(), g.torch_params()
    clip = _device_activity(lambda: gradclip.clip_grad_norm_(params, 1e-3))
    noclip = _device_activity(lambda: gradclip.clip_grad_norm_(params, 1e9))
    torch_clip = _device_activity(lambda: torch.nn.utils.clip_grad_norm_(theirs, 1e-3, foreach=True))
    print(f"{n_tensors} tensors: gradclip {len(clip)} GPU activities {sorted(set(clip))}, "
          f"unclipped {len(noclip)}; torch (foreach) {len(torch_clip)}")
    assert any("norm_kernel" in name for name in clip), f"the profiler recorded no gradclip kernel: {clip}"
    for what, names in (("clipped", clip), ("unclipped", noclip)):
        copies = [name for name in names if name.startswith(("Memcpy", "Memset"))]
        assert not copies, f"{what}: copies or memsets in the call: {names}"
        assert len(names) <= limit, f"{what}: {len(names)} kernel launches, at most {limit} allowed: {names}"


# --------------------------------------------------------------------------
# No host synchronisation
# --------------------------------------------------------------------------

SYNC_CASES = [
    "get_total_norm", "global_norm", "tensor_norms", "tensor_norms-repeat", "clip_grad_norm_-clip",
    "clip_grad_norm_-noclip", "clip_grads_with_norm_-tensor", "clip_grads_with_norm_-float",
    "clip_by_global_norm_", "clip_by_norm_", "normalize_", "clip_grad_value_", "clip_by_value_",
]


@pytest.mark.parametrize("case", SYNC_CASES)
def test_no_host_synchronisation(case):
    g = Guarded([torch.float32, torch.bfloat16], seed=1501, offset=1, sizes=[CHUNK + 1, 100, 3 * CHUNK + 5, 0])
    params, views = g.params(), g.views
    total_t = gradclip.get_total_norm(views)
    runs: Dict[str, Callable[[], object]] = {
        "get_total_norm": lambda: gradclip.get_total_norm(views),
        "global_norm": lambda: gradclip.global_norm(views, ord=3.5),
        "tensor_norms": lambda: gradclip.tensor_norms(views),
        "tensor_norms-repeat": lambda: gradclip.tensor_norms([views[0], views[1], views[0]]),
        "clip_grad_norm_-clip": lambda: gradclip.clip_grad_norm_(params, 1e-3),
        "clip_grad_norm_-noclip": lambda: gradclip.clip_grad_norm_(params, 1e9),
        "clip_grads_with_norm_-tensor": lambda: gradclip.clip_grads_with_norm_(params, 0.5, total_t),
        "clip_grads_with_norm_-float": lambda: gradclip.clip_grads_with_norm_(params, 0.5, 12.0),
        "clip_by_global_norm_": lambda: gradclip.clip_by_global_norm_(views, 1e-3, ord=1.0),
        "clip_by_norm_": lambda: gradclip.clip_by_norm_(views, 1e-3),
        "normalize_": lambda: gradclip.normalize_(views, 2.0),
        "clip_grad_value_": lambda: gradclip.clip_grad_value_(params, 0.1),
        "clip_by_value_": lambda: gradclip.clip_by_value_(views, 0.1),
    }
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call raises
    try:
        runs[case]()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    g.assert_guards()


@pytest.mark.parametrize("policy", ["propagate", "skip"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
def test_folded_attach_steps_without_host_synchronisation(policy, scaled):
    """attach() folded into a fused AdamW step on CUDA: the norm, the coefficient, the
    grad_scale and (under 'skip') found_inf stay on the device, so optimizer.step()
    (or a GradScaler's step) never waits for it; parameters equal clip-then-step."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8)).cuda()
    ref = copy.deepcopy(ours)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if scaled else None
    handle = gradclip.attach(opt, global_clipnorm=0.05, nonfinite=policy)
    assert handle.fold
    for step in range(5):
        x = torch.randn(16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = model(x).square().sum()
            (scaler.scale(loss) if scaled and o is opt else loss).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call raises
        try:
            if scaled:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        assert handle.last.clipped and not handle.last.skipped
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

ARRAY_CALLS: Dict[str, Callable[[list], object]] = {
    "global_norm": lambda xs: gradclip.global_norm(xs),
    "tensor_norms": lambda xs: gradclip.tensor_norms(xs),
    "clip_by_global_norm_": lambda xs: gradclip.clip_by_global_norm_(xs, 1e-3),
    "clip_by_value_": lambda xs: gradclip.clip_by_value_(xs, 1e-3),
    "clip_by_norm_": lambda xs: gradclip.clip_by_norm_(xs, 1e-3),
    "normalize_": lambda xs: gradclip.normalize_(xs, 1e-3),
}


@pytest.mark.parametrize("cpu_first", [False, True], ids=["cuda-first", "cpu-first"])
@pytest.mark.parametrize("fn", list(ARRAY_CALLS))
def test_cpu_and_cuda_tensors_in_one_call_are_refused(fn, cpu_first):
    cuda_a = make_torch(300, torch.float32, 1).to(DEV)
    cuda_b = make_torch(CHUNK + 1, torch.float32, 2).to(DEV)
    cpu_c = make_torch(50, torch.float32, 3)
    if cpu_first:
        items, pattern = [cpu_c, cuda_a, cuda_b], r"arrays\[1\]: is on cuda:0 but arrays\[0\] is on the CPU"
    else:
        items, pattern = [cuda_a, cuda_b, cpu_c], r"arrays\[2\]: is on the CPU but arrays\[0\] is on cuda:0"
    before = [host(t).clone() for t in items]
    with pytest.raises(ValueError, match=pattern):
        ARRAY_CALLS[fn](items)
    torch.cuda.synchronize()
    for i, (t, b) in enumerate(zip(items, before)):
        assert_bitwise_equal(host(t), b, f"arrays[{i}] after the error")


@pytest.mark.parametrize("bad", ["strided", "overlap", "int32"])
def test_invalid_cuda_inputs_are_refused_before_anything_is_written(bad):
    good = make_torch(1000, torch.float32, 5).to(DEV)
    base = make_torch(2000, torch.float32, 6).to(DEV)
    if bad == "strided":
        items, pattern = [good, base[::2]], r"arrays\[1\]: is strided"
    elif bad == "overlap":
        items, pattern = [good, base[:1500], base[1000:]], r"arrays\[2\]: overlaps the memory of arrays\[1\]"
    else:
        items, pattern = [good, torch.ones(10, dtype=torch.int32, device=DEV)], r"arrays\[1\]: int32 data cannot"
    error = TypeError if bad == "int32" else ValueError
    before = [host(t).clone() for t in items]
    for call in (ARRAY_CALLS["clip_by_global_norm_"], ARRAY_CALLS["clip_by_value_"]):
        with pytest.raises(error, match=pattern):
            call(items)
    torch.cuda.synchronize()
    for t, b in zip(items, before):
        assert_bitwise_equal(host(t), b, "after the error")


def test_drop_in_norm_across_cpu_and_cuda_follows_torch():
    # torch's clip_grad_norm_ / get_total_norm accept gradients on several devices
    # (per-device norms, combined on the first one); the drop-ins follow it.
    grads = [make_torch(1000, torch.float32, 7).to(DEV), make_torch(500, torch.float32, 8),
             make_torch(CHUNK + 1, torch.float32, 9).to(DEV)]
    ours, theirs = [make_param(x.clone()) for x in grads], [make_param(x.clone()) for x in grads]
    total = gradclip.clip_grad_norm_(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert total.device == expected.device == grads[0].device and total.dtype == expected.dtype
    assert_close_to_torch_norm(float(total), float(expected), 2.0, torch.float32, "clip_grad_norm_")
    assert_close_to_torch([p.grad for p in ours], [p.grad for p in theirs], "clip_grad_norm_ across devices")
    got = gradclip.get_total_norm(grads)
    assert got.device == grads[0].device
    assert_close_to_torch_norm(float(got), float(torch.nn.utils.get_total_norm(grads)), 2.0, torch.float32,
                               "get_total_norm")


def test_drop_in_value_clip_and_given_norm_across_cpu_and_cuda_follow_torch():
    # torch's clip_grad_value_ and clip_grads_with_norm_ work on each device's
    # gradients where they lie; a parameter without a gradient is skipped.
    grads = [make_torch(1000, torch.float32, 17).to(DEV), make_torch(500, torch.bfloat16, 18),
             make_torch(CHUNK + 1, torch.float32, 19).to(DEV)]
    ours, theirs = [make_param(x.clone()) for x in grads], [make_param(x.clone()) for x in grads]
    ours.append(torch.nn.Parameter(torch.ones(3)))
    theirs.append(torch.nn.Parameter(torch.ones(3)))
    gradclip.clip_grad_value_(ours, 0.3)
    torch.nn.utils.clip_grad_value_(theirs, 0.3)
    for i, (a, b) in enumerate(zip(ours[:3], theirs[:3])):
        assert a.grad.device == b.grad.device
        assert_same_or_both_nan(host(a.grad), host(b.grad), f"clip_grad_value_ across devices, tensor {i}")
    for total in (torch.tensor(40.0, device=DEV), torch.tensor(40.0), 40.0):
        ours, theirs = [make_param(x.clone()) for x in grads], [make_param(x.clone()) for x in grads]
        gradclip.clip_grads_with_norm_(ours, 1.0, total)
        torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.as_tensor(total))
        for a, b in zip(ours, theirs):
            assert a.grad.device == b.grad.device
            assert_close_to_torch([a.grad], [b.grad], f"clip_grads_with_norm_ across devices ({total!r})")


def test_error_across_devices_names_the_callers_index_and_writes_nothing():
    good_cuda = make_torch(1000, torch.float32, 21).to(DEV)
    good_cpu = make_torch(100, torch.float32, 22) * 10.0
    bad = torch.ones(8, dtype=torch.int32)  # on the CPU, after a CUDA and a CPU gradient
    params = [make_param(good_cuda), make_param(good_cpu), make_param(bad.float())]
    params[2].grad = None
    holder = types.SimpleNamespace(grad=bad)  # torch would fail on it too; we must name index 3
    before = [host(good_cuda), host(good_cpu)]
    for call in (lambda ps: gradclip.clip_grad_value_(ps, 0.01),
                 lambda ps: gradclip.clip_grad_norm_(ps, 0.01),
                 lambda ps: gradclip.clip_grads_with_norm_(ps, 0.01, 100.0)):
        with pytest.raises(TypeError, match=r"parameters\[3\]\.grad: int32 data cannot"):
            call(params + [holder])
        torch.cuda.synchronize()
        assert_bitwise_equal(host(good_cuda), before[0], "cuda gradient after the error")
        assert_bitwise_equal(host(good_cpu), before[1], "cpu gradient after the error")


# --------------------------------------------------------------------------
# CuPy, and the training front end
# --------------------------------------------------------------------------


def test_cupy_arrays():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CuPy's import-time notices (e.g. about CUDA paths) are not under test
        cupy = pytest.importorskip("cupy")
    specs = [(CHUNK + 1, np.float32), (100, np.float64), (3 * CHUNK + 5, np.float16), (0, np.float32)]
    originals = [make_numpy(n, dt, seed=1601 + i) for i, (n, dt) in enumerate(specs)]
    arrays = [cupy.asarray(a) for a in originals]
    ref = ref_norm(originals, 2.0)

    norm = gradclip.global_norm(arrays)
    assert isinstance(norm, cupy.ndarray) and norm.shape == () and norm.dtype == np.float64
    assert_norm_close(float(norm), ref, 2.0, np.float64)
    per = gradclip.tensor_norms(arrays)
    assert isinstance(per, cupy.ndarray) and per.shape == (4,) and per.dtype == np.float64
    for value, o in zip(cupy.asnumpy(per).tolist(), originals):
        assert_norm_close(value, ref_norm([o], 2.0), 2.0, np.float64)

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        total = gradclip.clip_by_global_norm_(arrays, ref / 3.0)
    stream.synchronize()
    assert_norm_close(float(total), ref, 2.0, np.float64)
    for a, o in zip(arrays, originals):
        assert_scaled(cupy.asnumpy(a), o, ref / 3.0, ref, norm_rtol(2.0))

    before = [cupy.asnumpy(a) for a in arrays]
    changed = gradclip.clip_by_value_(arrays, 0.01)
    assert isinstance(changed, cupy.ndarray) and changed.dtype == np.bool_ and bool(changed)
    for a, b in zip(arrays, before):
        bound = b.dtype.type(np.float32(0.01)) if b.dtype != np.float64 else 0.01
        assert_bitwise_equal(cupy.asnumpy(a), np.clip(b, -bound, bound), "cupy clip_by_value_")


def test_training_front_end_on_cuda():
    g = Guarded([torch.float32, torch.bfloat16], seed=1701, offset=1, sizes=[CHUNK + 1, 100, 17])
    ref = ref_norm(g.originals, 2.0)
    record = gradclip.clip_gradients_(g.params(), global_clipnorm=ref / 3.0)
    assert math.isclose(record.total_norm, ref, rel_tol=norm_rtol(2.0))
    assert record.clipped
    for v, o in zip(g.views, g.originals):
        assert_scaled(host(v), o, ref / 3.0, ref, norm_rtol(2.0))
    g.assert_guards()
