"""A model quantcal did not write or train: the README's "Your own model" example.

    python docs/examples/digits_cnn.py     # trains it in plain PyTorch, saves digits_cnn.pt
    quantcal eval --checkpoint digits_cnn.pt --model docs/examples/digits_cnn.py:build \\
        --dataset digits --mean 0 --std 1 --out runs/own

It is trained on x / 255 (no standardisation), hence ``--mean 0 --std 1``: quantcal feeds it
what it was trained on. It learns from the images of quantcal's digits ``train`` split only, so
the test split quantcal measures on is unseen.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def build(num_classes: int, in_chans: int) -> nn.Module:
    """The factory quantcal calls (with the dataset's class and channel counts)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def main(out: str = "digits_cnn.pt") -> None:
    from quantcal.training import data

    torch.manual_seed(0)
    train = data.load_dataset("digits").train
    x, y = train.images.float() / 255.0, train.labels
    net = build(10, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(net.state_dict(), out)
    print(f"saved {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
