"""Training-loop integration: clipping as an optimizer step pre-hook, per-group
limits, nonfinite policies and per-step monitoring records.

Every step is one native call over the whole parameter list (an adaptive
limit goes through the engine's seam: one reduction, the clipper's threshold,
then one finish): the per-tensor norms used for monitoring come from the
same pass as the clip.

* :func:`attach` registers the clip on any ``torch.optim`` optimizer (hook.py).
* :func:`clip_gradients_` is the same clip for a hand-written loop (clip.py).
* :class:`StepRecord` is what each step did (records.py); :class:`CsvLogger`
  and :class:`TensorBoardLogger` write records without touching the gradients
  again (loggers.py).
* options.py parses the Keras-style limit options; engine.py runs the clip.
"""

from .clip import adaptive_clip_grad_, clip_gradients_
from .hook import ClipHandle, attach
from .loggers import CsvLogger, TensorBoardLogger
from .options import NONFINITE_POLICIES
from .records import NonfiniteGradientError, StepRecord

__all__ = [
    "NONFINITE_POLICIES",
    "ClipHandle",
    "CsvLogger",
    "NonfiniteGradientError",
    "StepRecord",
    "TensorBoardLogger",
    "adaptive_clip_grad_",
    "attach",
    "clip_gradients_",
]
