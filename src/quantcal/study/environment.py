"""Where a study runs: the environment record saved as ``env.json``, the device, the process's
rank under torchrun, the pinned thread count and the default progress log."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["environment_record", "pinned_threads", "rank", "resolve_device", "stderr_log"]


def environment_record(device: str) -> dict[str, Any]:
    """Versions, device and threads: saved as env.json beside every result."""
    import numpy
    import torch

    import quantcal

    rec: dict[str, Any] = {
        "quantcal": quantcal.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        rec["cuda"] = torch.version.cuda
        rec["gpu"] = torch.cuda.get_device_name(0)
    return rec


def resolve_device(device: str | None) -> str:
    """``device`` as torch names it ("auto" or None: cuda when available, else cpu); a
    ValueError naming --device when it does not exist here."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}; use 'cpu', 'cuda', 'cuda:1' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    return str(dev)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads (None: leave PyTorch's setting), then restore."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stderr_log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
