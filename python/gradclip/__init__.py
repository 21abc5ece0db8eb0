"""gradclip: fused, single-pass gradient clipping for whole parameter lists.

Drop-ins for ``torch.nn.utils`` (:func:`clip_grad_norm_`, :func:`clip_grad_value_`,
:func:`get_total_norm`, :func:`clip_grads_with_norm_`) and an array API for
NumPy arrays, torch tensors and DLPack producers (:func:`global_norm`,
:func:`tensor_norms`, :func:`clip_by_global_norm_`, :func:`clip_by_value_`,
:func:`clip_by_norm_`, :func:`normalize_`).
"""

from __future__ import annotations

from typing import Any, Dict

from . import _core, _device, torch_ops
from .array_api import clip_by_global_norm_, clip_by_norm_, clip_by_value_, global_norm, normalize_, tensor_norms
from .torch_api import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .adaptive import AutoClip, ZClip
from .grad_buffer import GradBuffer
from .patch import TorchPatch, patch_torch
from .training import (
    ClipHandle,
    CsvLogger,
    NonfiniteGradientError,
    StepRecord,
    TensorBoardLogger,
    adaptive_clip_grad_,
    attach,
    clip_gradients_,
)

__version__ = "0.1.0"

# Device memory for CUDA calls comes from the caller's framework (torch's
# caching allocator, CuPy's pool): the native core asks through this function.
_core.set_device_allocator(_device.allocate)

# The drop-ins as torch custom ops (torch.compile), when torch is already imported.
torch_ops.register()

__all__ = [
    "__version__",
    "AutoClip",
    "ClipHandle",
    "CsvLogger",
    "GradBuffer",
    "NonfiniteGradientError",
    "StepRecord",
    "TensorBoardLogger",
    "TorchPatch",
    "ZClip",
    "adaptive_clip_grad_",
    "attach",
    "build_info",
    "clip_by_global_norm_",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_gradients_",
    "clip_grads_with_norm_",
    "get_num_threads",
    "get_total_norm",
    "global_norm",
    "normalize_",
    "patch_torch",
    "set_num_threads",
    "tensor_norms",
]


def set_num_threads(n: int) -> None:
    """Threads used for large lists (n <= 0: all hardware threads). The default
    is the hardware thread count, or ``GRADCLIP_NUM_THREADS`` when set. Results
    are bitwise identical for every thread count."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_core.num_threads())


def _cuda_status() -> Dict[str, Any]:
    """Load the CUDA module only now: importing gradclip never touches CUDA."""
    try:
        from . import _cuda  # type: ignore[attr-defined]
    except ImportError:
        return {"compiled": False, "available": False, "device_count": 0}
    status = dict(_cuda.runtime_status())
    status["compiled"] = True
    status["architectures"] = _cuda.architectures
    status["available"] = status["device_count"] > 0
    return status


def build_info() -> Dict[str, Any]:
    """What this installation was built with and what it uses now.

    Keys: ``version``; ``compiled_isas`` (CPU kernel sets in this build);
    ``supported_isas`` (those this CPU can run); ``isa`` (the one in use, which
    ``GRADCLIP_ISA=scalar|avx2|avx512|avx512bf16`` can lower); ``num_threads``;
    ``cuda_compiled`` / ``cuda_available``, with ``cuda`` holding the runtime's
    own report (versions, device count, error name) and the GPU
    ``architectures`` the module was compiled for, when the module exists.
    """
    cuda = _cuda_status()
    return {
        "version": __version__,
        "compiled_isas": list(_core.compiled_isas()),
        "supported_isas": list(_core.supported_isas()),
        "isa": _core.active_isa(),
        "num_threads": get_num_threads(),
        "cuda_compiled": cuda["compiled"],
        "cuda_available": cuda["available"],
        "cuda": cuda,
    }
