"""A hand-made DLPack producer that says its memory is on a CUDA device.

With a made-up address (the default) it exercises routing and refusals, and
its pointer must never be dereferenced. Backed by a host torch tensor
(``FakeCudaArray.over(t)``) it stands for device memory that the host can
read, for the tests that run the CUDA kernels on the host
(gradclip._cuda_sim; tests/test_cuda_sim_api.py).
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import numpy as np

KDL_CUDA = 2
KDL_FLOAT = 2
KDL_BFLOAT = 4


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeCudaArray:
    """A 1-D array 'on cuda:device': float32[n] at a fake, aligned address,
    or (``over``) the memory of a host tensor."""

    def __init__(self, n: int, device: int = 0, address: int = 0x7F0000000000, code: int = KDL_FLOAT,
                 bits: int = 32, backing: Optional[Any] = None):
        self._shape = (ctypes.c_int64 * 1)(n)
        self._managed = _ManagedVersioned(1, 0, None, None, 0)
        t = self._managed.dl_tensor
        t.data, t.device_type, t.device_id, t.ndim = address, KDL_CUDA, device, 1
        t.code, t.bits, t.lanes = code, bits, 1
        t.shape, t.strides, t.byte_offset = self._shape, None, 0
        self._device = device
        self.backing = backing  # keeps the memory alive
        self.export_stream: Any = "never exported"

    @classmethod
    def over(cls, tensor: Any) -> "FakeCudaArray":
        """The memory of a 1-D host torch tensor, presented as cuda:0 memory."""
        import torch

        assert tensor.device.type == "cpu" and tensor.dim() == 1 and tensor.is_contiguous()
        code = KDL_BFLOAT if tensor.dtype == torch.bfloat16 else KDL_FLOAT
        return cls(tensor.numel(), address=tensor.data_ptr(), code=code, bits=tensor.element_size() * 8,
                   backing=tensor)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.export_stream = stream
        return _PyCapsule_New(ctypes.addressof(self._managed), b"dltensor_versioned", None)

    def __dlpack_device__(self):
        return (KDL_CUDA, self._device)

    @property
    def device(self):  # what the drop-ins group by (a torch.device for real tensors)
        return ("cuda", self._device)


def host_allocate(like, out_bytes: int, workspace_bytes: int):
    """gradclip._device.allocate for the simulator: NumPy buffers, 256-byte
    aligned as a device allocator's, filled with NaN bytes so that a result
    nobody wrote shows."""

    def buffer(n: int):
        if not n:
            return None, 0
        raw = np.full(n + 256, 0xFF, dtype=np.uint8)
        start = (-raw.ctypes.data) % 256
        view = raw[start : start + n]
        return view, view.ctypes.data

    out, out_ptr = buffer(out_bytes)
    ws, ws_ptr = buffer(workspace_bytes)
    return out, out_ptr, ws, ws_ptr, 0
