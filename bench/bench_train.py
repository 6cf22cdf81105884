"""Training input pipeline: quantcal's in-memory batched loader vs a conventional DataLoader.

    .venv/bin/python bench/bench_train.py [--quick] [--threads 2] [--device cpu|cuda] [--workers 0]

The peer is the usual recipe: a ``torch.utils.data.Dataset`` whose ``__getitem__`` does, per
sample, what torchvision's ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
``ToTensor()`` and ``Normalize(mean, std)`` do (torchvision is not installed, so they are written
out by hand with numpy/torch), fed through ``DataLoader(shuffle=True, drop_last=True)`` and
moved to the device. quantcal's ``Split.batches`` keeps the uint8 split on the device and crops,
flips and normalises whole batches there.

1. Data path alone: microseconds per image to produce augmented, normalised batches on the device.
2. Whole training steps (forward, cross-entropy, backward, SGD): images/s at batch 32 and 128,
   same model, same initial weights, same threads.

Data: real CIFAR-100 from ../shared/data/cifar100.npz when present (10,000 training images),
otherwise synthetic images of the same shape. Model: ShuffleNetV2 at width 0.5 from
``quantcal.models`` when importable, otherwise a small CNN (the output says which). Contenders
are interleaved and repeated; medians and ratios are printed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantcal.training.data import CIFAR100_MEAN, CIFAR100_STD, Split

SHARED_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar100.npz")


class PerSampleCifar(torch.utils.data.Dataset):
    """The conventional per-sample pipeline: pad + random crop, flip, to tensor, normalise."""

    def __init__(self, images_nhwc: np.ndarray, labels: np.ndarray, pad: int = 4) -> None:
        self.images, self.labels, self.pad = images_nhwc, labels, pad
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]  # (H, W, C) uint8, like a PIL image
        h, w, _ = img.shape
        p = self.pad
        padded = np.pad(img, ((p, p), (p, p), (0, 0)))  # RandomCrop(padding=4, fill=0)
        top = int(torch.randint(0, 2 * p + 1, ()))
        left = int(torch.randint(0, 2 * p + 1, ()))
        img = padded[top : top + h, left : left + w]
        if torch.rand(()) < 0.5:  # RandomHorizontalFlip
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        x = x.sub_(self.mean).div_(self.std)  # ToTensor + Normalize
        return x, int(self.labels[i])


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    if os.path.exists(SHARED_NPZ):
        with np.load(SHARED_NPZ) as z:
            images, labels = z["train_images"], z["train_labels"].reshape(-1)
        pick = np.random.default_rng(0).permutation(len(labels))[:n]  # the file is class-sorted
        return images[pick], labels[pick].astype(np.int64), f"real CIFAR-100 ({n} train images)"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 100, n), f"synthetic 32x32x3 ({n} images)"


def make_model() -> tuple[Callable[[], nn.Module], str]:
    try:
        from quantcal.models import create_model

        def build() -> nn.Module:
            return create_model("shufflenetv2", num_classes=100, width=0.5, seed=0)

        build()
        return build, "ShuffleNetV2 0.5x (quantcal.models)"
    except Exception as exc:  # models not available: a small CNN keeps the bench runnable
        print(f"quantcal.models unavailable ({exc}); using a small CNN")

        def small() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1, stride=2),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(64, 100),
            )

        return small, "small CNN (32-64 channels)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantcal_batches(split: Split, bs: int, device: torch.device, epoch: int) -> Iterator:
    return split.batches(bs, device=device, shuffle=True, augment=True, epoch=epoch, drop_last=True)


def peer_batches(ds: PerSampleCifar, bs: int, device: torch.device, workers: int) -> Iterator:
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=bs,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def time_data(batches: Iterator, n: int, device: torch.device) -> float:
    """Seconds per image to produce ``n`` batches (generators: no work is done before this)."""
    t0 = time.perf_counter()
    seen = 0
    for x, _ in itertools.islice(batches, n):
        seen += x.shape[0]
    sync(device)
    return (time.perf_counter() - t0) / seen


def time_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator,
    n: int,
    device: torch.device,
) -> float:
    """Images per second over ``n`` full SGD steps fed by ``batches``."""
    model.train()
    sync(device)
    t0 = time.perf_counter()
    seen = 0
    for x, y in itertools.islice(batches, n):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.shape[0]
    sync(device)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the peer")
    ap.add_argument("--images", type=int, default=10_000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 3 if args.quick else 5
    data_batches = 10 if args.quick else 30
    step_batches = {32: 4, 128: 2} if args.quick else {32: 12, 128: 5}
    if device.type == "cuda":
        step_batches = {32: 200, 128: 100}

    images, labels, what = load_images(args.images)
    build, model_name = make_model()
    split = Split(
        images=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        labels=torch.from_numpy(labels),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        indices=torch.arange(len(labels)),
    )
    ds = PerSampleCifar(images, labels)
    print(
        f"data: {what}; model: {model_name}; device: {device}; threads: {args.threads}; "
        f"peer DataLoader workers: {args.workers}; torch {torch.__version__}"
    )
    list(itertools.islice(quantcal_batches(split, 32, device, 0), 1))  # one-time copy to device

    print("\n1. data path alone (augment + normalise + on device), microseconds per image")
    for bs in (32, 128):
        q_t, p_t = [], []
        for r in range(repeats):
            q_t.append(time_data(quantcal_batches(split, bs, device, r), data_batches, device))
            p_t.append(time_data(peer_batches(ds, bs, device, args.workers), data_batches, device))
        q, p = statistics.median(q_t), statistics.median(p_t)
        print(
            f"   batch {bs:4d}: quantcal {q * 1e6:8.1f} us   per-sample DataLoader "
            f"{p * 1e6:8.1f} us   -> quantcal {p / q:5.1f}x cheaper"
        )

    print("\n2. whole training steps (forward + backward + SGD), images per second")
    for bs, n in step_batches.items():
        q_r, p_r = [], []
        model_q, model_p = build().to(device), build().to(device)
        opt_q = torch.optim.SGD(model_q.parameters(), lr=0.05, momentum=0.9)
        opt_p = torch.optim.SGD(model_p.parameters(), lr=0.05, momentum=0.9)
        time_steps(model_q, opt_q, quantcal_batches(split, bs, device, 0), 1, device)
        time_steps(model_p, opt_p, peer_batches(ds, bs, device, args.workers), 1, device)
        for r in range(repeats):
            q_r.append(
                time_steps(model_q, opt_q, quantcal_batches(split, bs, device, r + 1), n, device)
            )
            p_r.append(
                time_steps(model_p, opt_p, peer_batches(ds, bs, device, args.workers), n, device)
            )
        q, p = statistics.median(q_r), statistics.median(p_r)
        print(
            f"   batch {bs:4d} ({n} steps x {repeats}): quantcal {q:7.1f} img/s   "
            f"per-sample DataLoader {p:7.1f} img/s   -> ratio {q / p:4.2f}x"
        )


if __name__ == "__main__":
    main()
