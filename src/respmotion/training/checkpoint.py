"""Training-side checkpoint handling: run-folder ownership, pruning old checkpoints, RNG states.

The file format and its readers/writers live in :mod:`respmotion.io.checkpoint` (inference reads
checkpoints without importing training code).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..io.checkpoint import MODEL_FILE, list_checkpoints


@contextlib.contextmanager
def own_run_dir(run_dir: str | os.PathLike, task: str, resuming: bool, is_main: bool = True) -> Iterator[None]:
    """Hold ``run_dir`` for one training (rank 0 only; the other ranks follow it) while the block runs.

    A new run (not ``resuming``) into a folder that holds a run's weights (``<step>.pt``, ``model.pt``) is
    refused (it would overwrite them, or mix two configs); a run that died before its first checkpoint may be
    started again.  A second training of the same folder at once is refused by the lock
    (:func:`respmotion.io.ownership.claim`).  Both errors name ``--resume``.  Once the folder is held, temporary
    files of a killed writer (a checkpoint cut short) are removed."""
    from ..io.atomic import clean_stale_tmp
    from ..io.ownership import OwnershipError, claim

    if not is_main:
        yield
        return
    run_dir = Path(run_dir)
    weights = [p.name for _, p in list_checkpoints(run_dir)] + ([MODEL_FILE] if (run_dir / MODEL_FILE).exists() else [])
    if not resuming and weights:
        raise OwnershipError(f"{run_dir}: holds a training run already ({', '.join(weights[-2:])}); pass --resume "
                             f"{run_dir} to continue it, or choose another --run-dir")
    # adopt a run folder without a manifest (older version, or a run that died before its first checkpoint)
    with claim(run_dir, "train", {"task": task}, resume_flag="--resume",
               adopt=resuming or (run_dir / "config.yaml").is_file()):
        clean_stale_tmp(run_dir)
        yield


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` training checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        p.unlink()


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors/numbers (torch, CUDA, numpy, python)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
