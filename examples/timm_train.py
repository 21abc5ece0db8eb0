"""timm's train.py with gradclip doing the clipping, unchanged otherwise.

    python examples/timm_train.py path/to/pytorch-image-models/train.py --clip-grad 1.0 [train.py's arguments]

train.py clips through ``timm.utils.dispatch_clip_grad``, which looks up
``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` when it runs (``--clip-mode
norm`` / ``value``): :func:`gradclip.patch_torch` routes those to gradclip. ``--clip-mode
agc`` calls timm's own ``adaptive_clip_grad``, which takes the same arguments as
:func:`gradclip.adaptive_clip_grad_`, so it is swapped too. With AMP, timm's
NativeScaler unscales before it clips, as with plain torch.

At exit it prints how many clips gradclip ran (stderr), so a run shows it was used.
"""

import atexit
import runpy
import sys

import gradclip

calls = {"clip": 0}


def counted(fn):
    def wrapper(*args, **kwargs):
        calls["clip"] += 1
        return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    gradclip.patch_torch()
    import torch.nn.utils
    import timm.utils.clip_grad as timm_clip

    # Count the calls that reach gradclip (what patch_torch installed, and the AGC swap).
    torch.nn.utils.clip_grad_norm_ = counted(torch.nn.utils.clip_grad_norm_)
    torch.nn.utils.clip_grad_value_ = counted(torch.nn.utils.clip_grad_value_)
    timm_clip.adaptive_clip_grad = counted(gradclip.adaptive_clip_grad_)
    atexit.register(lambda: print(f"gradclip: {calls['clip']} clips", file=sys.stderr))
    script = sys.argv.pop(1)
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
