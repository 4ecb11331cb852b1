"""Typed configuration of ``respmotion register`` (see :mod:`respmotion.config` for loading/overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .ffd import FFDSettings


@dataclass
class RegisterConfig:
    """Where to read/write, which pairs, how to shard, and the optimiser settings (``ffd.*``)."""

    data: str = ""  # cohort root (layout of respmotion.io.layout)
    out: str = ""  # output root: <out>/<patient>/<study>/<pair>.npz (+ .json quality record)
    pairs: str = "both"  # ref | step | both
    patients: tuple[str, ...] = ()  # register only these patients' studies (default: every patient)
    reference: int = 0  # reference phase (percent) of the ref_XX pairs
    rank: Optional[int] = None  # shard index; default torchrun's RANK or 0
    world_size: Optional[int] = None  # number of shards; default torchrun's WORLD_SIZE or 1
    device: str = "cpu"  # cpu | cuda (cuda:<LOCAL_RANK> under torchrun)
    batch_size: int = 0  # pairs per optimiser batch (0: as many of a study's pairs as fit in memory, auto_batch_size)
    threads: int = 0  # torch CPU threads (0: torch's default)
    body_threshold_hu: float = -500.0
    lung_threshold_hu: float = -400.0  # lung masks for sliding (computed when the study has none)
    coef_dtype: str = "float32"  # float32 | float16 storage of control points
    write_masks: bool = True  # write body masks to <out>/<patient>/<study>/masks/body_XX.npy
    ffd: FFDSettings = field(default_factory=FFDSettings)

    def check(self) -> None:
        if self.pairs not in ("ref", "step", "both"):
            raise ValueError(f"pairs must be ref, step or both, got {self.pairs!r}")
        if self.coef_dtype not in ("float32", "float16"):
            raise ValueError(f"coef_dtype must be float32 or float16, got {self.coef_dtype!r}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {self.batch_size}")
        self.ffd.check()
