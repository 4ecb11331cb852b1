"""Checkpoint files: written atomically, loadable with ``torch.load(weights_only=True)``.

A run folder ``<out>/<task>/<timestamp>/`` holds ``config.yaml`` (the resolved config),
``prev_config.yaml`` (warm start only: the config of the run the weights came from),
``split.json``, TensorBoard event files, training checkpoints ``<step:08d>.pt`` and, at the
end, ``model.pt`` (weights only, for inference).

Checkpoint dict (plain containers, tensors and numbers only)::

    format        "respmotion.checkpoint/1"
    task          e.g. "autoencoder_image"
    step          optimizer steps done
    model         model state_dict (unwrapped from DDP)
    model_config  dict of the architecture (rebuilds the model without the run config)
    extra         task dict (e.g. units, latent_scale, patient split)
    config        the resolved run config (dict)
    optimizer, scheduler, scaler     state_dicts      (training checkpoints only)
    rng           list (one per rank) of RNG states   (training checkpoints only)
    history       {"train": [[step, loss], ...], "val": [[step, loss], ...]}
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..io.atomic import atomic_path
from ..io.torchfile import load_weights_only

FORMAT = "respmotion.checkpoint/1"
_STEP_RE = re.compile(r"^(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never half-written."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save({"format": FORMAT, **state}, tmp)
        except RuntimeError as exc:  # torch reports a failed file write (disk full, I/O error) so
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise OSError(errno.EIO, f"writing the checkpoint failed ({lines[0] if lines else 'no detail'})",
                          str(path)) from exc
    return path


@contextlib.contextmanager
def own_run_dir(run_dir: str | os.PathLike, task: str, resuming: bool, is_main: bool = True) -> Iterator[None]:
    """Hold ``run_dir`` for one training (rank 0 only; the other ranks follow it) while the block runs.

    A new run (not ``resuming``) into a folder that holds a run's weights (``<step>.pt``,
    ``model.pt``) is refused (it would overwrite them, or mix two configs); a run that died before
    its first checkpoint may be started again.  A second training of the same folder at once is
    refused by the lock (:func:`respmotion.io.ownership.claim`).  Both errors name ``--resume``."""
    from ..io.ownership import OwnershipError, claim

    if not is_main:
        yield
        return
    run_dir = Path(run_dir)
    weights = [p.name for _, p in list_checkpoints(run_dir)] + (["model.pt"] if (run_dir / "model.pt").exists() else [])
    if not resuming and weights:
        raise OwnershipError(f"{run_dir}: holds a training run already ({', '.join(weights[-2:])}); pass --resume "
                             f"{run_dir} to continue it, or choose another --run-dir")
    # adopt a run folder without a manifest (older version, or a run that died before its first checkpoint)
    with claim(run_dir, "train", {"task": task}, resume_flag="--resume",
               adopt=resuming or (run_dir / "config.yaml").is_file()):
        yield


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict (weights only); one-line errors name the file."""
    path = Path(path)
    ckpt = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a respmotion checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return ckpt


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Training checkpoints ``(step, path)`` in a run folder, by step."""
    run_dir = Path(run_dir)
    out = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        m = _STEP_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else the newest ``<step>.pt`` in the run folder ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: run folder has no <step>.pt checkpoint to resume from")
    return found[-1][1]


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
