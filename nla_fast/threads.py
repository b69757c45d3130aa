"""How many CPU threads torch should use: the CPUs this process may run on, less those others keep busy.

torch starts one intra-op (OpenMP) thread per core it sees. On a shared host (other jobs, an
affinity mask, a container's CPU quota, several ranks on one machine) that oversubscribes the
cores, and an OpenMP thread spinning at a barrier for a descheduled peer turns a 100 us op into
milliseconds. ``cpu_threads()`` picks, in order:

1. ``NLA_FAST_THREADS`` when set (a positive integer);
2. ``OMP_NUM_THREADS`` when set (torch already follows it);
3. else the CPUs this process may use (its affinity mask, capped by a cgroup CPU quota), shared
   among the ranks on this host (``LOCAL_WORLD_SIZE``), less the CPUs other processes keep busy
   (the 1-minute load average when it is read, normally at start-up); at least 1.

``use_cpu_threads()`` applies that with ``torch.set_num_threads`` and returns it (the CPU trainer
and the benches call it once at start).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ["ThreadsError", "cpu_threads", "use_cpu_threads", "usable_cpus"]


class ThreadsError(ValueError):
    """A thread-count environment variable that is not a positive integer."""


def _env_threads(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ThreadsError(f"{name} must be a positive integer, got {value!r}")
    return n


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by the cgroup (v2 cpu.max or v1 cfs quota), None when unlimited or unknown."""
    roots = [Path("/sys/fs/cgroup")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[2].startswith("/") and parts[2] != "/":
                roots.insert(0, Path("/sys/fs/cgroup") / parts[2].lstrip("/"))
    except OSError:
        pass
    for root in roots:
        try:
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
        try:
            quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
        except (OSError, ValueError):
            pass
    return None


def _busy_cpus() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded down)."""
    cpus = _affinity_cpus()
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cpu_threads() -> int:
    """The intra-op thread count for this process (see the module docstring for the rules)."""
    for name in ("NLA_FAST_THREADS", "OMP_NUM_THREADS"):
        explicit = _env_threads(name)
        if explicit is not None:
            return explicit
    ranks = _env_threads("LOCAL_WORLD_SIZE") or 1
    share = usable_cpus() // ranks
    free = math.floor(usable_cpus() - _busy_cpus()) // ranks
    return max(1, min(share, free))


def use_cpu_threads() -> int:
    """``torch.set_num_threads(cpu_threads())``; returns the count."""
    n = cpu_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
