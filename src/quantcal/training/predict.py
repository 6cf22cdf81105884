"""Logits of a model on a split or on any batches, in eval mode and float32:
:func:`predict_logits`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from quantcal.training.splits import Split, Splits

__all__ = ["predict_logits"]


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def predict_logits(
    model: nn.Module,
    data: Split | Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits float32 CPU (N, C), labels int64 CPU (N,))`` of ``model`` on ``data``.

    Runs in eval mode under ``torch.inference_mode`` in float32 (no autocast), in the data's
    order (a :class:`~quantcal.data.Split` is read unshuffled, unaugmented). ``data`` is a Split
    or any iterable of ``(x, y)`` batches. ``device`` defaults to the model's; the model is moved
    there for the call and back afterwards, and its training flag is restored. The outputs are
    ordinary tensors (usable with autograd, e.g. to fit a temperature).
    """
    if isinstance(data, Splits):
        raise TypeError("predict_logits needs one split, e.g. splits.test, not the whole Splits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    home = _model_device(model)
    dev = home if device is None else torch.device(device)
    was_training = model.training
    outs: list[torch.Tensor] = []
    labs: list[torch.Tensor] = []
    try:
        if dev != home:
            model.to(dev)
        model.eval()
        batches = data.batches(batch_size, device=dev) if isinstance(data, Split) else data
        with torch.inference_mode():
            for x, y in batches:
                out = model(x.to(dev))
                if out.dim() != 2 or out.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"model returned shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
                        "expected logits (batch, num_classes)"
                    )
                outs.append(out.float().cpu())
                labs.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
        if dev != home:
            model.to(home)
    if not outs:
        raise ValueError("predict_logits got no batches: the data is empty")
    # Concatenating outside inference mode yields normal tensors, not inference tensors.
    return torch.cat(outs).float(), torch.cat(labs).long()
