"""This machine's own memory-bandwidth ceilings, measured in the same process
as the contenders on buffers far larger than the last-level cache.

* read: one read pass (reductions: torch ``sum`` / ``vector_norm``; on CPU also
  NumPy's BLAS ``dot``); bytes = buffer size.
* read+write: one pass that reads and writes (in-place ``x *= c`` with torch and
  NumPy, and ``copy``); bytes = 2 x buffer size.
* copy (reported on its own, e.g. the device copy bandwidth of a GPU).

Each method's median is kept; a ceiling is the best median over its methods.
Together they give the time floors the benchmark reports against:
one read pass ``B/read`` (norm, nothing clipped), two passes
``B/read + 2B/read_write`` (norm, then scale), one read+write pass ``2B/read_write``
(value clipping).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from .timing import RoundPolicy, Stats, interleaved


def measure(torch: Any, device: str, nbytes: int, rounds: int, warmup: int = 2) -> Dict[str, Any]:
    n = nbytes // 4
    dev = torch.device(device)
    x = torch.randn(n, device=dev, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)  # fault the pages in before timing
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    factors = [2.0, 0.5]  # alternate: exact in binary, so values never drift

    def torch_scale() -> None:
        factors.reverse()
        x.mul_(factors[0])

    methods: Dict[str, tuple] = {
        "torch.sum": ("read", lambda: x.sum()),
        "torch.linalg.vector_norm": ("read", lambda: torch.linalg.vector_norm(x)),
        "torch.mul_": ("read_write", torch_scale),
        "torch.copy_": ("copy", lambda: y.copy_(x)),
    }
    if dev.type == "cpu":
        import numpy as np

        xa, ya = x.numpy(), y.numpy()
        np_factors = [np.float32(2.0), np.float32(0.5)]

        def numpy_scale() -> None:
            np_factors.reverse()
            np.multiply(xa, np_factors[0], out=xa)

        methods.update({
            "numpy.dot": ("read", lambda: np.dot(xa, xa)),
            "numpy.multiply(out=)": ("read_write", numpy_scale),
            "numpy.copyto": ("copy", lambda: np.copyto(ya, xa)),
        })

    calls: Dict[str, Callable[[], object]] = {name: fn for name, (_, fn) in methods.items()}
    samples = interleaved(calls, restore=lambda: None, sync=sync,
                          policy=RoundPolicy(warmup=warmup, fixed=rounds))
    bytes_per_call = {"read": nbytes, "read_write": 2 * nbytes, "copy": 2 * nbytes}
    detail: Dict[str, Dict[str, Any]] = {}
    best: Dict[str, float] = {"read": 0.0, "read_write": 0.0, "copy": 0.0}
    for name, (kind, _) in methods.items():
        st = Stats.of(samples[name])
        gbs = bytes_per_call[kind] / st.median / 1e9
        detail[name] = {"kind": kind, "median_s": st.median, "p20_s": st.p20, "p80_s": st.p80, "gbs": gbs}
        best[kind] = max(best[kind], gbs)
    methods_used: List[str] = list(methods)
    return {
        "read_gbs": best["read"],
        # A copy is a read+write pass too: the better of the two is the ceiling.
        "read_write_gbs": max(best["read_write"], best["copy"]),
        "copy_gbs": best["copy"],
        "buffer_bytes": nbytes,
        "rounds": rounds,
        "methods": methods_used,
        "detail": detail,
    }
