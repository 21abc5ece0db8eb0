"""A digest of gradclip's outputs on a fixed set of calls, to show that a
refactoring changed no result bit: run it before and after, on the same
machine, and compare the two lines it prints (one digest per case group, then
one over all).

    python bench/output_digest.py            # every case
    python bench/output_digest.py --verbose  # one digest per case

Every case uses the public API only: norms of every order and dtype (overflow,
underflow, NaN, inf, empty and repeated tensors), every clip (global, per
tensor, normalise, value, by a given norm), the torch drop-ins, the training
records under every nonfinite policy and per-group limits, AGC and AutoClip.
The digest covers the returned values and every tensor's bytes afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import zlib

import numpy as np

import gradclip

ORDERS = [1.0, 2.0, math.inf, 3.0, 0.5, 1500.0]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
SIZES = [0, 1, 15, 16, 17, 1000, 32769, 70001]


def _torch():
    import torch

    return torch


def _seed(*key) -> int:
    """A seed from a key, the same in every process (str hashes are salted)."""
    return zlib.crc32(repr(key).encode())


def _arrays(seed, dtype, sizes, scale=1.0, special=None):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)
    out = []
    for i, n in enumerate(sizes):
        t = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(tdtype)
        if special is not None and n > 0 and i % 2 == 0:
            t[n // 2] = special
        out.append(t)
    return out


def _bytes(x) -> bytes:
    torch = _torch()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
        return x.contiguous().numpy().tobytes() + str(x.dtype).encode()
    if isinstance(x, np.ndarray):
        return x.tobytes() + str(x.dtype).encode()
    return repr(x).encode()


class Digest:
    def __init__(self, verbose):
        self.groups = {}
        self.verbose = verbose

    def add(self, group, name, *values):
        h = hashlib.sha256()
        for v in values:
            if isinstance(v, (list, tuple)):
                for item in v:
                    h.update(_bytes(item))
            else:
                h.update(_bytes(v))
        self.groups.setdefault(group, hashlib.sha256()).update(h.digest())
        if self.verbose:
            print(f"{group}/{name}: {h.hexdigest()[:16]}")


def norms(d: Digest):
    for dtype in DTYPES:
        for p in ORDERS:
            for case, (scale, special) in {
                "plain": (1.0, None),
                "huge": (1e300 if dtype == "float64" else 1e30, None),
                "tiny": (1e-300 if dtype == "float64" else 1e-30, None),
                "nan": (1.0, float("nan")),
                "inf": (1.0, float("inf")),
            }.items():
                xs = _arrays(_seed(dtype, p, case), dtype, SIZES, scale, special)
                d.add("norms", f"{dtype}-{p}-{case}", gradclip.get_total_norm(xs, p),
                      gradclip.tensor_norms(xs, p), gradclip.global_norm(xs + [xs[3]], p))
    neg_zero = [np.full(n, -0.0, np.float32) for n in (1, 17, 40)]
    d.add("norms", "negative-zero-inf", gradclip.tensor_norms(neg_zero, math.inf))


def clips(d: Digest):
    for dtype in DTYPES:
        for p in [1.0, 2.0, math.inf, 3.0]:
            for limit in [0.0, 0.5, 1e9]:
                xs = _arrays(_seed(dtype, p, limit), dtype, SIZES)
                total = gradclip.clip_by_global_norm_(xs, limit, p)
                d.add("clip", f"global-{dtype}-{p}-{limit}", total, xs)
                xs = _arrays(_seed(dtype, p, limit, 1), dtype, SIZES)
                d.add("clip", f"per-tensor-{dtype}-{p}-{limit}", gradclip.clip_by_norm_(xs, limit, p), xs)
                xs = _arrays(_seed(dtype, p, limit, 2), dtype, SIZES)
                d.add("clip", f"normalize-{dtype}-{p}-{limit}", gradclip.normalize_(xs, limit, p), xs)
                xs = _arrays(_seed(dtype, p, limit, 3), dtype, SIZES, special=float("nan"))
                d.add("clip", f"value-{dtype}-{p}-{limit}", gradclip.clip_by_value_(xs, limit), xs)
    for special in [float("nan"), float("inf")]:
        xs = _arrays(7, "float32", SIZES, special=special)
        d.add("clip", f"propagate-{special}", gradclip.clip_by_global_norm_(xs, 1.0), xs)


def dropins(d: Digest):
    torch = _torch()
    for dtype in DTYPES:
        for p in [2.0, math.inf, 1.0]:
            params = [torch.nn.Parameter(t.clone()) for t in _arrays(11, dtype, SIZES[1:])]
            for i, prm in enumerate(params):
                prm.grad = _arrays(100 + i, dtype, [prm.numel()], scale=3.0)[0]
            params[2].grad = None
            total = gradclip.clip_grad_norm_(params, 1.0, p)
            d.add("dropin", f"clip_grad_norm_-{dtype}-{p}", total, [q.grad for q in params if q.grad is not None])
            total = gradclip.get_total_norm([q.grad for q in params if q.grad is not None], p)
            gradclip.clip_grads_with_norm_(params, 0.1, total)
            d.add("dropin", f"clip_grads_with_norm_-{dtype}-{p}", total, [q.grad for q in params if q.grad is not None])
            gradclip.clip_grads_with_norm_(params, 0.05, float(total))
            d.add("dropin", f"float-norm-{dtype}-{p}", [q.grad for q in params if q.grad is not None])
            gradclip.clip_grad_value_(params, 0.01)
            d.add("dropin", f"clip_grad_value_-{dtype}-{p}", [q.grad for q in params if q.grad is not None])


def _model(seed):
    torch = _torch()
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 3))


def _backward(model, scale, special=None):
    torch = _torch()
    g = torch.Generator().manual_seed(int(scale * 1000) % 2**31)
    x = torch.randn(64, 13, generator=g)
    model.zero_grad(set_to_none=True)
    (model(x).square().sum() * scale).backward()
    if special is not None:
        next(model.parameters()).grad[0, 0] = special


def _record_values(r):
    return [repr(sorted(r.as_dict().items())), repr(sorted(r.tensor_norms().items())), repr(r.nonfinite_names())]


def training(d: Digest):
    torch = _torch()
    options = [dict(global_clipnorm=0.5), dict(clipnorm=0.1), dict(clipvalue=0.01), dict(agc=0.05), {}]
    for opt in options:
        for policy in ["propagate", "skip", "zero", "error"]:
            for special in [None, float("nan"), float("inf")]:
                model = _model(3)
                _backward(model, 5.0, special)
                try:
                    r = gradclip.clip_gradients_(model.parameters(), nonfinite=policy,
                                                 named_parameters=model.named_parameters(), **opt)
                    values = _record_values(r)
                except gradclip.NonfiniteGradientError as e:
                    values = [str(e), repr(e.names)]
                d.add("training", f"{opt}-{policy}-{special}", values, [p.grad for p in model.parameters()])
    # attach: per-group limits, scheduled limits, AutoClip
    model = _model(4)
    opt = torch.optim.SGD([{"params": list(model[0].parameters()) + list(model[2].parameters())},
                           {"params": model[4].parameters(), "global_clipnorm": 2.0}], lr=0.1)
    records = []
    handle = gradclip.attach(opt, global_clipnorm=0.1, on_step=records.append)
    for step in range(4):
        _backward(model, 3.0 + step)
        opt.step()
    handle.remove()
    d.add("training", "attach-groups", [_record_values(r) for r in records], list(model.parameters()))
    model = _model(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    handle = gradclip.attach(opt, global_clipnorm=gradclip.AutoClip(percentile=50), on_step=records.append)
    for step in range(6):
        _backward(model, 1.0 + step * step)
        opt.step()
    handle.remove()
    d.add("training", "attach-autoclip", [_record_values(r) for r in records], list(model.parameters()))
    model = _model(6)
    _backward(model, 9.0)
    r = gradclip.adaptive_clip_grad_(model.parameters(), 0.01)
    d.add("training", "adaptive_clip_grad_", _record_values(r), [p.grad for p in model.parameters()])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    gradclip.set_num_threads(2)
    d = Digest(args.verbose)
    for case in (norms, clips, dropins, training):
        case(d)
    total = hashlib.sha256()
    for group, h in d.groups.items():
        print(f"{group}: {h.hexdigest()}")
        total.update(h.digest())
    print(f"all: {total.hexdigest()}  (gradclip {gradclip.__version__}, isa {gradclip.build_info()['isa']})")


if __name__ == "__main__":
    sys.exit(main())
