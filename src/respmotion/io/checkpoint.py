"""Checkpoint files: the format, written atomically, read with ``torch.load(weights_only=True)``.

Both training (:mod:`respmotion.training`) and inference (:mod:`respmotion.diffusion.pipeline`,
:mod:`respmotion.synthesis.ldm`) read checkpoints through this module, so inference never imports
the training code.

A run folder ``<out>/<task>/<timestamp>/`` holds ``config.yaml`` (the resolved config),
``prev_config.yaml`` (warm start only: the config of the run the weights came from),
``split.json``, TensorBoard event files, training checkpoints ``<step:08d>.pt`` and, at the
end, ``model.pt`` (:data:`MODEL_FILE`: weights only, for inference).

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

Use: ``load_checkpoint(latest_checkpoint(run_dir_or_file))`` to resume a run (its newest training checkpoint),
``load_checkpoint(run_weights(run_dir_or_file))`` for its weights (``model.pt`` once the run has finished).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path, file_sha256
from .torchfile import load_weights_only

FORMAT = "respmotion.checkpoint/1"
#: a finished run's weights (no optimizer, scheduler or RNG state), beside its training checkpoints
MODEL_FILE = "model.pt"
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


def run_weights(path: str | os.PathLike, kind: str = "run folder") -> Path:
    """The weights file ``path`` names: ``path`` itself when it is a file; in a run folder its :data:`MODEL_FILE`
    (the finished run's weights), else its newest ``<step>.pt``.  ``FileNotFoundError`` naming ``path`` (as a
    ``kind``, e.g. ``"model bundle"``) when it holds neither, or does not exist."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        if not list_checkpoints(path):
            raise FileNotFoundError(f"{path}: not a {kind} (no {MODEL_FILE} and no <step>.pt checkpoint in it)")
    return latest_checkpoint(path)


def recorded_file(record: dict[str, Any], base: str | os.PathLike) -> Path:
    """The file a checkpoint records as ``{"path", "relpath", "sha256"}`` (an autoencoder, a motion prior).

    ``path`` (absolute, where it was when recorded) when it exists; else ``base / relpath`` (``base``:
    the folder of the file holding the record: the run tree was moved or copied), accepted only when
    its sha256 equals the recorded one.  Raises ``FileNotFoundError`` / ``ValueError`` naming the files.
    """
    path = Path(record["path"])
    if path.exists():
        return path
    rel, digest = record.get("relpath"), record.get("sha256")
    if not rel or not digest:
        raise FileNotFoundError(f"{path}: recorded file not found (no relative path and sha256 recorded to look "
                                f"for it beside {base})")
    near = Path(base) / rel
    if not near.is_file():
        raise FileNotFoundError(f"{path}: recorded file not found, nor beside {base} ({near})")
    if file_sha256(near) != digest:
        raise ValueError(f"{near}: sha256 differs from the record of {path} ({str(digest)[:12]}...); not the "
                         f"recorded file")
    return near
