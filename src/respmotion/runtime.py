"""Process set-up shared by every entry point: CPU threads that fit the CPUs this process may use.

* :func:`quiet_openmp_waits` -- call before torch is first imported (the CLI and ``python -m bench`` do):
  OpenMP workers sleep instead of spinning between parallel regions (``OMP_WAIT_POLICY=PASSIVE``
  unless the user set it), so a busy neighbour is not starved by our idle threads and vice versa.
* :func:`available_memory` -- bytes a new allocation can take now (Linux ``MemAvailable``).
* :func:`use_threads` ``(n)`` -- ``torch.set_num_threads(n)``, with ``n = 0`` meaning the CPUs this
  process may run on (``os.sched_getaffinity``: a container or ``taskset`` may grant fewer than
  ``os.cpu_count()``, which is what torch assumes by default).
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """Number of CPUs this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: fall back to the physical memory size
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def quiet_openmp_waits() -> None:
    """Let OpenMP threads sleep while waiting (only effective before torch loads; a user's setting wins)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def use_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to ``requested`` (0: :func:`available_cpus`); returns the number set."""
    import torch

    n = requested if requested > 0 else available_cpus()
    torch.set_num_threads(n)
    return n
