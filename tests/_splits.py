"""A tiny separable training split for tests that fine-tune (QAT): four classes of 8x8 RGB
images whose brightness is 60 x the label plus noise below 40, so one epoch learns something."""

from __future__ import annotations

import torch

from quantcal.training.data import Split


def four_class_split(n: int, seed: int = 0) -> Split:
    """``n`` images, labels ``arange(n) % 4``, normalised with mean 0.5 and std 0.25."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = labels.view(-1, 1, 1, 1) * 60 + torch.randint(0, 40, (n, 3, 8, 8), generator=g)
    return Split(images.to(torch.uint8), labels, (0.5,) * 3, (0.25,) * 3, torch.arange(n))
