"""Launch a worker script on two CPU processes with torchrun (gloo), for the DDP tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_two_processes(script: Path, *args: str, timeout: float = 240) -> None:
    """Run ``script`` under ``torch.distributed.run --standalone --nproc_per_node=2`` with one
    thread per process and no inherited rendezvous variables (``--standalone`` takes a free port
    per run); assert it exits 0 within ``timeout`` seconds, with stdout and stderr tails in the
    message. No retry: the gloo abort at exit it once retried is fixed at its cause (the DDP
    wrapper, whose reducer held the process group, lived until interpreter exit; ``train._run``
    frees it and the ranks meet at a barrier before the group is destroyed), and ``make
    ddp-soak`` runs these tests 20 times in a row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        *args,
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        raise AssertionError(
            f"two-process torchrun of {script.name} did not finish in {timeout:g} s (a rank "
            f"waiting on its peer?); stderr tail: {tail!r}"
        ) from None
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
