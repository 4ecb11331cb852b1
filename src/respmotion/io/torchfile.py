"""Reading torch files without arbitrary pickle: the package's one ``torch.load``.

``torch.load(weights_only=True)`` accepts tensors, plain containers and numbers, and refuses any
other pickled object without running its code.  Checkpoints (:mod:`respmotion.io.checkpoint`)
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
        raise ValueError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from exc


def load_state(module: torch.nn.Module, state: Any, path: str | os.PathLike) -> None:
    """``module.load_state_dict(state)``; weights that do not fit the module are a one-line error naming ``path``.

    Raises:
        ValueError: ``state`` is not a state dict, or its names/shapes differ from the module's
            (e.g. a checkpoint whose ``model_config`` does not describe its weights).
    """
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'model' entry is a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # torch reports missing/unexpected keys and shape mismatches as RuntimeError
        raise ValueError(f"{path}: weights do not fit the model they claim ({_first_detail(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else f"{type(exc).__name__}, no message: empty or cut short"


def _first_detail(exc: BaseException) -> str:
    """torch's load_state_dict message is 'Error(s) in loading ...:' then one line per problem."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else _first_line(exc)
