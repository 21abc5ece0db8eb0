"""One switch for every trainer: route torch's clipping functions to gradclip.

Trainers call torch's functions by name at call time: HF Trainer and
accelerate call ``torch.nn.utils.get_total_norm`` and
``clip_grads_with_norm_`` (accelerate 1.16), Lightning and plain loops
``clip_grad_norm_``; some import them from ``torch.nn.utils.clip_grad``.
:func:`patch_torch` replaces all four in both modules, so that whatever the
trainer calls is gradclip's drop-in, with torch's signature and semantics.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from . import torch_api

__all__ = ["TorchPatch", "patch_torch"]

NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")

# torch's own functions, saved by the first patch_torch() that replaced them;
# None while torch is not patched.
_originals: Dict[Tuple[str, str], Any] = {}
_handles: List["TorchPatch"] = []


def _modules():
    import torch.nn.utils
    import torch.nn.utils.clip_grad

    return {"torch.nn.utils": torch.nn.utils, "torch.nn.utils.clip_grad": torch.nn.utils.clip_grad}


class TorchPatch:
    """Returned by :func:`patch_torch`. ``undo()`` (or leaving a ``with``
    block) puts torch's functions back once every handle is undone."""

    def __init__(self) -> None:
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        self.active = False
        _handles.remove(self)
        if _handles:
            return  # another patch_torch() still wants them routed
        modules = _modules()
        for (module, name), original in _originals.items():
            setattr(modules[module], name, original)
        _originals.clear()

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_torch() -> TorchPatch:
    """Make ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``,
    ``get_total_norm`` and ``clip_grads_with_norm_`` gradclip's drop-ins, in
    ``torch.nn.utils`` and wherever ``torch.nn.utils.clip_grad`` has them. Returns a handle
    that undoes it, also as a context manager. Calling it again is harmless:
    torch's functions are saved once, and restored when the last handle is
    undone."""
    if not _originals:
        for module_name, module in _modules().items():
            for name in NAMES:
                if hasattr(module, name):  # torch 2.13's clip_grad module has two of the four
                    _originals[(module_name, name)] = getattr(module, name)
                    setattr(module, name, getattr(torch_api, name))
    handle = TorchPatch()
    _handles.append(handle)
    return handle
