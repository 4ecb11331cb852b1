"""What step ``k`` of a training run gets, as a fixed function of ``k``: its learning-rate factor and its micro-batch.

* :class:`WarmupCosine`: linear warmup, then cosine decay to a floor (a ``LambdaLR`` factor of ``lr_max``).
* :class:`GlobalBatches`: micro-batch ``k`` of the run is a fixed function of ``(seed, k)``: the training set
  is shuffled once per epoch with ``seed`` and cut into global micro-batches of ``batch_size x world_size``
  items; rank ``r`` takes items ``[r*batch_size, (r+1)*batch_size)``.  So one process with ``batch_size = 2``
  and two processes with ``batch_size = 1`` see the same samples, and a resumed run continues with the
  micro-batch after its checkpoint.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class WarmupCosine:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then cosine to ``floor`` at ``total``."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


class GlobalBatches(Sampler[list[int]]):
    """Endless per-rank micro-batches, starting at global micro-batch ``start`` (module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0) -> None:
        self.n, self.b, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch < 1:
            raise ValueError(f"the training set has {n} items, fewer than one global batch "
                             f"({batch_size} per process x {world} processes)")

    def __iter__(self) -> Iterator[list[int]]:
        g = self.b * self.world
        k, epoch, perm = self.start, -1, None
        while True:
            e, j = divmod(k, self.per_epoch)
            if e != epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
                epoch = e
            glob = perm[j * g:(j + 1) * g]
            yield glob[self.rank * self.b:(self.rank + 1) * self.b].tolist()
            k += 1
