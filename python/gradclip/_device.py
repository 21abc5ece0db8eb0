"""Device memory and streams for the CUDA backend, from the caller's framework.

The native core never allocates device memory itself: it asks here, so that
torch's caching allocator (or CuPy's pool) owns every byte, stream-ordered and
CUDA-graph aware, and results come back as the caller's own tensor type.
Nothing here synchronises with the device.

Result buffers are torch tensors or CuPy arrays; in the tests that run the
CUDA kernels on the host (gradclip._cuda_sim) they are NumPy arrays, which
every function here handles as well.
"""

from __future__ import annotations

import sys
from typing import Any, List, Tuple

import numpy as np

_LEGACY_DEFAULT_STREAM = 1  # cudaStreamLegacy: what a DLPack producer syncs to when given no stream


def _torch_of(obj: Any):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return torch
    return None


def _cupy_of(obj: Any):
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return cupy
    return None


def allocate(like: Any, out_bytes: int, workspace_bytes: int) -> Tuple[Any, int, Any, int, int]:
    """Two uninitialised byte buffers on ``like``'s device and the stream to
    launch on: ``(out, out_ptr, workspace, workspace_ptr, stream)``."""
    torch = _torch_of(like)
    if torch is not None:
        device = like.device
        out = torch.empty(out_bytes, dtype=torch.uint8, device=device) if out_bytes else None
        ws = torch.empty(workspace_bytes, dtype=torch.uint8, device=device) if workspace_bytes else None
        stream = torch.cuda.current_stream(device).cuda_stream
        return out, _ptr(out), ws, _ptr(ws), stream
    cupy = _cupy_of(like)
    if cupy is None:
        # Another DLPack producer: it ordered its work before the legacy default
        # stream when it exported (no stream was named), so launch there, with
        # memory that CuPy's pool also orders on that stream.
        cupy = _import_cupy()
        with cupy.cuda.Device(_device_id(like)), cupy.cuda.Stream.null:
            out, ws = _cupy_buffers(cupy, out_bytes, workspace_bytes)
        return out, _ptr(out), ws, _ptr(ws), _LEGACY_DEFAULT_STREAM
    with cupy.cuda.Device(_device_id(like)):
        out, ws = _cupy_buffers(cupy, out_bytes, workspace_bytes)
        stream = cupy.cuda.get_current_stream().ptr
    return out, _ptr(out), ws, _ptr(ws), stream


def _cupy_buffers(cupy: Any, out_bytes: int, workspace_bytes: int) -> Tuple[Any, Any]:
    out = cupy.empty(out_bytes, dtype=cupy.uint8) if out_bytes else None
    ws = cupy.empty(workspace_bytes, dtype=cupy.uint8) if workspace_bytes else None
    return out, ws


def _ptr(buf: Any) -> int:
    if buf is None:
        return 0
    if hasattr(buf, "data_ptr"):
        return int(buf.data_ptr())
    return int(buf.data.ptr)


def _device_id(obj: Any) -> int:
    dev = obj.__dlpack_device__()
    return int(dev[1])


def _import_cupy():
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(
            "these arrays are on a CUDA device but are neither torch tensors nor CuPy arrays; gradclip needs torch "
            "or CuPy installed to allocate device memory for the results"
        ) from None
    return cupy


def _float_dtypes(buf: Any):
    torch = _torch_of(buf)
    if torch is not None:
        return torch.float32, torch.float64
    return np.float32, np.float64


def _view(result: Any, offset: int, count: int) -> Any:
    """``count`` norms at byte ``offset`` of a :class:`gradclip._core.DeviceResult`'s buffer."""
    buf = result.buffer
    f32, f64 = _float_dtypes(buf)
    es = 8 if result.f64 else 4
    return buf[offset : offset + es * count].view(f64 if result.f64 else f32)


def total(result: Any) -> Any:
    """The total norm: a 0-d array on the device (a view of the output buffer)."""
    return _view(result, result.total_offset, 1)[0]


def per_tensor(result: Any) -> Any:
    """Per-entry norms on the device, in list order."""
    norms = _view(result, result.tensor_offset, result.span_count)
    entry_spans = result.entry_spans
    if entry_spans is None:
        return norms
    # A tensor listed twice has one span and two entries. The entries are
    # gathered as a concatenation of slices (runs of consecutive spans), not by
    # an index array: that would be a host-to-device copy, which synchronises
    # and cannot be captured in a CUDA graph.
    pieces = [norms[start:stop] for start, stop in _runs(entry_spans)]
    torch = _torch_of(norms)
    if torch is not None:
        return torch.cat(pieces)
    return (_cupy_of(norms) or np).concatenate(pieces)


def _runs(indices: List[int]) -> List[Tuple[int, int]]:
    """``indices`` as half-open ranges of consecutive values, in order:
    [0, 1, 2, 0, 3] -> [(0, 3), (0, 1), (3, 4)]."""
    runs: List[Tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def changed(result: Any) -> Any:
    """Whether a clamp changed anything: a 0-d bool array on the device."""
    offset = result.flags_offset
    return result.buffer[offset : offset + result.flag_count].any()


def partials(buffer: Any, offset: int, n_groups: int) -> Any:
    """A reduction's group partials in device memory: a (n_groups, 2) float64
    view of (sum, base) rows (gradclip._core.Reduction.group_partials)."""
    _, f64 = _float_dtypes(buffer)
    return buffer[offset : offset + 16 * n_groups].view(f64).reshape(n_groups, 2)
