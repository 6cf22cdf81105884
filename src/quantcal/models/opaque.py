"""Blocks torch.fx cannot trace, kept as opaque leaf modules of the deploy graph (issue #26).

``to_deploy`` traces a model with ``torch.fx``; a block whose ``forward`` branches on a tensor's
value or shape (timm's MobileViT, EfficientViT's ``LiteMLA``, TinyViT, ``ConvMlp``, the
TF-style "same" padding of ``Conv2dSame``) stops the trace. Rather than refusing the model,
``to_deploy`` retraces it with each such block as one ``call_module`` node (the smallest
failing block first) and records them; ``quantcal.quant.fallback`` then quantizes the
conv/linear modules inside them by module.

This module holds what both sides need about such a block's layers: :func:`conv_form` says
whether a conv/linear subclass with its own ``forward`` still computes a plain conv/linear
(``"plain"``) or a conv with TF "same" padding from the input size (``"same"``), checked by
running it on probe inputs, and :func:`pad_same` is that padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LAYER_TYPES",
    "conv_form",
    "keeps_torch_forward",
    "opaque_notes",
    "pad_same",
    "same_padding",
]

#: The layer types whose modules quantcal quantizes.
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def keeps_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a conv/linear layer whose class keeps torch's ``forward``."""
    return any(
        isinstance(module, base) and type(module).forward is base.forward for base in LAYER_TYPES
    )


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding of one spatial axis for TF "same" (output ``ceil(size / stride)``):
    ``max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)``."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    value: float = 0.0,
) -> torch.Tensor:
    """``x`` padded for a TF "same" conv over its last ``len(kernel)`` axes, the smaller half
    before and the larger after (``timm.layers.pad_same``)."""
    pads: list[int] = []
    for axis in range(1, len(kernel) + 1):  # F.pad lists the last axis first
        total = same_padding(int(x.shape[-axis]), kernel[-axis], stride[-axis], dilation[-axis])
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _reference(module: nn.Module, x: torch.Tensor, form: str) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    if form == "same":
        x = pad_same(x, module.kernel_size, module.stride, module.dilation)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
        return conv(x, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    base = next(b for b in LAYER_TYPES if isinstance(module, b))
    return base.forward(module, x)


def _probes(module: nn.Module) -> list[torch.Tensor]:
    """Two random inputs of ``module``'s input width: odd and even spatial sizes (where
    "same" padding differs), large enough for its kernel."""
    g = torch.Generator().manual_seed(0)
    w = module.weight
    if isinstance(module, nn.Linear):
        shapes = [(2, module.in_features), (2, 3, module.in_features)]
    else:
        k = max((kk - 1) * d + 1 for kk, d in zip(module.kernel_size, module.dilation, strict=True))
        side = k + 2 * max(module.stride) + 1
        spatial = len(module.kernel_size)
        shapes = [(1, module.in_channels, *[side + i % 2 for i in range(spatial)])]
        shapes.append((1, module.in_channels, *[side + 1 + i % 2 for i in range(spatial)]))
    return [torch.randn(s, generator=g).to(device=w.device, dtype=w.dtype) for s in shapes]


def conv_form(module: nn.Module) -> str | None:
    """How a conv/linear module computes, checked on probe inputs: ``"plain"`` (the layer with
    its own weight, bias, stride, padding, ...; every class keeping torch's ``forward``),
    ``"same"`` (a zero-padding-0 ``Conv1d/2d/3d`` whose ``forward`` pads its input for TF "same"
    first, as ``timm.layers.Conv2dSame`` does), or None (anything else: weight standardization,
    another padding, ...; such a layer cannot be quantized as a plain layer)."""
    if not isinstance(module, LAYER_TYPES):
        return None
    if keeps_torch_forward(module):
        return "plain"
    forms = ["plain"]
    padded = isinstance(module, nn.Linear) or module.padding_mode != "zeros"
    if not padded and all(p == 0 for p in _padding(module)):
        forms.insert(0, "same")
    try:
        with torch.no_grad():
            probes = _probes(module)
            outs = [module(x) for x in probes]
            for form in forms:
                refs = [_reference(module, x, form) for x in probes]
                if all(_close(o, r) for o, r in zip(outs, refs, strict=True)):
                    return form
    except (RuntimeError, TypeError, ValueError):
        return None
    return None


def _padding(module: nn.Module) -> tuple[int, ...]:
    pad = module.padding
    if isinstance(pad, str):
        return (0,) if pad == "valid" else (1,)
    return tuple(int(p) for p in pad)


def _close(out: object, ref: torch.Tensor) -> bool:
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool((out - ref).abs().max() <= 1e-5 * max(scale, 1.0)) if ref.numel() else True


def opaque_notes(root: nn.Module, blocks: dict[str, str]) -> str:
    """The warning naming the opaque blocks of a deploy graph (``{path: why}``) and the
    BatchNorms inside them, which are not folded (a block's code is not a graph to rewrite)."""
    listed = "; ".join(f"{path} ({why.splitlines()[0][:200]})" for path, why in blocks.items())
    text = (
        f"to_deploy: torch.fx could not trace {len(blocks)} block(s); each runs as one opaque "
        f"leaf module of the deploy graph: {listed}. quantize quantizes the nn.Conv*/nn.Linear "
        "modules inside them by module (their input ranges observed at the module) and names "
        "whatever else inside them runs in fp32 (found at run time)."
    )
    for path in blocks:
        block = root.get_submodule(path)
        bns = [
            f"{path}.{name}" if name else path
            for name, m in block.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if bns:
            text += f" BatchNorm not folded inside {path}: {', '.join(bns)}."
    return text
