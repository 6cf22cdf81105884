"""The CPU instruction set PyTorch's kernels use, pinned by a study as its thread count is.

Float sums are ordered by the vector width of the kernels as well as by the thread count, so
the same study gives other numbers on an AVX-512 and on an AVX2 processor (the demo's 96
numbers: 69 differ). A study that sets ``isa = "avx2"`` runs every kernel as an AVX2-only
processor would: ATen's CPU dispatch (``ATEN_CPU_CAPABILITY``), oneDNN
(``ONEDNN_MAX_CPU_ISA``) and MKL (``MKL_ENABLE_INSTRUCTIONS``, and ``MKL_CBWR``, MKL's
conditional numerical reproducibility, so that Intel and AMD processors take the same code
path). Each library reads its variable once, at its first use in the process, so the pin works
when it is set before the first tensor operation (``quantcal run`` does so); a process that has
already run PyTorch keeps the kernels it chose, and the study says so in every row's notes.
"""

from __future__ import annotations

import os

__all__ = ["ISAS", "active", "environment", "pin"]

#: The instruction sets a study can pin, and what each library is told.
_ENV = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_CBWR": "AVX2",
    },
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "MKL_CBWR": "AVX512",
    },
}
ISAS = tuple(_ENV)


def environment(isa: str) -> dict[str, str]:
    """The environment variables that pin ``isa`` ("avx2" or "avx512")."""
    if isa not in _ENV:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return dict(_ENV[isa])


def active() -> str:
    """The instruction set of PyTorch's CPU kernels in this process, lower case ("avx2",
    "avx512", "default", ...). Asking fixes it: call :func:`pin` first."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability()).lower()


def pin(isa: str | None) -> list[str]:
    """Ask every library for ``isa`` (None: leave them as they are) and return the notes for
    the rows: none when the kernels in effect are ``isa``, else one saying which run instead
    and why (PyTorch already ran in this process, or the processor lacks ``isa``)."""
    if isa is None:
        return []
    os.environ.update(environment(isa))
    got = active()
    if got == isa:
        return []
    return [
        f"the study pins isa = {isa} but PyTorch runs {got.upper()} kernels here (it ran in "
        "this process before the pin, or the processor lacks the instruction set): its numbers "
        f"may differ from a fresh `quantcal run`; start Python with "
        + " ".join(f"{k}={v}" for k, v in environment(isa).items())
        + " to reproduce them"
    ]
