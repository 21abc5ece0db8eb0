"""Gradient shape sets generated from architecture formulas (nothing is downloaded).

Each workload is the list of parameter shapes of a real model (or a synthetic
set named for what it stresses), in the order ``model.parameters()`` yields
them. The element counts are checked against the published parameter counts
in ``_EXPECTED_ELEMENTS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: Tuple[Shape, ...] = field(repr=False)

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def gpt_shapes(vocab: int, n_ctx: int, d: int, n_layer: int) -> List[Shape]:
    """GPT-2-style decoder (HF ``GPT2Model`` naming; Conv1D weights are (in, out)):
    wte, wpe, per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
    mlp.c_proj (weight and bias each), then ln_f."""
    shapes: List[Shape] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),                # ln_1
            (d, 3 * d), (3 * d,),      # attn.c_attn
            (d, d), (d,),              # attn.c_proj
            (d,), (d,),                # ln_2
            (d, 4 * d), (4 * d,),      # mlp.c_fc
            (4 * d, d), (d,),          # mlp.c_proj
        ]
    shapes += [(d,), (d,)]             # ln_f
    return shapes


def bert_shapes(vocab: int = 30522, max_pos: int = 512, type_vocab: int = 2, d: int = 768, n_layer: int = 12,
                d_ff: int = 3072) -> List[Shape]:
    """BERT encoder with pooler (HF ``BertModel``; Linear weights are (out, in))."""
    shapes: List[Shape] = [(vocab, d), (max_pos, d), (type_vocab, d), (d,), (d,)]
    for _ in range(n_layer):
        shapes += [
            (d, d), (d,), (d, d), (d,), (d, d), (d,),   # query, key, value
            (d, d), (d,), (d,), (d,),                     # attention.output.dense, LayerNorm
            (d_ff, d), (d_ff,),                           # intermediate.dense
            (d, d_ff), (d,), (d,), (d,),                  # output.dense, LayerNorm
        ]
    shapes += [(d, d), (d,)]                              # pooler.dense
    return shapes


def resnet50_shapes(num_classes: int = 1000) -> List[Shape]:
    """torchvision ResNet-50 (v1.5 bottlenecks: stride on the 3x3 conv; stride
    does not change shapes). Convs have no bias; every BatchNorm has weight and bias."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for i in range(blocks):
            width, out = planes, planes * 4
            shapes += [
                (width, inplanes, 1, 1), (width,), (width,),
                (width, width, 3, 3), (width,), (width,),
                (out, width, 1, 1), (out,), (out,),
            ]
            if i == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]  # downsample conv + bn
            inplanes = out
    shapes += [(num_classes, 512 * 4), (num_classes,)]
    return shapes


def lstm_lm_shapes(vocab: int = 33278, d: int = 650, n_layer: int = 2) -> List[Shape]:
    """PyTorch examples' word_language_model LSTM on WikiText-2 (vocabulary 33,278),
    the 'medium' configuration of Zaremba et al.: embedding 650, two 650-unit
    layers, untied decoder. nn.LSTM keeps weight_ih, weight_hh, bias_ih, bias_hh per layer."""
    shapes: List[Shape] = [(vocab, d)]
    for _ in range(n_layer):
        shapes += [(4 * d, d), (4 * d, d), (4 * d,), (4 * d,)]
    shapes += [(vocab, d), (vocab,)]
    return shapes


def llama_shapes(vocab: int, d: int, n_layer: int, kv_dim: int, ffn: int) -> List[Shape]:
    """A Llama-style decoder with tied embeddings: per layer q/k/v/o, the gated
    MLP and two RMSNorm weights, then the final norm."""
    shapes: List[Shape] = [(vocab, d)]
    for _ in range(n_layer):
        shapes += [(d, d), (kv_dim, d), (kv_dim, d), (d, d), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    shapes.append((d,))
    return shapes


def _build() -> Dict[str, Workload]:
    makers: Sequence[Tuple[str, str, Callable[[], List[Shape]]]] = (
        ("gpt2-small", "GPT-2 small (124M): vocab 50257, 1024 positions, d 768, 12 layers",
         lambda: gpt_shapes(50257, 1024, 768, 12)),
        ("bert-base", "BERT-base encoder + pooler (110M): vocab 30522, d 768, 12 layers",
         bert_shapes),
        ("resnet50", "ResNet-50 (25.6M): conv + BatchNorm weights, fc 2048x1000",
         resnet50_shapes),
        ("lstm-lm", "2-layer LSTM LM (50M): WikiText-2 vocab 33278, 650 units, untied decoder",
         lstm_lm_shapes),
        ("transformer-64m", "GPT-style, vocab 32000, d 512, 16 layers (196 tensors, 64.2M)",
         lambda: gpt_shapes(32000, 1024, 512, 16)),
        ("tiny-2000", "2000 tensors of 1024 elements (per-tensor overhead)",
         lambda: [(1024,)] * 2000),
        ("single-64m", "one 8192x8192 tensor (64Mi elements)",
         lambda: [(8192, 8192)]),
        ("llama-1b", "Llama-3.2-1B-shaped (1.24B): vocab 128256, d 2048, 16 layers, 8 KV heads, FFN 8192; "
         "GPU only unless named",
         lambda: llama_shapes(128256, 2048, 16, 512, 8192)),
    )
    return {name: Workload(name, desc, tuple(make())) for name, desc, make in makers}


WORKLOADS: Dict[str, Workload] = _build()

# Published parameter counts: GPT-2 small and BERT-base as in HF transformers,
# ResNet-50 as in torchvision; the rest follow from their formulas.
_EXPECTED_ELEMENTS = {
    "gpt2-small": 124_439_808,
    "bert-base": 109_482_240,
    "resnet50": 25_557_032,
    "lstm-lm": 50_065_078,
    "transformer-64m": 67_347_456,
    "tiny-2000": 2_048_000,
    "single-64m": 67_108_864,
    "llama-1b": 1_235_814_400,  # Llama 3.2 1B as published by Meta
}
for _name, _count in _EXPECTED_ELEMENTS.items():
    assert WORKLOADS[_name].elements == _count, (_name, WORKLOADS[_name].elements)

QUICK_WORKLOADS = ("tiny-2000", "transformer-64m")
# Run when no workload is named: all but the billion-parameter set, which is
# for GPUs (on a CPU it needs ~5 GB per copy in fp32 and minutes per case).
CPU_DEFAULT_WORKLOADS = tuple(name for name in WORKLOADS if name != "llama-1b")
CUDA_DEFAULT_WORKLOADS = tuple(WORKLOADS)


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
