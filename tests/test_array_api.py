"""The array API (global_norm, tensor_norms, clip_by_global_norm_, clip_by_value_,
clip_by_norm_, normalize_) on NumPy arrays, torch tensors and other DLPack
producers, against the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradclip
from conftest import (
    INF,
    NAN,
    NORM_IDS,
    NORM_ORDERS,
    NUMPY_DTYPES,
    NUMPY_DTYPE_IDS,
    SIZES,
    SMALL_SIZES,
    TORCH_DTYPES,
    TORCH_DTYPE_IDS,
    as_f64,
    assert_bitwise_equal,
    assert_norm_close,
    assert_same_or_both_nan,
    assert_scaled,
    bits,
    check_read_only_script,
    clone_all,
    dtype_name,
    expected_scaled,
    make_numpy,
    make_torch,
    norm_rtol,
    ref_norm,
    ref_norms,
    result_dtype_of,
)

# One "framework x dtype" axis: NumPy has no bfloat16, torch has all four.
KINDS = [("numpy", d) for d in NUMPY_DTYPES] + [("torch", d) for d in TORCH_DTYPES]
KIND_IDS = [f"np-{i}" for i in NUMPY_DTYPE_IDS] + [f"torch-{i}" for i in TORCH_DTYPE_IDS]


def arrays_for(kind, size: int, seed: int, scale: float = 1.0):
    framework, dtype = kind
    make = make_numpy if framework == "numpy" else make_torch
    return [make(size, dtype, seed, scale), make((4, 5), dtype, seed + 1, scale), make(9, dtype, seed + 2, scale)]


def check_norm_result(result, arrays, expected: float, p: float):
    """Types per the spec: Python float for NumPy input, 0-d float32/float64
    tensor for torch input."""
    if isinstance(arrays[0], torch.Tensor):
        assert isinstance(result, torch.Tensor) and result.dim() == 0
        assert result.dtype == result_dtype_of(arrays)
        assert_norm_close(result, expected, p, result.dtype)
    else:
        assert type(result) is float
        assert_norm_close(result, expected, p)


def exact_norm_or_bracket(result, arrays, p):
    """(norm, rtol) for assert_scaled: the returned float64 norm is exactly what
    was used (rtol 0); a float32 torch result only brackets it."""
    if isinstance(result, torch.Tensor) and result.dtype == torch.float32:
        return ref_norm(arrays, p), norm_rtol(p)
    return float(result), 0.0


# --------------------------------------------------------------------------
# global_norm / tensor_norms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_global_norm(kind, p, size):
    arrays = arrays_for(kind, size, seed=size + 100)
    before = clone_all(arrays)
    result = gradclip.global_norm(arrays, p)
    check_norm_result(result, arrays, ref_norm(arrays, p), p)
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b, "global_norm input")


@pytest.mark.parametrize("size", SMALL_SIZES + [32769])
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_tensor_norms(kind, p, size):
    arrays = arrays_for(kind, size, seed=size + 200)
    result = gradclip.tensor_norms(arrays, p)
    if isinstance(arrays[0], torch.Tensor):
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float64
        values = result.numpy()
    else:
        assert isinstance(result, np.ndarray) and result.dtype == np.float64
        values = result
    assert values.shape == (len(arrays),)
    for got, a in zip(values, arrays):
        assert_norm_close(got, ref_norm([a], p), p)
    # the same pass's total is consistent with the per-array norms
    assert_norm_close(gradclip.global_norm(arrays, p), ref_norm(ref_norms(arrays, p), p), p,
                      result_dtype_of(arrays) if isinstance(arrays[0], torch.Tensor) else np.float64,
                      rtol=2 * norm_rtol(p))


def test_tensor_norms_lists_duplicates_once_per_entry():
    a = make_numpy(50, np.float32, 1)
    b = make_numpy(7, np.float64, 2)
    norms = gradclip.tensor_norms([a, b, a])
    assert norms.shape == (3,) and norms[0] == norms[2]
    assert gradclip.global_norm([a, b, a]) == gradclip.global_norm([a, b])


def test_single_array_and_generator_forms():
    a = make_numpy((6, 6), np.float32, 3)
    assert gradclip.global_norm(a) == gradclip.global_norm([a]) == gradclip.global_norm(x for x in [a])
    assert gradclip.tensor_norms(a).shape == (1,)


def test_empty_inputs():
    assert gradclip.global_norm([]) == 0.0 and type(gradclip.global_norm([])) is float
    norms = gradclip.tensor_norms([])
    assert isinstance(norms, np.ndarray) and norms.shape == (0,) and norms.dtype == np.float64
    assert gradclip.clip_by_global_norm_([], 1.0) == 0.0
    assert gradclip.clip_by_value_([], 1.0) is False
    assert gradclip.clip_by_norm_([], 1.0).shape == (0,)
    assert gradclip.normalize_([]) == 0.0
    empties = [np.zeros(0, np.float32), np.zeros((0, 3), np.float64)]
    assert gradclip.global_norm(empties) == 0.0
    assert gradclip.tensor_norms(empties).tolist() == [0.0, 0.0]
    assert gradclip.clip_by_value_(empties, 0.0) is False
    t = gradclip.global_norm([torch.zeros(0, dtype=torch.bfloat16)])
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and float(t) == 0.0


def test_read_only_arrays_can_be_measured():
    a = make_numpy(100, np.float32, 4)
    a.flags.writeable = False
    assert_norm_close(gradclip.global_norm([a]), ref_norm([a], 2.0), 2.0)
    assert gradclip.tensor_norms([a]).shape == (1,)


# --------------------------------------------------------------------------
# clip_by_global_norm_
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_clip_by_global_norm(kind, p, size):
    arrays = arrays_for(kind, size, seed=size + 300)
    before = clone_all(arrays)
    ref = ref_norm(before, p)
    max_norm = ref / 4
    result = gradclip.clip_by_global_norm_(arrays, max_norm, p)
    check_norm_result(result, before, ref, p)
    norm, rtol = exact_norm_or_bracket(result, before, p)
    for a, b in zip(arrays, before):
        assert dtype_name(a) == dtype_name(b) and a.shape == b.shape
        assert_scaled(a, b, max_norm, norm, rtol)


@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_clip_by_global_norm_below_max_is_bitwise_untouched(kind, p):
    arrays = arrays_for(kind, 1000, seed=301)
    before = clone_all(arrays)
    ref = ref_norm(before, p)
    gradclip.clip_by_global_norm_(arrays, ref * 2, p)
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5, 3.0])
def test_clip_by_global_norm_eps(eps):
    arrays = arrays_for(("numpy", np.float64), 100, seed=302)
    before = clone_all(arrays)
    ref = ref_norm(before, 2.0)
    norm = gradclip.clip_by_global_norm_(arrays, ref / 2, eps=eps)
    for a, b in zip(arrays, before):
        assert_scaled(a, b, ref / 2, norm, 0.0, eps=eps)


def test_clip_by_global_norm_error_if_nonfinite():
    arrays = arrays_for(("numpy", np.float32), 100, seed=303)
    arrays[1][2, 2] = np.inf
    before = clone_all(arrays)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_by_global_norm_(arrays, 1.0, error_if_nonfinite=True)
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)
    assert gradclip.clip_by_global_norm_(arrays, 1.0) == INF
    assert (arrays[0] == 0).all() and np.isnan(arrays[1][2, 2])


# --------------------------------------------------------------------------
# clip_by_value_
# --------------------------------------------------------------------------


def bound_in(dtype_str: str, v: float) -> float:
    """The clip bound rounded to the dtype as torch does (double -> float -> 16 bits)."""
    if dtype_str == "float64":
        return v
    if dtype_str == "bfloat16":
        return float(torch.tensor(v, dtype=torch.float32).to(torch.bfloat16))
    f = np.float32(v)
    return float(f) if dtype_str == "float32" else float(f.astype(np.float16))


def expected_clamp(x, v: float):
    """np.clip in the array's own dtype with the rounded bound; NaN stays NaN."""
    d = dtype_name(x)
    b = bound_in(d, v)
    values = as_f64(x)
    with np.errstate(invalid="ignore"):
        out = np.where(values > b, b, np.where(values < -b, -b, values))
    return out, bool(((values > b) | (values < -b)).any())


@pytest.mark.parametrize("clip_value", [0.0, 0.1, 0.5, 2.0, INF])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_clip_by_value(kind, size, clip_value):
    arrays = arrays_for(kind, size, seed=size + 400, scale=1.5)
    if size > 3:
        arrays[0][size // 2] = NAN
        arrays[0][size - 1] = -INF
        arrays[0][0] = -0.0
    before = clone_all(arrays)
    changed = gradclip.clip_by_value_(arrays, clip_value)
    any_changed = False
    for a, b in zip(arrays, before):
        expected, did = expected_clamp(b, clip_value)
        any_changed |= did
        got = as_f64(a)
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        ok = np.isnan(expected) | (got == expected)
        assert ok.all(), f"first mismatch at {np.flatnonzero(~ok.ravel())[:1]}"
        unchanged = ~(np.abs(as_f64(b)) > bound_in(dtype_name(b), clip_value))
        # elements that need no clipping keep their exact bits (-0.0, NaN payloads)
        assert np.array_equal(bits(a)[unchanged.ravel()], bits(b)[unchanged.ravel()])
    assert changed is any_changed


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_clip_by_value_returns_false_and_writes_nothing_when_inside(kind):
    arrays = arrays_for(kind, 4000, seed=401, scale=0.1)
    arrays[0][7] = NAN  # NaN is not "outside": nothing to change
    before = clone_all(arrays)
    assert gradclip.clip_by_value_(arrays, 10.0) is False
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)
    assert gradclip.clip_by_value_(arrays, 0.0) is True


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=TORCH_DTYPE_IDS)
def test_clip_by_value_torch_matches_torch_clamp(dtype):
    x = make_torch(3001, dtype, 402, scale=2.0)
    x[5] = NAN
    expected = x.clone().clamp_(-0.7, 0.7)
    assert gradclip.clip_by_value_(x, 0.7) is True
    assert_same_or_both_nan(x, expected)


# --------------------------------------------------------------------------
# clip_by_norm_ (each array on its own)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SMALL_SIZES + [32767, 65537])
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_clip_by_norm_per_array(kind, p, size):
    arrays = arrays_for(kind, size, seed=size + 500)
    arrays[2] = arrays[2] * 0.001  # this one stays below max_norm
    before = clone_all(arrays)
    refs = ref_norms(before, p)
    max_norm = float(np.median(refs[:2])) / 2 if size else refs[1] / 2
    result = gradclip.clip_by_norm_(arrays, max_norm, p)
    if isinstance(arrays[0], torch.Tensor):
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float64
        result = result.numpy()
    assert isinstance(result, np.ndarray) and result.dtype == np.float64 and result.shape == (3,)
    for got, a, b, r in zip(result, arrays, before, refs):
        assert_norm_close(got, r, p)
        if r * (1 + norm_rtol(p)) + 1e-6 <= max_norm:
            assert_bitwise_equal(a, b, "array below max_norm")
        else:
            assert_scaled(a, b, max_norm, float(got), 0.0)  # returned float64 norm is exact


def test_clip_by_norm_nonfinite_stays_in_its_array():
    a, b, c = (make_numpy(40, np.float32, s, scale=3.0) for s in (501, 502, 503))
    a[3] = NAN
    b[5] = INF
    c_before = c.copy()
    norms = gradclip.clip_by_norm_([a, b, c], 1.0)
    assert math.isnan(norms[0]) and norms[1] == INF
    assert np.isnan(a).all()
    assert np.isnan(b[5]) and (np.delete(b, 5) == 0).all()
    assert_scaled(c, c_before, 1.0, float(norms[2]), 0.0)


def test_clip_by_norm_duplicate_scaled_once():
    a = make_numpy(64, np.float32, 504, scale=2.0)
    before = a.copy()
    norms = gradclip.clip_by_norm_([a, a], 1.0)
    assert norms[0] == norms[1]
    assert_scaled(a, before, 1.0, float(norms[0]), 0.0)


# --------------------------------------------------------------------------
# normalize_
# --------------------------------------------------------------------------

# After scaling, the norm equals the target up to the rounding of each element
# (unit roundoff u of the dtype) and of the float32 coefficient (2^-24).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
TINY = {"float64": 2.0**-1022, "float32": 2.0**-126, "float16": 2.0**-14, "bfloat16": 2.0**-126}


@pytest.mark.parametrize("size", [1, 17, 32769])
@pytest.mark.parametrize("p", NORM_ORDERS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("target", [1.0, 0.3, 50.0])
def test_normalize(kind, p, size, target):
    arrays = arrays_for(kind, size, seed=size + 600)
    before = clone_all(arrays)
    ref = ref_norm(before, p)
    result = gradclip.normalize_(arrays, target, p)
    check_norm_result(result, before, ref, p)
    coef_norm, rtol = exact_norm_or_bracket(result, before, p)
    c = target / coef_norm
    for a, b in zip(arrays, before):
        # scale = target / norm, expressed through assert_scaled's rule with eps 0
        # and max_norm = target (the coefficient exceeds 1 when the norm is below target)
        lo, hi = c * (1 - rtol), c * (1 + rtol)
        e1, e2 = expected_scaled(b, lo), expected_scaled(b, hi)
        got = as_f64(a)
        assert ((got >= np.minimum(e1, e2)) & (got <= np.maximum(e1, e2))).all()
    # The norm afterwards is the target up to one rounding per element: relative
    # u' = u + 2^-24 (+ the norm's own rtol) for normal results, and at most
    # tiny * u absolute for results in the subnormal range (half the subnormal
    # spacing). Minkowski (p >= 1) or the subadditivity of t^p (p < 1) turns
    # that into a bound on the norm.
    after = float(gradclip.global_norm(arrays, p))
    n = sum(int(np.prod(x.shape)) for x in arrays)
    name = max((dtype_name(x) for x in arrays), key=lambda d: UNIT_ROUNDOFF[d])
    u, tiny = UNIT_ROUNDOFF[name], TINY[name]
    rel = u + 2.0**-24 + 4 * norm_rtol(p)
    absolute = tiny * u
    if p >= 1:
        spread = absolute * (1.0 if p == INF else n ** (1.0 / p))
        lo, hi = target * (1 - rel) - spread, target * (1 + rel) + spread
    else:
        lo = max(target**p * (1 - rel) ** p - n * absolute**p, 0.0) ** (1.0 / p)
        hi = (target**p * (1 + rel) ** p + n * absolute**p) ** (1.0 / p)
    assert lo <= after <= hi, f"norm after normalize_ {after!r} not in [{lo!r}, {hi!r}]"


def test_normalize_all_zero_is_untouched_and_returns_zero():
    arrays = [np.zeros(10, np.float32), -np.zeros(5, np.float64)]
    before = clone_all(arrays)
    assert gradclip.normalize_(arrays, 2.0) == 0.0
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)


def test_normalize_scales_up_and_down():
    small = [np.full(4, 0.25, np.float64)]  # L2 norm 0.5
    assert gradclip.normalize_(small, 2.0) == 0.5
    assert (small[0] == 1.0).all()
    big = [np.full(4, 8.0, np.float32)]  # L2 norm 16
    assert gradclip.normalize_(big, 1.0) == 16.0
    assert (big[0] == 0.5).all()


def test_normalize_nonfinite():
    a = np.array([1.0, INF, 2.0], np.float32)
    assert gradclip.normalize_([a]) == INF
    assert a[0] == 0 and np.isnan(a[1]) and a[2] == 0
    b = np.array([1.0, NAN], np.float64)
    assert math.isnan(gradclip.normalize_([b]))
    assert np.isnan(b).all()


# --------------------------------------------------------------------------
# Layouts: any dense stride order is flat memory
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a.T,
        lambda a: a[::-1],
        lambda a: a[:, ::-1],
        lambda a: a[::-1, ::-1].T,
        lambda a: np.asfortranarray(a),
        lambda a: a.reshape(5, 3, 4).transpose(2, 0, 1),
    ],
    ids=["T", "rev0", "rev1", "rev-both-T", "fortran", "3d-perm"],
)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=NUMPY_DTYPE_IDS)
def test_dense_numpy_layouts(view, dtype):
    base = make_numpy((15, 4), dtype, 700, scale=3.0)
    v = view(base.copy())
    before = v.copy()
    ref = ref_norm([before], 2.0)
    norm = gradclip.clip_by_global_norm_([v], ref / 3)
    assert_norm_close(norm, ref, 2.0)
    assert_scaled(v, before, ref / 3, norm, 0.0)  # element positions preserved
    w = view(base.copy())
    w_before = w.copy()
    gradclip.clip_by_value_(w, 0.5)
    expected, _ = expected_clamp(w_before, 0.5)
    assert np.array_equal(as_f64(w), expected)


def test_torch_permuted_and_expanded_dims_of_size_one():
    t = make_torch((2, 1, 3, 4), torch.float32, 701).permute(3, 1, 0, 2)
    assert not t.is_contiguous()
    before = t.clone()
    gradclip.clip_by_global_norm_(t, 0.1)
    assert_scaled(t, before, 0.1, ref_norm([before], 2.0), norm_rtol(2.0))


# --------------------------------------------------------------------------
# Other DLPack producers (the capsule path)
# --------------------------------------------------------------------------


class Producer:
    """A minimal DLPack producer that is neither a NumPy array nor a torch tensor."""

    def __init__(self, array, legacy: bool = False):
        self._a = array
        self._legacy = legacy

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class VersionedProducer(Producer):
    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return self._a.__dlpack__(max_version=max_version)


class LegacyProducer(Producer):
    def __dlpack__(self, stream=None):  # no max_version: the consumer must retry without it
        return self._a.__dlpack__()


class FailingProducer(Producer):
    def __dlpack__(self, **kwargs):
        raise BufferError("producer says no")


@pytest.mark.parametrize("cls", [VersionedProducer, LegacyProducer])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=NUMPY_DTYPE_IDS)
def test_dlpack_producers_are_clipped_in_place(cls, dtype):
    a = make_numpy((7, 9), dtype, 710, scale=2.0)
    before = a.copy()
    ref = ref_norm([before], 2.0)
    assert gradclip.global_norm(cls(a)) == gradclip.global_norm(before)
    norm = gradclip.clip_by_global_norm_([cls(a)], ref / 2)
    assert type(norm) is float
    assert_scaled(a, before, ref / 2, norm, 0.0)  # the producer's memory was written
    assert gradclip.clip_by_value_([cls(a)], 0.01) is True
    assert np.abs(a).max() == bound_in(np.dtype(dtype).name, 0.01)


def test_dlpack_read_only_flag_is_honoured():
    a = make_numpy(30, np.float32, 711)
    a.flags.writeable = False
    assert_norm_close(gradclip.global_norm([VersionedProducer(a)]), ref_norm([a], 2.0), 2.0)
    good = make_numpy(30, np.float32, 712, scale=10.0)
    good_before = good.copy()
    with pytest.raises(ValueError, match=r"arrays\[1\]: is read-only"):
        gradclip.clip_by_global_norm_([good, VersionedProducer(a)], 0.1)
    assert_bitwise_equal(good, good_before)


def test_dlpack_producer_failure_is_reported():
    with pytest.raises(ValueError, match=r"arrays\[0\]: __dlpack__\(\) failed \(.*producer says no"):
        gradclip.global_norm([FailingProducer(np.zeros(3, np.float32))])


def test_mixed_frameworks_in_one_list():
    a = make_numpy(50, np.float32, 713)
    t = make_torch(60, torch.bfloat16, 714)
    w = VersionedProducer(make_numpy(70, np.float64, 715))
    ref = ref_norm([a, t, w._a], 2.0)
    got = gradclip.global_norm([a, t, w])
    assert type(got) is float  # the first entry is a NumPy array
    assert_norm_close(got, ref, 2.0)
    got_t = gradclip.global_norm([t, a, w])
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float64  # float64 present


# --------------------------------------------------------------------------
# Views with a storage offset, 0-d arrays, many small tensors
# --------------------------------------------------------------------------


def test_torch_views_with_storage_offset_touch_only_their_elements():
    base = torch.arange(-40, 40, dtype=torch.float32) / 4
    before = base.clone()
    v = base[13:37]  # offset 13: the DLPack byte_offset / data pointer must be honoured
    assert v.storage_offset() == 13
    assert_norm_close(gradclip.global_norm(v), ref_norm([v], 2.0), 2.0, torch.float32)
    assert gradclip.clip_by_value_(v, 1.0) is True
    assert_bitwise_equal(base[:13], before[:13])
    assert_bitwise_equal(base[37:], before[37:])
    assert (base[13:37] == before[13:37].clamp(-1, 1)).all()
    m = (torch.arange(60, dtype=torch.float64).reshape(6, 10) - 30) / 7
    m_before = m.clone()
    w = m[2:5].t()  # offset 20, transposed, dense
    ref = ref_norm([w], 2.0)
    norm = gradclip.clip_by_global_norm_(w, ref / 2)
    assert_scaled(m[2:5], m_before[2:5], ref / 2, float(norm), 0.0)
    assert_bitwise_equal(m[:2], m_before[:2])
    assert_bitwise_equal(m[5:], m_before[5:])


def test_numpy_views_with_offset_touch_only_their_elements():
    base = make_numpy((8, 9), np.float16, 720, scale=4.0)
    before = base.copy()
    v = base[3:6, :]
    ref = ref_norm([v], 1.0)
    norm = gradclip.clip_by_global_norm_(v, ref / 3, 1.0)
    assert_scaled(base[3:6], before[3:6], ref / 3, norm, 0.0)
    assert_bitwise_equal(base[:3], before[:3])
    assert_bitwise_equal(base[6:], before[6:])


def test_zero_dimensional_inputs():
    t = torch.tensor(-3.0)
    assert float(gradclip.global_norm(t)) == 3.0
    assert gradclip.clip_by_value_(t, 1.0) is True and t.item() == -1.0
    a = np.array(5.0, np.float32)
    assert gradclip.global_norm(a) == 5.0
    assert gradclip.clip_by_value_(a, 2.0) is True and a == np.float32(2.0)


def test_size_one_dims_with_arbitrary_strides_are_dense():
    s = torch.arange(4000, dtype=torch.float32).as_strided((4, 1), (1, 1000))
    assert float(gradclip.global_norm(s, 1.0)) == 0 + 1 + 2 + 3
    cl = make_torch((2, 3, 4, 5), torch.float32, 721).contiguous(memory_format=torch.channels_last)
    assert_norm_close(gradclip.global_norm(cl), ref_norm([cl], 2.0), 2.0, torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_tens_of_thousands_of_tiny_arrays(threads, restore_threads):
    # Many chunks per task (task grouping) and > 2^18 elements in total.
    gradclip.set_num_threads(threads)
    rng = np.random.default_rng(722)
    dtypes = [np.float32, np.float64, np.float16]
    arrays = [(rng.standard_normal(1 + i % 9) * 3).astype(dtypes[i % 3]) for i in range(60_000)]
    assert sum(a.size for a in arrays) > (1 << 18)
    before = clone_all(arrays)
    for p in (1.0, 2.0, INF):
        assert_norm_close(gradclip.global_norm(arrays, p), ref_norm(before, p), p)
    norms = gradclip.tensor_norms(arrays)
    assert norms.shape == (60_000,)
    assert_norm_close(norms[12345], ref_norm([before[12345]], 2.0), 2.0)
    ref = ref_norm(before, 2.0)
    norm = gradclip.clip_by_global_norm_(arrays, ref / 10)
    for i in (0, 1, 2, 29_999, 59_999):
        assert_scaled(arrays[i], before[i], ref / 10, norm, 0.0)
    assert gradclip.clip_by_value_(arrays, 0.05) is True
    assert all(float(np.abs(a).max()) <= bound_in(a.dtype.name, 0.05) for a in arrays)


# --------------------------------------------------------------------------
# "Nothing is written": proven with memory the process cannot write
# --------------------------------------------------------------------------

_READ_ONLY_PAGES = """
import numpy as np
size = 1 << 21
mm = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
rng = np.random.default_rng(0)
f32 = np.frombuffer(mm, dtype=np.float32, count=120_003)               # writable NumPy views ...
f64 = np.frombuffer(mm, dtype=np.float64, count=40_001, offset=1 << 19)
f16 = np.frombuffer(mm, dtype=np.float16, count=70_001, offset=1 << 20)
zeros = np.frombuffer(mm, dtype=np.float32, count=50_000, offset=3 << 19)
for a in (f32, f64, f16):
    a[:] = rng.standard_normal(a.size)
zeros[:] = 0
protect(mm)  # ... over pages that fault on any write
import gradclip
xs = [f32, f64, f16]
if sys.argv[1] == "control":
    gradclip.clip_by_value_(xs, 0.1)  # must write: the process dies with SIGSEGV
    print("not reached")
    sys.exit(0)
norm = gradclip.global_norm(xs)
gradclip.tensor_norms(xs, 3.0)
gradclip.clip_by_global_norm_(xs, norm * 2)
gradclip.clip_by_global_norm_(xs, norm * 2, float("inf"))
gradclip.clip_by_norm_(xs, norm * 2)
assert gradclip.clip_by_value_(xs, 100.0) is False
assert gradclip.normalize_([zeros], 3.0) == 0.0
import torch
params = []
for a in xs:
    p = torch.nn.Parameter(torch.zeros(a.shape, dtype=torch.from_numpy(a[:1]).dtype))
    p.grad = torch.from_numpy(a)
    params.append(p)
gradclip.clip_grad_norm_(params, norm * 2)
gradclip.clip_grad_value_(params, 100.0)
gradclip.clip_grads_with_norm_(params, 1.0, 0.5)
gradclip.set_num_threads(2)
assert sum(a.size for a in xs + [zeros]) > 1 << 18  # the threaded path too
gradclip.clip_by_global_norm_(xs + [zeros], norm * 2)
assert gradclip.clip_by_value_(xs + [zeros], 100.0) is False
print("no write")
"""


def test_no_memory_is_written_when_nothing_needs_clipping():
    # The arrays live in pages made read-only with mprotect behind NumPy's back
    # (NumPy still reports them writable): any store, even of an unchanged
    # value, kills the process. Every call below needs no change and so must
    # only read.
    check_read_only_script(_READ_ONLY_PAGES, "no-write")


def test_read_only_pages_do_catch_a_write():
    # Positive control for the test above: a clamp that must write dies.
    check_read_only_script(_READ_ONLY_PAGES, "control")
