"""Adaptive clipping thresholds: small stateful objects that turn the history of
gradient norms into this step's limit.

* :class:`AutoClip` (Seetharaman et al. 2020): the limit is a percentile of
  every norm seen so far (or of the last ``history_size``).
* :class:`ZClip` (Kumar et al. 2025): EMA estimates of the norm's mean and
  variance; a norm whose z-score exceeds ``z_thresh`` is clipped to a limit
  derived from them.

Both have ``update(norm) -> threshold`` and ``state_dict()`` /
``load_state_dict()``. Pass one as ``global_clipnorm=`` to
:func:`gradclip.attach` or :func:`gradclip.clip_gradients_`, which compute the
norm, ask for the threshold and scale in the fused kernels. ``update`` also
takes a 0-d torch tensor (e.g. a CUDA norm from
``torch.nn.utils.get_total_norm``): the state then stays on that device and
the threshold comes back as a tensor, with no host synchronisation, ready for
``torch.nn.utils.clip_grads_with_norm_(params, threshold, norm)``.
"""

from __future__ import annotations

import bisect
import collections
import math
from typing import Any, Dict, Optional

__all__ = ["AutoClip", "ZClip"]


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "dim") and hasattr(x, "device")


def _where(cond: Any, a: Any, b: Any) -> Any:
    """`a if cond else b` for floats; an elementwise select for tensors (no host sync)."""
    if _is_tensor(cond):
        import torch

        return torch.where(cond, a, b)
    return a if cond else b


def _minimum(a: Any, cap: float) -> Any:
    if _is_tensor(a):
        return a.clamp(max=cap)
    return min(a, cap)


def _percentile_sorted(values, q: float) -> float:
    """The q-th percentile of sorted floats, linear interpolation (NumPy's and
    torch.quantile's default)."""
    pos = q / 100.0 * (len(values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(values) - 1)
    t = pos - lo
    return values[lo] + (values[hi] - values[lo]) * t


class AutoClip:
    """AutoClip: the clipping threshold is the ``percentile``-th percentile of
    the gradient norms seen so far, the current one included (as in the
    paper's reference code, which appends, then takes ``np.percentile``).

    Args:
        percentile: in [0, 100]; the paper recommends 10.
        history_size: keep only the last this many norms (None: all of them).

    With float norms the history is kept sorted (one insertion per step); with
    tensor norms it is a device buffer and the percentile is
    ``torch.quantile`` of it.
    """

    def __init__(self, percentile: float = 10.0, history_size: Optional[int] = None):
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        if history_size is not None and int(history_size) < 1:
            raise ValueError(f"history_size must be >= 1 or None, got {history_size!r}")
        self.percentile = float(percentile)
        self.history_size = None if history_size is None else int(history_size)
        self._reset()

    def _reset(self) -> None:
        self._order: collections.deque = collections.deque()  # host: norms in arrival order
        self._sorted: list = []                                # host: the same, sorted
        self._buffer = None                                    # device: ring buffer tensor
        self._count = 0                                        # norms seen

    def update(self, norm: Any) -> Any:
        """Record this step's gradient norm; return the threshold to clip it to."""
        self._count += 1
        if _is_tensor(norm) or self._buffer is not None:
            return self._update_tensor(norm)
        value = float(norm)
        if not math.isfinite(value):
            raise ValueError(f"AutoClip.update: the norm must be finite, got {value}")
        self._order.append(value)
        bisect.insort(self._sorted, value)
        if self.history_size is not None and len(self._order) > self.history_size:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        return _percentile_sorted(self._sorted, self.percentile)

    def _update_tensor(self, norm: Any) -> Any:
        import torch

        if self._buffer is None:  # first tensor: the host history moves to the device
            device = norm.device if _is_tensor(norm) else "cpu"
            self._buffer = torch.tensor(list(self._order), dtype=torch.float64, device=device)
            self._order.clear()
            self._sorted.clear()
        stored = self._count - 1  # norms in the history before this one, capped below
        capacity = self._buffer.numel()
        if self.history_size is not None:
            slot = stored % self.history_size  # ring buffer: order does not matter to a percentile
            if capacity < self.history_size and slot >= capacity:
                self._buffer = torch.cat([self._buffer, self._buffer.new_zeros(max(capacity, 1))])[: self.history_size]
        else:
            slot = stored
            if slot >= capacity:
                self._buffer = torch.cat([self._buffer, self._buffer.new_zeros(max(capacity, 1))])
        self._buffer[slot] = torch.as_tensor(norm, dtype=torch.float64, device=self._buffer.device)
        filled = self._count if self.history_size is None else min(self._count, self.history_size)
        return torch.quantile(self._buffer[:filled], self.percentile / 100.0)

    def state_dict(self) -> Dict[str, Any]:
        """Settings and history (a list of floats, or a float64 tensor on the
        norms' device when tensors were given)."""
        if self._buffer is not None:
            filled = self._count if self.history_size is None else min(self._count, self.history_size)
            history: Any = self._buffer[:filled].clone()
        else:
            history = list(self._order)
        return {"percentile": self.percentile, "history_size": self.history_size, "count": self._count,
                "history": history}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.__init__(state["percentile"], state["history_size"])  # type: ignore[misc]
        history = state["history"]
        if _is_tensor(history):
            self._buffer = history.clone()
        else:
            self._order.extend(float(v) for v in history)
            self._sorted = sorted(self._order)
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history_size={self.history_size}, seen={self._count})"


class ZClip:
    """ZClip: z-score spike detection on EMA statistics of the gradient norm.

    For the first ``warmup_steps`` norms the threshold is ``max_norm`` (or
    none); their mean and (population) variance then start the EMAs. After
    that, with ``std = sqrt(var)`` and ``z = (norm - mean) / (std + eps)``:
    when ``z > z_thresh`` the threshold is ``mean + z_thresh * std / (z /
    z_thresh)`` (``clip_to='adaptive'``: larger spikes are pushed further down,
    as in the authors' reference implementation) or ``mean``
    (``clip_to='mean'``), capped at ``max_norm``; otherwise it is ``max_norm``
    (inf when None: no clipping). The EMAs are then updated with the clipped
    norm, ``mean = alpha * mean + (1 - alpha) * x`` and
    ``var = alpha * var + (1 - alpha) * (x - mean)**2`` (the new mean), unless
    ``skip_update_on_spike`` and this step was a spike.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 max_norm: Optional[float] = None, clip_to: str = "adaptive", eps: float = 1e-6,
                 skip_update_on_spike: bool = False):
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if not float(z_thresh) > 0.0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh!r}")
        if int(warmup_steps) < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
        if max_norm is not None and not float(max_norm) > 0.0:
            raise ValueError(f"max_norm must be > 0 or None, got {max_norm!r}")
        if clip_to not in ("adaptive", "mean"):
            raise ValueError(f"clip_to must be 'adaptive' or 'mean', got {clip_to!r}")
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup_steps = int(warmup_steps)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.clip_to = clip_to
        self.eps = float(eps)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self._warmup: list = []
        self.mean: Any = None
        self.var: Any = None
        self.spike: Any = False  # whether the latest update was a spike (a bool tensor for tensor norms)

    @property
    def cap(self) -> float:
        return math.inf if self.max_norm is None else self.max_norm

    def update(self, norm: Any) -> Any:
        """Record this step's gradient norm; return the threshold to clip it to
        (inf: no clipping)."""
        tensor = _is_tensor(norm)
        if not tensor:
            norm = float(norm)
            if not math.isfinite(norm):
                raise ValueError(f"ZClip.update: the norm must be finite, got {norm}")
        if self.mean is None:
            self._warmup.append(norm)
            if len(self._warmup) >= self.warmup_steps:
                self._start_ema()
            self.spike = False
            return self._as_norm_type(self.cap, norm)
        if tensor and not _is_tensor(self.mean):
            import torch

            self.mean = torch.tensor(self.mean, dtype=torch.float64, device=norm.device)
            self.var = torch.tensor(self.var, dtype=torch.float64, device=norm.device)
        std = self.var ** 0.5
        z = (norm - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        if self.clip_to == "adaptive":
            # z / z_thresh > 1 on a spike; guard the division where there is none.
            eta = _where(spike, z / self.z_thresh, 1.0)
            spike_limit = self.mean + self.z_thresh * std / eta
        else:
            spike_limit = self.mean
        threshold = _minimum(_where(spike, spike_limit, self._as_norm_type(math.inf, norm)), self.cap)
        seen = _where(spike, spike_limit, norm)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * seen
        new_var = self.alpha * self.var + (1 - self.alpha) * (seen - new_mean) ** 2
        if self.skip_update_on_spike:
            new_mean = _where(spike, self.mean, new_mean)
            new_var = _where(spike, self.var, new_var)
        self.mean, self.var, self.spike = new_mean, new_var, spike
        return threshold

    @staticmethod
    def _as_norm_type(value: float, like: Any) -> Any:
        if _is_tensor(like):
            import torch

            return torch.tensor(value, dtype=torch.float64, device=like.device)
        return value

    def _start_ema(self) -> None:
        if _is_tensor(self._warmup[0]):
            import torch

            w = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in self._warmup])
            self.mean = w.mean()
            self.var = ((w - self.mean) ** 2).mean()
        else:
            n = len(self._warmup)
            self.mean = math.fsum(self._warmup) / n
            self.var = math.fsum((x - self.mean) ** 2 for x in self._warmup) / n
        self._warmup = []

    def state_dict(self) -> Dict[str, Any]:
        return {
            "alpha": self.alpha, "z_thresh": self.z_thresh, "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm, "clip_to": self.clip_to, "eps": self.eps,
            "skip_update_on_spike": self.skip_update_on_spike,
            "warmup": list(self._warmup), "mean": self.mean, "var": self.var,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.__init__(state["alpha"], state["z_thresh"], state["warmup_steps"], state["max_norm"],  # type: ignore[misc]
                      state["clip_to"], state["eps"], state["skip_update_on_spike"])
        self._warmup = list(state["warmup"])
        self.mean, self.var = state["mean"], state["var"]

    def __repr__(self) -> str:
        return (f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
                f"max_norm={self.max_norm}, clip_to={self.clip_to!r}, mean={self.mean}, var={self.var})")
