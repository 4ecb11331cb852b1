"""Reading torch files without arbitrary pickle: the package's one ``torch.load``.

``torch.load(weights_only=True)`` accepts tensors, plain containers and numbers, and refuses any
other pickled object without running its code.  Checkpoints (:mod:`respmotion.training.checkpoint`)
and trained models (:func:`respmotion.models.autoencoder.load_autoencoder`) are read here.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure is a one-line error naming the file.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: unreadable (truncated, corrupt, not a torch file) or holding arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses arbitrary objects: report, never execute
        raise ValueError(f"{path}: checkpoint holds objects other than tensors and plain data; refused "
                         f"(weights_only loading)") from exc
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        # torch signals bad archives as RuntimeError; the weights-only unpickler fails on garbage with
        # IndexError/KeyError/TypeError: all mean an unreadable file, reported with its name
        raise ValueError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from exc
