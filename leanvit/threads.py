"""How many compute threads a command uses: the same choice for every command that runs a model (train, eval,
profile, export's check, predict, search's scoring).

An explicit choice wins (``--threads``, then ``OMP_NUM_THREADS``); otherwise the CPUs this process may use, less those
other processes keep busy right now (`default_threads` says why that matters so much).
"""

import os
import time
from pathlib import Path

import torch

__all__ = ['busy_cpus', 'choose_threads', 'default_threads', 'environment_threads', 'usable_cpus']


def choose_threads(requested: int | None = None, num_workers: int = 0, processes: int = 1) -> tuple[int, str]:
    """Set torch's compute threads and return (threads, why): ``requested`` (``--threads``), else
    ``OMP_NUM_THREADS``, else `default_threads` of the usable and busy CPUs now."""

    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ValueError(f'threads must be an integer >= 1, got {requested!r}')
    if requested:
        threads, why = requested, '--threads'
    elif (threads := environment_threads()) is not None:
        why = 'OMP_NUM_THREADS'
    else:
        cpus, busy = usable_cpus(), busy_cpus()
        threads = default_threads(cpus, busy, num_workers, processes)
        why = f'{cpus} usable CPUs, {busy:.1f} busy with other processes'
    torch.set_num_threads(threads)
    return threads, why


def environment_threads() -> int | None:
    """The thread count the ``OMP_NUM_THREADS`` environment variable sets, if it is a positive integer."""
    value = os.environ.get('OMP_NUM_THREADS', '')
    return int(value) if value.isdigit() and int(value) >= 1 else None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    try:
        quota, period = Path('/sys/fs/cgroup/cpu.max').read_text().split()
        if quota != 'max':
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def busy_cpus(interval: float = 0.25) -> float:
    """How many of the usable CPUs other processes keep busy, measured over ``interval`` seconds while this process
    sleeps (Linux ``/proc/stat``; 0 where it cannot be read). Unlike the load average, it does not lag a minute
    behind, so a run started right after another is not mistaken for a busy machine."""
    cpus = [f'cpu{i} ' for i in (os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else ())]

    def sample() -> tuple[int, int]:
        busy = total = 0
        for line in Path('/proc/stat').read_text().splitlines():
            if line.startswith(tuple(cpus)):
                ticks = [int(v) for v in line.split()[1:]]
                idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                busy, total = busy + sum(ticks) - idle, total + sum(ticks)
        return busy, total

    try:
        (busy0, total0), _, (busy1, total1) = sample(), time.sleep(interval), sample()
    except (OSError, ValueError, IndexError):
        return 0.
    return len(cpus) * (busy1 - busy0) / max(total1 - total0, 1)


def default_threads(cpus: int, busy: float, num_workers: int, processes: int = 1) -> int:
    """Compute threads that do not oversubscribe the CPUs: the ``cpus`` this process may use (`usable_cpus`), less
    the ``busy`` ones other processes occupy (`busy_cpus`) and the data-loader workers, shared among this run's
    ``processes``; at least 1.

    Why: torch's OpenMP threads wait for each other at every operator, so one thread that shares its core with
    another process stalls them all (docs/deploy.md, "Threads", has a measurement).
    """
    return max(1, (cpus - round(busy) - num_workers) // processes)
