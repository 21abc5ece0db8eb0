"""gradclip._core: the native core (csrc/binding/module.cpp). Internal: use the
gradclip package API. Every list argument is a sequence of tensors or arrays
(or of parameters, read through ``.grad``, with ``grad_attr=True``); every
rule is checked for every item before anything is written.

Vocabulary, the same from here to the kernels (csrc/core/clip_rules.h):

* ``kind``: ``"none"`` (norms only), ``"global"`` (torch's clip_grad_norm_ rule
  per group), ``"per_tensor"`` (each tensor on its own), ``"normalize"`` (each
  group to its limit), ``"value"`` (clamp to [-limit, limit]).
* ``nonfinite``: ``"propagate"`` (as torch), ``"error"`` / ``"skip"`` (hold:
  write nothing; the caller raises or skips), ``"zero"`` (CPU: NaN and inf
  elements set to 0 first).
"""

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

class DeviceResult:
    """Where a CUDA call left its results: byte offsets into ``buffer`` (-1: absent).
    A struct sequence (a named tuple made in C), as is Result."""

    buffer: Any  # uint8 tensor / array on the device
    f64: bool  # norms stored as float64 (else float32)
    total_offset: int
    group_offset: int
    tensor_offset: int
    flags_offset: int  # value clips: one changed-flag byte per block
    flag_count: int
    span_count: int  # unique tensors (per_tensor norms are stored once per unique tensor)
    entry_spans: Optional[List[int]]  # per entry its unique tensor, when one was listed twice

class Result:
    """What a call did; fields it does not produce are None."""

    count: int  # accepted entries (parameters without .grad are skipped)
    first_index: int  # list index of the first accepted entry, or -1
    result_f64: bool  # the results' dtype is float64 (some input is), else float32
    # split_devices=True and the items lie on several devices: per device, the
    # list indices on it (nothing was computed, everything was checked).
    items_by_device: Optional[List[np.ndarray]]
    total: Optional[float]
    norms: Optional[np.ndarray]  # per entry, float64
    indices: Optional[np.ndarray]  # per entry, its list index (int32)
    group_norms: Optional[np.ndarray]
    group_coefs: Optional[np.ndarray]
    coefs: Optional[np.ndarray]  # per entry, the factor it was (or, held, would be) scaled by
    nonfinite: bool
    held: bool  # nothing was written because of a nonfinite norm
    nonfinite_indices: Optional[np.ndarray]  # list indices of entries with a NaN or inf norm
    written: bool
    changed: bool  # value clips: some element was clamped
    zeroed: int  # elements set to 0 under nonfinite="zero"
    device: Optional[DeviceResult]  # CUDA without report: results stay on the device
    param_norms: Optional[np.ndarray]  # clip_units
    grad_norms: Optional[np.ndarray]  # clip_units
    units: int  # clip_units: rows seen
    clipped_units: int  # clip_units: rows scaled down

def clip(
    seq: Sequence[Any],
    *,
    kind: str,
    limits: Sequence[float] = ...,  # one per group (none for kind="none")
    order: float = 2.0,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    group_of_item: Optional[Sequence[int]] = None,  # None: one group
    argname: str,
    grad_attr: bool = False,
    per_tensor: bool = False,  # per-entry norms
    report: bool = False,  # everything, on the host (CUDA: one host sync)
    want_changed: bool = False,  # kind="value": whether some element changed
    given_norm: Any = None,  # kind="global": scale by this norm's coefficient (a number or 0-d tensor)
    split_devices: bool = False,  # several devices: report them instead of raising
    items: Optional[Sequence[int]] = None,  # only these list indices
) -> Result:
    """One fused call: intake, norms, the nonfinite decision, coefficients, writes."""

class Reduction:
    """The engine's seam (csrc/engine/engine.h): local power sums, to combine, then finish."""

    def group_partials(self) -> Any:
        """(n_groups, 2) float64 (sum, base) rows: a NumPy array for host
        memory; for CUDA a (buffer, byte offset, n_groups) tuple that
        gradclip._device.partials views."""
    def summary(self) -> Tuple[float, bool]:
        """(local total, some norm nonfinite), on the host (CUDA: waits)."""
    def finish(
        self,
        *,
        kind: str,
        limits: Sequence[float] = ...,
        eps: float = 0.0,
        nonfinite: str = "propagate",
        combined: Any = None,  # (k, n_groups, 2) float64 on the tensors' device: every participant's partials
        per_tensor: bool = False,
        report: bool = False,
        result_f64: Optional[bool] = None,  # one result dtype for every participant
    ) -> Result: ...

def reduce(
    seq: Sequence[Any],
    *,
    order: float = 2.0,
    nonfinite: str = "propagate",  # "zero" repairs here
    group_of_item: Optional[Sequence[int]] = None,
    n_groups: int = 1,
    argname: str,
    grad_attr: bool = False,
    items: Optional[Sequence[int]] = None,
) -> Reduction:
    """Stage one of a clip; the list is checked for writing (finish may write)."""

def clip_units(
    seq: Sequence[Any],
    *,
    clipping: Sequence[float],  # one AGC factor per group
    group_of_item: Optional[Sequence[int]] = None,  # -1 leaves an item out
    eps: float,
    order: float = 2.0,
    nonfinite: str = "propagate",
    argname: str,
) -> Result:
    """Adaptive gradient clipping (CPU): each gradient row limited to
    clipping * max(||parameter row||, eps)."""

def set_device_allocator(allocate: Any) -> None:
    """allocate(like, out_bytes, workspace_bytes) -> (out, out_ptr, workspace, workspace_ptr, stream)."""

def _use_cuda_backend(api: Any, allocate: Any) -> None:
    """Test hook: CUDA calls through another kernel table (gradclip._cuda_sim._api) and allocator."""

def finite_as_reported(norm: float, as_float32: bool) -> bool: ...
def clip_coefficient(max_norm: float, norm: float, eps: float) -> float: ...
def compiled_isas() -> List[str]: ...
def supported_isas() -> List[str]: ...
def active_isa() -> str: ...
def set_active_isa(name: str) -> None: ...
def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def limit_calling_thread(n: int) -> int:
    """Caps the calls this thread makes at n threads (0: no cap); returns the previous cap."""
