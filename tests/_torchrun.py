"""Launch a worker script on two CPU processes with torchrun (gloo), for the DDP tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_two_processes(script: Path, *args: str, timeout: float = 240) -> None:
    """Run ``script`` under ``torch.distributed.run --standalone --nproc_per_node=2`` with one
    thread per process and no inherited rendezvous variables; assert it exits 0 (stdout and
    stderr tails in the message). gloo's C++ teardown has aborted once on a loaded two-core
    machine ("terminate called without an active exception"): an infrastructure flake, retried
    once; the caller's checks still have to hold."""
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
