"""Shared fixtures, data makers, a float64 reference implementation and the
comparison helpers used by every test file.

Tolerances (each derived, not tuned):

* Norms against the reference (``norm_rtol``). gradclip sums |x|^p in float64:
  16 lanes per chunk of 2^15 elements (2048 terms per lane), a 4-level fold, then
  one add per chunk. For non-negative terms recursive summation of k terms has a
  relative error <= (k-1)u, u = 2^-53 ~ 1.1e-16; here k <= 2048 + 4 + (number of
  chunks) < 2200 for every list in this suite, so the power sum is within
  2.5e-13. The root multiplies that by 1/p (and adds ~1 ulp from sqrt/pow), the
  reference itself is within ~2 ulp (exact ``math.fsum`` over terms that are
  exact for 16/32-bit data and rounded once for float64 data). Hence
  rtol = 1e-12 * max(1, 1/p) is a bound with margin, not a guess. inf-norms are
  a max of exactly representable values: rtol 0, bitwise equal.
* Scaled values: the specification fixes the arithmetic (float32 data times the
  float32-rounded coefficient, rounded to nearest even; float64 in float64). The
  only uncertainty is the norm, so ``assert_scaled`` brackets the coefficient
  between the values given by norm * (1 -/+ rtol) and requires every element to
  lie between the two correspondingly scaled arrays (rounding is monotonic).
  When the norm is known exactly (array API with NumPy input returns it as a
  float64) the bracket is a single value and the comparison is bitwise.
* torch as the oracle (``TORCH_RTOL``): torch accumulates a float32 norm in
  float32, so its relative error is up to ~n * 2^-24 in the worst case and
  ~log2(n) * 2^-24 with its pairwise/vectorised summation; 1e-5 covers lists of
  up to ~1e5 elements with margin. Its coefficient is then computed in float32
  (a few more ulps, 2^-23 each), so scaled fp32 values get rtol 2e-5. For
  float64 torch also accumulates in float64: 1e-12 as above.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from typing import Iterable, List, Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import gradclip
from gradclip import _core

# Modest, derandomised Hypothesis runs: the suite must stay well under 3 minutes
# on 2 cores and give the same examples every run. No database writes.
settings.register_profile(
    "gradclip",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("gradclip")

INF = float("inf")
NAN = float("nan")
EPS = 1e-6  # torch's epsilon in max_norm / (total_norm + eps)

# Orders every function is checked with: the three SIMD kernels and the generic
# pow path on both sides of 1.
NORM_ORDERS = [1.0, 2.0, INF, 3.0, 0.5]
NORM_IDS = ["L1", "L2", "Linf", "L3", "L0.5"]

# Sizes around the SIMD width (16) and the chunk (2^15) / task (2^16) edges.
SIZES = [0, 1, 15, 16, 17, 31, 33, 32767, 32768, 32769, 65537]
SMALL_SIZES = [0, 1, 15, 16, 17, 33]

TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TORCH_DTYPE_IDS = ["f32", "f64", "f16", "bf16"]
NUMPY_DTYPES = [np.float32, np.float64, np.float16]
NUMPY_DTYPE_IDS = ["f32", "f64", "f16"]

TORCH_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
TORCH_SCALED_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}

COMPILED_ISAS = list(_core.compiled_isas())
SUPPORTED_ISAS = list(_core.supported_isas())
UNSUPPORTED_ISAS = [name for name in COMPILED_ISAS if name not in SUPPORTED_ISAS]

PARALLEL_MIN_ELEMS = 1 << 18
CHUNK_ELEMS = 1 << 15


def norm_rtol(p: float) -> float:
    """Relative error bound of a gradclip norm against ``ref_norm`` (see the
    module docstring for the derivation)."""
    if p == INF:
        return 0.0
    return 1e-12 * max(1.0, 1.0 / p)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def torch_gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_torch(shape, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Normal values times ``scale``, generated in float64 and rounded once to dtype."""
    if isinstance(shape, int):
        shape = (shape,)
    x = torch.randn(shape, dtype=torch.float64, generator=torch_gen(seed)) * scale
    return x.to(dtype)


def make_numpy(shape, dtype, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_param(grad: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.nn.Parameter:
    """A parameter of the grad's shape and dtype, holding ``grad`` as its .grad."""
    if grad is None:
        p = torch.nn.Parameter(torch.zeros(3, dtype=dtype or torch.float32))
        return p
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p


def as_f64(x) -> np.ndarray:
    """Exact float64 copy of the logical values of a tensor or array."""
    if isinstance(x, torch.Tensor):
        return x.detach().resolve_neg().resolve_conj().to(torch.float64).numpy().copy()
    return np.asarray(x, dtype=np.float64).copy()


def clone_all(items: Sequence) -> List:
    return [x.clone() if isinstance(x, torch.Tensor) else x.copy() for x in items]


# --------------------------------------------------------------------------
# The float64 reference implementation
# --------------------------------------------------------------------------


def _flat(arrays: Iterable) -> np.ndarray:
    parts = [as_f64(a).ravel() for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0)


def ref_norm(arrays: Iterable, p: float) -> float:
    """The p-norm of all arrays viewed as one vector, to about 1 ulp of float64.

    NaN if any element is NaN, else inf if any is inf. Elements are first scaled
    by an exact power of two that puts the largest in [0.5, 1), so that nothing
    overflows and, up to p = 500, the largest power (>= 2^-500) cannot
    underflow; the power sum is ``math.fsum`` (exact summation, one final
    rounding). For p > 500 they are divided by the largest instead (its power is
    then exactly 1): one rounding per element, ~p ulps in its power, divided by
    p again by the root.
    """
    x = np.abs(_flat(arrays))
    if x.size == 0:
        return 0.0
    if np.isnan(x).any():
        return NAN
    m = float(x.max())
    if m == INF:
        return INF
    if m == 0.0:
        return 0.0
    if p == INF:
        return m
    e = math.frexp(m)[1]
    s = np.ldexp(x, -e)  # exact (subnormal losses are far below the result's ulp)
    if p == 1.0:
        root = math.fsum(s.tolist())
    elif p == 2.0:
        # s*s is exact for data that came from 16/32-bit floats; otherwise one rounding.
        root = math.sqrt(math.fsum((s * s).tolist()))
    elif p <= 500.0:
        root = math.fsum(np.power(s, p).tolist()) ** (1.0 / p)
    else:
        return m * math.fsum(np.power(x / m, p).tolist()) ** (1.0 / p)  # m * [1, n^(1/p)]: finite
    try:
        return math.ldexp(root, e)
    except OverflowError:  # the true norm exceeds float64 (e.g. L0.25 of many 1e300s)
        return INF


def ref_norms(arrays: Sequence, p: float) -> np.ndarray:
    return np.array([ref_norm([a], p) for a in arrays], dtype=np.float64)


def ref_coef(max_norm: float, norm: float, eps: float = EPS) -> float:
    """torch's rule in float64: min(max_norm / (norm + eps), 1), NaN kept."""
    c = max_norm / (norm + eps)
    if math.isnan(c):
        return c
    return min(c, 1.0)


# --------------------------------------------------------------------------
# Bits and dtypes
# --------------------------------------------------------------------------

_INT_OF_SIZE_TORCH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT_OF_SIZE_NUMPY = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(x) -> np.ndarray:
    """The raw bit patterns of a tensor/array, as unsigned integers (flattened,
    in logical order). Negative-bit views are resolved first."""
    if isinstance(x, torch.Tensor):
        t = x.detach().resolve_neg().contiguous()
        return t.view(_INT_OF_SIZE_TORCH[t.element_size()]).numpy().ravel().view(
            _INT_OF_SIZE_NUMPY[t.element_size()]
        )
    a = np.ascontiguousarray(x)
    return a.view(_INT_OF_SIZE_NUMPY[a.itemsize]).ravel()


def is_nan_mask(x) -> np.ndarray:
    return np.isnan(as_f64(x)).ravel()


def assert_bitwise_equal(actual, expected, what: str = "values") -> None:
    """Every bit identical (including the sign of zero and NaN payloads)."""
    a, b = bits(actual), bits(expected)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} != {b.shape}"
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {a.size} elements differ bitwise; first at flat index {bad[0]}: "
        f"got {as_f64(actual).ravel()[bad[0]]!r} (0x{int(a[bad[0]]):x}), "
        f"expected {as_f64(expected).ravel()[bad[0]]!r} (0x{int(b[bad[0]]):x})"
    )


def assert_same_or_both_nan(actual, expected, what: str = "values") -> None:
    """Bitwise equal except that NaN matches any NaN (torch itself does not keep
    NaN payloads: its bfloat16 clamp turns 0x7fc0 into 0xffff)."""
    na, nb = is_nan_mask(actual), is_nan_mask(expected)
    assert na.shape == nb.shape, f"{what}: shapes differ"
    where = np.flatnonzero(na != nb)
    assert where.size == 0, f"{what}: NaN at different positions, first at flat index {where[0]}"
    a, b = bits(actual), bits(expected)
    bad = np.flatnonzero((a != b) & ~na)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {a.size} elements differ bitwise; first at flat index {bad[0]}: "
        f"got {as_f64(actual).ravel()[bad[0]]!r}, expected {as_f64(expected).ravel()[bad[0]]!r}"
    )


def dtype_name(x) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).replace("torch.", "")
    return np.dtype(x.dtype).name


def _round_f32_to(values32: np.ndarray, like) -> np.ndarray:
    """float32 values rounded to nearest even into like's dtype, as float64."""
    name = dtype_name(like)
    if name == "float32":
        return values32.astype(np.float64)
    if name == "float16":
        return values32.astype(np.float16).astype(np.float64)
    if name == "bfloat16":
        return torch.from_numpy(values32).to(torch.bfloat16).to(torch.float64).numpy()
    raise AssertionError(name)


def expected_scaled(original, coef: float) -> np.ndarray:
    """The specified scaling, as float64 values in logical order: float32 and
    16-bit data are multiplied in float32 by float32(coef) and rounded back to
    nearest even; float64 data is multiplied in float64."""
    x = as_f64(original)
    if dtype_name(original) == "float64":
        return x * coef
    x32 = x.astype(np.float32)  # exact: 16-bit and float32 values are float32 values
    with np.errstate(over="ignore", invalid="ignore"):
        prod = x32 * np.float32(coef)
    return _round_f32_to(prod, original)


def assert_scaled(actual, original, max_norm: float, norm: float, rtol: float, eps: float = EPS) -> None:
    """``actual`` must be ``original`` scaled by min(max_norm / (n + eps), 1) for
    some n within ``norm * (1 -/+ rtol)``, with the specified rounding."""
    c_hi = ref_coef(max_norm, norm * (1.0 - rtol), eps)
    c_lo = ref_coef(max_norm, norm * (1.0 + rtol), eps)
    e1, e2 = expected_scaled(original, c_lo), expected_scaled(original, c_hi)
    lo, hi = np.minimum(e1, e2).ravel(), np.maximum(e1, e2).ravel()
    got = as_f64(actual).ravel()
    assert got.shape == lo.shape, f"shape {got.shape} != {lo.shape}"
    nan_expected = np.isnan(e1).ravel() | np.isnan(e2).ravel()
    nan_got = np.isnan(got)
    where = np.flatnonzero(nan_expected != nan_got)
    assert where.size == 0, f"NaN mismatch at flat index {where[0]}: got {got[where[0]]!r}"
    ok = nan_got | ((got >= lo) & (got <= hi))
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (
        f"{bad.size} of {got.size} scaled {dtype_name(original)} elements outside the allowed bracket; "
        f"first at {bad[0]}: got {got[bad[0]]!r}, allowed [{lo[bad[0]]!r}, {hi[bad[0]]!r}] "
        f"(coefficient in [{c_lo!r}, {c_hi!r}])"
    )
    # Signs of zeros are part of the result too (x * c keeps x's sign).
    zero = (got == 0) & (lo == 0) & (hi == 0)
    if zero.any():
        assert np.array_equal(np.signbit(got[zero]), np.signbit(e1.ravel()[zero])), "sign of zero differs"


def assert_norm_close(actual, expected: float, p: float, result_dtype=np.float64, rtol: float | None = None) -> None:
    """A returned norm (Python float, NumPy scalar or 0-d tensor) against the
    float64 reference: within rtol in float64, then rounded to the result dtype
    (float32 for torch results without float64 input)."""
    rtol = norm_rtol(p) if rtol is None else rtol
    got = float(actual)
    if math.isnan(expected):
        assert math.isnan(got), f"expected NaN, got {got!r}"
        return
    if math.isinf(expected):
        assert got == expected, f"expected {expected!r}, got {got!r}"
        return
    lo, hi = expected * (1.0 - rtol), expected * (1.0 + rtol)
    if result_dtype in (np.float32, torch.float32):
        with np.errstate(over="ignore"):  # a norm beyond float32's range rounds to inf
            lo, hi = float(np.float32(lo)), float(np.float32(hi))
    assert lo <= got <= hi, (
        f"norm {got!r} not within rtol {rtol:g} of reference {expected!r} "
        f"(relative error {abs(got - expected) / expected if expected else got:.3g})"
    )


def result_dtype_of(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The documented dtype of a torch norm result."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kernel_names(launches) -> List[str]:
    """The kernels of gradclip._cuda_sim launch records, without template arguments."""
    return [name.split("<")[0] for name, _grid, _block in launches]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Runs the test once per ISA this CPU can run, restoring the ISA after."""
    before = _core.active_isa()
    _core.set_active_isa(request.param)
    try:
        yield request.param
    finally:
        _core.set_active_isa(before)


@pytest.fixture
def restore_threads():
    before = gradclip.get_num_threads()
    yield
    gradclip.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_state_leaks():
    """Every test must leave the global ISA and thread count as it found them."""
    isa_before = _core.active_isa()
    threads_before = gradclip.get_num_threads()
    yield
    assert _core.active_isa() == isa_before, "a test changed the active ISA"
    assert gradclip.get_num_threads() == threads_before, "a test changed the thread count"


# Prelude of the "nothing is written" scripts: protect(mm) makes an mmap's pages
# read-only behind NumPy's and torch's backs (they still report the views
# writable), so any store, even of an unchanged value, kills the process.
_READ_ONLY_PRELUDE = """
import ctypes, mmap, sys
def protect(mm):
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(mm)), len(mm), mmap.PROT_READ) == 0
"""


def check_read_only_script(body: str, mode: str, *args: str) -> None:
    """Runs a read-only-pages script in a fresh interpreter (a crash must not
    take pytest down), with ``sys.argv[1:] = [mode, *args]``. In mode
    "no-write" the body must print "no write" and exit 0; in mode "control"
    (the positive control: a call that must write) it must die with SIGSEGV."""
    proc = subprocess.run([sys.executable, "-c", _READ_ONLY_PRELUDE + body, mode, *args], capture_output=True,
                          text=True, timeout=120)
    if mode == "control":
        assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == "no write", (proc.returncode, proc.stderr[-2000:])


def require_cuda_sim():
    """gradclip._cuda_sim (the CUDA kernels on host fibers), or, off Linux where
    it is not built, a skip of the calling test module.

    The module is a test build's (GRADCLIP_CUDA_SIM=ON), not in the wheels users
    install. On Linux a missing module is an error, not a skip, so that a test
    run cannot lose these tests unnoticed, unless GRADCLIP_SKIP_SIM_TESTS=1 says
    the package under test is a user wheel (the cibuildwheel test step)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("gradclip._cuda_sim is built on Linux (ucontext fibers)", allow_module_level=True)
    try:
        from gradclip import _cuda_sim
    except ImportError:
        if os.environ.get("GRADCLIP_SKIP_SIM_TESTS") == "1":
            pytest.skip("a user wheel, built without gradclip._cuda_sim", allow_module_level=True)
        raise ImportError("gradclip._cuda_sim is missing: the tests need the test build, "
                          "GRADCLIP_CUDA_SIM=ON pip install '.[test]' (see the README's Quick start); "
                          "GRADCLIP_SKIP_SIM_TESTS=1 skips these tests instead") from None
    return _cuda_sim


def run_python(code: str, env_extra: dict | None = None, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter (for settings read once per process)
    and returns its stdout; fails the test with stderr on a non-zero exit."""
    env = dict(os.environ)
    env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"})
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout
