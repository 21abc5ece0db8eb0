"""Hypothesis: random lists of random dtypes, sizes, magnitudes and norm orders
against the float64 reference, plus metamorphic properties that must hold
bit for bit (sign symmetry, power-of-two scaling, ISA independence)."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import gradclip
from gradclip import _core
from conftest import (
    INF,
    SUPPORTED_ISAS,
    as_f64,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled,
    bits,
    clone_all,
    dtype_name,
    make_numpy,
    make_torch,
    norm_rtol,
    ref_norm,
    ref_norms,
)

KINDS = [
    ("numpy", np.float32),
    ("numpy", np.float64),
    ("numpy", np.float16),
    ("torch", torch.float32),
    ("torch", torch.float64),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
]

# Magnitudes per dtype family, from tiny to huge but inside the dtype's range
# (float64 ones reach the overflow/underflow rescue).
SCALES = {
    "float64": [1e-300, 1e-160, 1e-3, 1.0, 1e3, 1e160, 1e300],
    "float32": [1e-30, 1e-3, 1.0, 1e3, 1e30],
    "bfloat16": [1e-30, 1e-3, 1.0, 1e3, 1e30],
    "float16": [1e-3, 1.0, 100.0],
}

sizes = st.one_of(st.integers(0, 70), st.sampled_from([15, 16, 17, 31, 33, 1000, 32767, 32769]))
array_specs = st.tuples(st.integers(0, len(KINDS) - 1), sizes, st.integers(0, 2**31 - 1), st.integers(0, 6))
orders = st.one_of(st.sampled_from([1.0, 2.0, INF, 3.0, 0.5]), st.floats(0.25, 8.0))


NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.bfloat16: np.float32}
TORCH_OF = {np.float32: torch.float32, np.float64: torch.float64, np.float16: torch.float16}


def build(specs, framework=None):
    """Arrays from (kind, size, seed, scale) tuples; `framework` forces NumPy
    (bfloat16 becomes float32) or torch."""
    out = []
    for kind_index, size, seed, scale_index in specs:
        fw, dtype = KINDS[kind_index]
        if framework == "numpy" and fw == "torch":
            fw, dtype = "numpy", NUMPY_OF[dtype]
        elif framework == "torch" and fw == "numpy":
            fw, dtype = "torch", TORCH_OF[dtype]
        name = np.dtype(dtype).name if fw == "numpy" else str(dtype).replace("torch.", "")
        scales = SCALES[name]
        make = make_numpy if fw == "numpy" else make_torch
        out.append(make(size, dtype, seed, scales[scale_index % len(scales)]))
    return out


def result_dtype(arrays):
    if arrays and isinstance(arrays[0], torch.Tensor):
        return torch.float64 if any(dtype_name(a) == "float64" for a in arrays) else torch.float32
    return np.float64


@given(specs=st.lists(array_specs, max_size=6), p=orders)
def test_global_and_per_array_norms_match_reference(specs, p):
    arrays = build(specs)
    ref = ref_norm(arrays, p)
    note(f"ref={ref!r}")
    assert_norm_close(gradclip.global_norm(arrays, p), ref, p, result_dtype(arrays))
    norms = gradclip.tensor_norms(arrays, p)
    norms = norms.numpy() if isinstance(norms, torch.Tensor) else norms
    for got, expected in zip(norms, ref_norms(arrays, p)):
        assert_norm_close(got, expected, p)


@given(specs=st.lists(array_specs, min_size=1, max_size=5), p=orders, fraction=st.sampled_from([0.01, 0.5, 0.999, 2.0]))
@settings(max_examples=100)
def test_clip_by_global_norm_matches_reference(specs, p, fraction):
    arrays = build(specs, framework="numpy")  # float64 norm returned: bitwise expectations
    before = clone_all(arrays)
    ref = ref_norm(before, p)
    assume(math.isfinite(ref) and ref > 0)
    max_norm = ref * fraction
    norm = gradclip.clip_by_global_norm_(arrays, max_norm, p)
    assert_norm_close(norm, ref, p)
    for a, b in zip(arrays, before):
        if max_norm / (norm + 1e-6) >= 1.0:
            assert_bitwise_equal(a, b, "no clipping needed")
        else:
            assert_scaled(a, b, max_norm, norm, 0.0)


@given(specs=st.lists(array_specs, min_size=1, max_size=5), p=orders)
@settings(max_examples=100)
def test_clip_grad_norm_matches_reference(specs, p):
    grads = build(specs, framework="torch")
    ref = ref_norm(grads, p)
    assume(math.isfinite(ref) and ref > 0)
    params = []
    for g in grads:
        prm = torch.nn.Parameter(torch.zeros_like(g))
        prm.grad = g.clone()
        params.append(prm)
    total = gradclip.clip_grad_norm_(params, ref / 3, norm_type=p)
    assert total.dtype == result_dtype(grads)
    assert_norm_close(total, ref, p, total.dtype)
    for prm, g in zip(params, grads):
        assert_scaled(prm.grad, g, ref / 3, ref, norm_rtol(p))


@given(specs=st.lists(array_specs, max_size=5), clip_value=st.sampled_from([0.0, 1e-3, 0.1, 0.5, 1.0, 7.5, 1e4, INF]))
def test_clip_by_value_matches_numpy_clip_and_reports_changes(specs, clip_value):
    arrays = build(specs)
    before = clone_all(arrays)
    changed = gradclip.clip_by_value_(arrays, clip_value)
    any_outside = False
    for a, b in zip(arrays, before):
        name = dtype_name(b)
        if name == "float64":
            bound = clip_value
        elif name == "bfloat16":
            bound = float(torch.tensor(clip_value, dtype=torch.float32).to(torch.bfloat16))
        else:
            with np.errstate(over="ignore"):
                f = np.float32(clip_value)
                bound = float(f) if name == "float32" else float(f.astype(np.float16))
        x = as_f64(b)
        outside = np.abs(x) > bound
        any_outside |= bool(outside.any())
        expected = np.where(outside, np.copysign(bound, x), x)
        assert np.array_equal(as_f64(a), expected)
        assert np.array_equal(bits(a)[~outside.ravel()], bits(b)[~outside.ravel()])
    assert changed is any_outside


@given(specs=st.lists(array_specs, min_size=1, max_size=5), p=orders)
@settings(max_examples=100)
def test_negation_changes_no_bit_of_norms_and_commutes_with_clipping(specs, p):
    arrays = build(specs)
    negated = [-a for a in arrays]
    n1, n2 = gradclip.tensor_norms(arrays, p), gradclip.tensor_norms(negated, p)
    assert_bitwise_equal(n1 if isinstance(n1, np.ndarray) else n1.numpy(), n2 if isinstance(n2, np.ndarray) else n2.numpy())
    a1, a2 = clone_all(arrays), clone_all(negated)
    ref = ref_norm(arrays, p)
    assume(math.isfinite(ref) and ref > 0)
    gradclip.clip_by_global_norm_(a1, ref / 2, p)
    gradclip.clip_by_global_norm_(a2, ref / 2, p)
    for x, y in zip(a1, a2):
        assert_bitwise_equal(-y, x, "clip(-x) == -clip(x)")
    c1, c2 = clone_all(arrays), clone_all(negated)
    gradclip.clip_by_value_(c1, 0.5)
    gradclip.clip_by_value_(c2, 0.5)
    for x, y in zip(c1, c2):
        assert_bitwise_equal(-y, x, "clip_by_value(-x) == -clip_by_value(x)")


@given(specs=st.lists(array_specs, min_size=1, max_size=5), k=st.integers(-6, 6), p=st.sampled_from([1.0, 2.0, INF]))
@settings(max_examples=100)
def test_power_of_two_scaling_is_exact(specs, k, p):
    # Multiplying every element by 2^k changes no rounding anywhere (as long as
    # nothing over- or underflows): the L1, L2 and inf norms scale bitwise.
    arrays = [a for a in build(specs, framework="numpy") if dtype_name(a) != "float16"]
    scaled = [a * a.dtype.type(2.0**k) for a in arrays]
    for a, s in zip(arrays, scaled):
        assume(np.array_equal(s.astype(np.float64), a.astype(np.float64) * 2.0**k))  # exact in its dtype
    base = gradclip.global_norm(arrays, p)
    assume(1e-250 < base < 1e250)
    assert gradclip.global_norm(scaled, p) == math.ldexp(base, k)


@given(specs=st.lists(array_specs, min_size=1, max_size=5), p=orders)
@settings(max_examples=80)
def test_every_isa_gives_identical_bits(specs, p):
    def run():
        arrays = build(specs, framework="numpy")
        norm = gradclip.global_norm(arrays, p)
        norms = gradclip.tensor_norms(arrays, p).tobytes()
        work = clone_all(arrays)
        ref = ref_norm(arrays, p)
        if math.isfinite(ref) and ref > 0:
            gradclip.clip_by_global_norm_(work, ref / 3, p)
        gradclip.clip_by_value_(work, 0.25)
        return norm, norms, [bits(w).tobytes() for w in work]

    before = _core.active_isa()
    results = {}
    try:
        for isa in SUPPORTED_ISAS:
            _core.set_active_isa(isa)
            results[isa] = run()
    finally:
        _core.set_active_isa(before)
    first = results[SUPPORTED_ISAS[0]]
    for isa, r in results.items():
        assert r == first, f"{isa} differs from {SUPPORTED_ISAS[0]}"


@given(specs=st.lists(array_specs, min_size=2, max_size=5), p=orders, data=st.data())
@settings(max_examples=80)
def test_list_order_changes_the_norm_only_within_rounding(specs, p, data):
    arrays = build(specs, framework="numpy")
    order = data.draw(st.permutations(range(len(arrays))))
    ref = ref_norm(arrays, p)
    a = gradclip.global_norm(arrays, p)
    b = gradclip.global_norm([arrays[i] for i in order], p)
    assert_norm_close(a, ref, p)
    assert_norm_close(b, ref, p)
    norms_a = gradclip.tensor_norms(arrays, p)
    norms_b = gradclip.tensor_norms([arrays[i] for i in order], p)
    assert_bitwise_equal(norms_a[list(order)], norms_b)  # per-array norms do not depend on the list


@given(
    specs=st.lists(array_specs, min_size=1, max_size=4),
    p=orders,
    poison=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.sampled_from([math.nan, INF, -INF])),
                    min_size=1, max_size=3),
)
@settings(max_examples=120)
def test_nonfinite_values_propagate(specs, p, poison):
    arrays = build(specs, framework="numpy")
    for which, pos, value in poison:
        a = arrays[which % len(arrays)]
        if a.size:
            a.flat[pos % a.size] = value
    flat = np.concatenate([as_f64(a).ravel() for a in arrays])
    has_nan, has_inf = bool(np.isnan(flat).any()), bool(np.isinf(flat).any())
    assume(has_nan or has_inf)
    norm = gradclip.global_norm(arrays, p)
    assert math.isnan(norm) if has_nan else norm == INF
    before = clone_all(arrays)
    assert gradclip.clip_by_global_norm_(arrays, 1.0, p) == norm or has_nan
    for a, b in zip(arrays, before):
        x, y = as_f64(a), as_f64(b)
        if has_nan:
            assert np.isnan(x).all(), "a NaN total makes every element NaN"
        else:
            assert (x[np.isfinite(y)] == 0).all() and np.isnan(x[~np.isfinite(y)]).all()
