"""The one run setup of every training task: device and DDP, run folder, resume, split, config files.

Use (every ``torchrun`` rank calls it; see :func:`respmotion.diffusion.train.train_diffusion`)::

    def body(run: Run) -> FitResult:
        split = run.split(fresh_split)                 # a resumed run keeps its split.json
        ...                                            # datasets of split.train / split.val
        run.start(cfg, split, "12 train / 2 val items")  # config.yaml + split.json (rank 0), barrier
        return run.fit(task, train_set, val_set, cfg.train, cfg, init)

    return run_training("diffusion", cfg.out, cfg.run_dir, cfg.train.device, resume, body)

:func:`run_training` sets up the process group and device, finds the checkpoint to resume
(``resume`` = a run folder or a checkpoint; its folder is the run folder) or a new folder
``<out>/<task>/<timestamp>/`` (chosen on rank 0, broadcast), owns the folder while ``body`` runs
(:func:`respmotion.training.checkpoint.own_run_dir`) and always tears the process group down.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from ..config import save_config, to_dict
from ..io.atomic import read_json, write_json
from ..io.checkpoint import latest_checkpoint
from . import distributed as D
from .checkpoint import own_run_dir
from .engine import FitResult, TrainConfig, Trainer
from .splits import Split
from .task import Task

log = logging.getLogger("respmotion")

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Run:
    """A training run in its owned folder: ``run_dir`` (same on every rank), this process's ``info``,
    the checkpoint being resumed (None for a new run)."""

    run_dir: Path
    info: D.DistInfo
    resume: Path | None

    def split(self, fresh: Split) -> Split:
        """The patient split of the run: a resumed run's stored ``split.json``, else ``fresh``."""
        stored = self.run_dir / SPLIT_FILE
        if self.resume is not None and stored.exists():
            return Split.from_dict(read_json(stored))
        return fresh

    def start(self, config: Any, split: Split, items: str) -> None:
        """Rank 0 writes ``config.yaml`` (the resolved ``config``) and ``split.json`` and logs the run
        (``items``: what the datasets hold, e.g. "12 train / 2 val items"); then every rank waits for it."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
            write_json(self.run_dir / SPLIT_FILE, split.to_dict())
            log.info("run folder %s: %s, patients %d | %d | %d", self.run_dir, items, len(split.train),
                     len(split.val), len(split.test))
        D.barrier(self.info)

    def fit(self, task: Task, train_set: Dataset, val_set: Dataset | None, train: TrainConfig, config: Any,
            init: str | os.PathLike | None) -> FitResult:
        """Train ``task`` with the engine in this run (``config``: the whole run config, stored in checkpoints)."""
        trainer = Trainer(task, train_set, val_set, train, self.run_dir, to_dict(config), self.info)
        return trainer.fit(resume=self.resume, init=init)


def new_run_dir(out: str | os.PathLike, task: str, run_dir: str | os.PathLike = "") -> Path:
    """``run_dir`` when given, else a new ``<out>/<task>/<YYYY-mm-dd_HH-MM-SS>[_N]`` folder name."""
    if run_dir:
        return Path(run_dir)
    base = Path(out) / task / time.strftime("%Y-%m-%d_%H-%M-%S")
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}_{i}"), i + 1
    return path


def run_training(task: str, out: str | os.PathLike, run_dir: str | os.PathLike, device: str,
                 resume: str | os.PathLike | None, body: Callable[[Run], FitResult],
                 check_resume: Callable[[Path], None] | None = None) -> FitResult:
    """Set up the run of ``task`` (module docstring) and return ``body(run)``.

    ``check_resume(checkpoint)``: raises when the checkpoint to resume cannot be resumed by this
    run (called before anything is logged or written)."""
    info = D.setup(device)
    try:
        ckpt = None
        if resume is not None:
            ckpt = latest_checkpoint(resume)
            if check_resume is not None:
                check_resume(ckpt)
            folder = ckpt.parent
        else:
            folder = D.broadcast_object(new_run_dir(out, task, run_dir) if info.is_main else None, info)
        with own_run_dir(folder, task, ckpt is not None, info.is_main):
            return body(Run(folder, info, ckpt))
    finally:
        D.cleanup()
