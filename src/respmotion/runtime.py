"""Process set-up shared by every entry point: the device and the CPU threads of every config's ``device`` /
``threads`` setting, memory checks, the shard of a process.

* :func:`quiet_openmp_waits` -- call before torch is first imported (the CLI and ``python -m bench`` do):
  OpenMP workers sleep instead of spinning between parallel regions (``OMP_WAIT_POLICY=PASSIVE``
  unless the user set it), so a busy neighbour is not starved by our idle threads and vice versa.
* :func:`available_memory` -- bytes a new allocation can take now (Linux ``MemAvailable``).
* :func:`check_allocation` -- refuse, before allocating, a request the machine's memory cannot hold
  (the one estimate every command that sizes volumes from user input goes through).
* :func:`resolve_rank` -- this process's shard ``(rank, world size)`` from flags or torchrun's
  environment, validated the same way for every sharded command.
* :func:`use_threads` ``(n)`` -- ``torch.set_num_threads(n)``, with ``n = 0`` meaning the CPUs this
  process may run on (``os.sched_getaffinity``: a container or ``taskset`` may grant fewer than
  ``os.cpu_count()``, which is what torch assumes by default).  Every config's ``threads`` means this.
* :func:`resolve_device` ``(name)`` -- the ``torch.device`` of every config's ``device`` setting
  (``auto``, the default everywhere: CUDA when available, else the CPU).
* :func:`resolve_precision` ``(name, device)`` -- the autocast dtype of a ``precision`` setting (networks at
  inference: ``fp32``, ``bf16``, or ``auto``: bf16 where the device computes it natively).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


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


def check_allocation(what: str, shape: Sequence[int], bytes_per_voxel: float, detail: str = "") -> None:
    """Raise ``MemoryError`` naming ``what`` and the numbers when ``prod(shape) * bytes_per_voxel`` bytes
    exceed :func:`available_memory`; call it before allocating.  ``shape``: voxels ``(z, y, x)``;
    ``bytes_per_voxel``: the peak memory per voxel of the whole request (every copy held at once);
    ``detail``: what the estimate counts, shown in parentheses (e.g. "2 phases at once")."""
    dims = "x".join(str(int(s)) for s in shape)
    need = math.prod(int(s) for s in shape) * bytes_per_voxel
    have = available_memory()
    if need > have:
        extra = f" ({detail})" if detail else ""
        raise MemoryError(f"a {dims} {what} needs about {need / 2**30:,.1f} GiB of memory{extra}, "
                          f"{have / 2**30:,.1f} GiB are available")


def _env_int(name: str) -> int | None:
    """An integer environment variable (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None if unset."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (torchrun sets it to a "
                         f"process's place; unset it or give a number)") from None


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``--rank`` / ``--world-size`` when given (not None), else
    torchrun's ``RANK`` / ``WORLD_SIZE``, else rank 0 of 1.  A world size below 1 or a rank outside
    ``0 .. world size - 1`` raises a one-line ``ValueError`` naming where the value came from."""
    world_src = "--world-size" if world_size is not None else "WORLD_SIZE"
    rank_src = "--rank" if rank is not None else "RANK"
    world = int(world_size) if world_size is not None else _env_int("WORLD_SIZE")
    r = int(rank) if rank is not None else _env_int("RANK")
    world = 1 if world is None else world
    r = 0 if r is None else r
    if world < 1:
        raise ValueError(f"{world_src} {world}: the number of workers must be >= 1")
    if not 0 <= r < world:
        raise ValueError(f"{rank_src} {r}: outside 0..{world - 1} ({world_src} {world})")
    return r, world


def local_rank() -> int:
    """torchrun's ``LOCAL_RANK`` (this process's device index on its machine), 0 when unset; >= 0."""
    n = _env_int("LOCAL_RANK")
    if n is not None and n < 0:
        raise ValueError(f"environment variable LOCAL_RANK={n} must be >= 0")
    return 0 if n is None else n


def quiet_openmp_waits() -> None:
    """Let OpenMP threads sleep while waiting (only effective before torch loads; a user's setting wins)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: what a ``device`` setting may say (``cuda:N`` too)
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The device a ``device`` setting names: ``auto`` -> ``cuda:<LOCAL_RANK>`` when torch sees CUDA, else
    ``cpu``; ``cuda`` -> ``cuda:<LOCAL_RANK>`` (torchrun's, 0 without it); ``cuda:N``; ``cpu``.  CUDA asked for
    on a machine without it, or another name, raises a one-line ``ValueError``."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not re.fullmatch(r"cuda:\d+", name):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device")
    return torch.device(f"cuda:{local_rank()}") if name == "cuda" else torch.device(name)


def use_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to ``requested`` (0: :func:`available_cpus`); returns the number set."""
    import torch

    if requested < 0:
        raise ValueError(f"--threads {requested}: must be >= 0 (0: the CPUs this process may run on)")
    n = requested if requested > 0 else available_cpus()
    torch.set_num_threads(n)
    return n


#: what a ``precision`` setting may say (inference of the networks; training is always fp32)
PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: "torch.device | str") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that supports it, or a CPU with the
    AVX512-BF16 or AMX-BF16 instructions (Linux: read from ``/proc/cpuinfo``; other systems: no).  Elsewhere
    bf16 is emulated and slower than fp32."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap, public way to ask the CPU
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def check_precision(name: str) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else a one-line ``ValueError`` naming ``--precision``."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def resolve_precision(name: str, device: "torch.device | str") -> "torch.dtype | None":
    """The autocast dtype of a ``precision`` setting on ``device``: ``fp32`` -> ``None`` (no autocast), ``bf16``
    -> ``torch.bfloat16``, ``auto`` -> bf16 where :func:`native_bf16`, else ``None``.  Another name, or bf16 on
    a CUDA device without it, raises a one-line ``ValueError`` naming ``--precision``."""
    import torch

    if check_precision(name) == "fp32":
        return None
    native = native_bf16(device)
    if name == "auto":
        return torch.bfloat16 if native else None
    if torch.device(device).type == "cuda" and not native:
        raise ValueError(f"--precision bf16: device {device} does not support bfloat16 (use fp32)")
    return torch.bfloat16
