"""The options every training-loop clip takes (Keras' names), parsed once."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

from .._inputs import nonnegative, norm_order

NONFINITE_POLICIES = ("propagate", "error", "skip", "zero")

# torch's clip_grad_norm_ rule: coef = max_norm / (total_norm + 1e-6).
TORCH_EPS = 1e-6
LIMIT_OPTIONS = ("global_clipnorm", "clipnorm", "clipvalue", "agc")
# The engine's clip kind of each norm or value option (agc has its own entry point).
KIND_OF_OPTION = {None: "global", "global_clipnorm": "global", "clipnorm": "per_tensor", "clipvalue": "value"}


@dataclass(frozen=True)
class ClipOptions:
    """One clip's configuration: at most one limit option (Keras allows one)
    with its value, the norm order, the nonfinite policy and the epsilons."""

    option: Optional[str]  # one of LIMIT_OPTIONS, or None (measure only)
    limit: Any             # a number, None, or an adaptive clipper (global_clipnorm)
    p: float
    nonfinite: str
    eps: float
    agc_eps: float
    process_group: Any = None  # the gradients are shards over these groups (gradclip.distributed)
    replicated: Any = None     # parameters every rank of the first group holds whole

    @property
    def adaptive(self) -> bool:
        """Whether the limit is an adaptive clipper (AutoClip, ZClip)."""
        return self.option == "global_clipnorm" and hasattr(self.limit, "update")

    @property
    def fixed_global_limit(self) -> bool:
        """A fixed ``global_clipnorm``: one coefficient from one norm (combined over
        the ranks where the gradients are shards), which a fused step can take."""
        return self.option == "global_clipnorm" and not self.adaptive

    @property
    def one_global_limit(self) -> bool:
        """A fixed ``global_clipnorm`` over local gradients, which the clip_grad_norm_
        op (no process groups) computes as it is."""
        return self.fixed_global_limit and not self.distributed

    @property
    def distributed(self) -> bool:
        """Whether the norms are combined over process groups."""
        return self.process_group is not None or self.replicated is not None

    @property
    def default_limit(self) -> float:
        """The engine's limit for parameters without a limit of their own: no
        option, a None limit or an adaptive clipper mean no clipping (inf)."""
        if self.option is None or self.limit is None or self.adaptive:
            return math.inf
        return float(self.limit)


def clip_options(global_clipnorm: Any = None, clipnorm: Optional[float] = None, clipvalue: Optional[float] = None,
                 agc: Optional[float] = None, norm_type: Any = 2.0, nonfinite: str = "propagate",
                 eps: float = TORCH_EPS, agc_eps: float = 1e-3, process_group: Any = None,
                 replicated: Optional[Iterable[Any]] = None) -> ClipOptions:
    """The options of :func:`gradclip.attach` and :func:`gradclip.clip_gradients_`, checked."""
    option, limit = _limit_option(global_clipnorm, clipnorm, clipvalue, agc)
    if replicated is not None:
        replicated = tuple(replicated)
    options = ClipOptions(option, limit, norm_order(norm_type, "norm_type"), check_policy(nonfinite),
                          nonnegative(eps, "eps"), nonnegative(agc_eps, "agc_eps"), process_group, replicated)
    if options.distributed and (option == "agc" or options.adaptive or option == "clipnorm"):
        what = "agc" if option == "agc" else "an adaptive clipper" if options.adaptive else "clipnorm"
        raise ValueError(f"process_group: {what} over sharded gradients is not available yet (each would need "
                         "norms combined per row or per tensor); use global_clipnorm or clipvalue")
    return options


def check_policy(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite


def _limit_option(global_clipnorm, clipnorm, clipvalue, agc):
    """The one limit option given (Keras allows at most one), and its value."""
    given = {k: v for k, v in zip(LIMIT_OPTIONS, (global_clipnorm, clipnorm, clipvalue, agc)) if v is not None}
    if len(given) > 1:
        received = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"Only one of `global_clipnorm`, `clipnorm`, `clipvalue` and `agc` can be set. Received: {received}")
    if not given:
        return None, None
    (option, value), = given.items()
    if option == "global_clipnorm" and hasattr(value, "update"):
        return option, value  # an adaptive clipper (AutoClip, ZClip)
    return option, check_limit(value, option, agc=option == "agc")


def check_limit(value: Any, what: str, *, agc: bool) -> Optional[float]:
    """A per-group or default limit, named ``what`` in errors: None (no
    clipping) or a number >= 0; for AGC, the clipping factor, > 0 and finite."""
    if value is None:
        return None
    if agc:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a number, got {value!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{what} must be > 0 and finite (the AGC clipping factor), got {value!r}")
        return v
    return nonnegative(value, what)


F = TypeVar("F", bound=Callable[..., Any])


def with_clip_options(fn: F) -> F:
    """The clip options, declared once (``clip_options``'s keywords) for every
    front end that takes them: the decorated function declares its own
    parameters and a keyword-only ``options``; callers pass the options as
    keywords, which arrive parsed in ``options``. Its signature (help(),
    inspect) lists them all."""
    option_params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                     for p in inspect.signature(clip_options).parameters.values()]
    names = frozenset(p.name for p in option_params)
    own = inspect.signature(fn)
    positional = [p for p in own.parameters.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keywords = [p for p in own.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name != "options"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {k: kwargs.pop(k) for k in names & kwargs.keys()}
        return fn(*args, options=clip_options(**given), **kwargs)

    wrapper.__signature__ = own.replace(parameters=positional + option_params + keywords)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
