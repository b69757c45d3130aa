"""Run a child in its own process group, so that it can be stopped with everything it started
(DataLoader workers, compile workers, torchrun's processes), and stop it."""
from __future__ import annotations

import os
import signal
import subprocess

GRACE_S = 3.0  # between SIGTERM and SIGKILL


def stop_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """End a process started with ``process_group=0`` and its whole group: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
