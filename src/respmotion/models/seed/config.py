"""The research code's model arguments, read from the ``args.json`` beside each checkpoint.

``args.json`` is ``{"model_args": {...}, "train_args": {...}}``.  ``model_args`` must hold only
the research code's fields (it builds its dataclasses with ``**model_args``, so any other key
fails there too); ``train_args`` is kept as a plain dict (the UNet's ``T`` is read from it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AutoencoderArgs:
    """Image autoencoder and DVF (variational) autoencoder.

    ``kernel_size``, ``stride`` and ``padding`` exist in the research arguments but its networks
    do not use them (kernels are fixed by ``keep_z``).  ``channel_multipliers`` has one entry per
    level; ``keep_z[i]`` keeps Z at level ``i``.
    """

    variational: bool = False
    in_channels: int = 1
    base_channels: int = 16
    latent_channels: int = 1
    out_channels: int = 1
    layer_type: str = "simple"
    keep_z: list[bool] = field(default_factory=lambda: [False, True, True])
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    norm: str = "identity"
    dvf_scale_factor: float = 1.0


@dataclass
class UNetArgs:
    """Latent diffusion UNet: ``in_channels`` = image latent + DVF latent channels, it predicts
    the noise of the last ``out_channels``; ``image_width`` x ``image_width`` in-plane and
    ``image_depth`` slices is the latent size the level pads are computed for."""

    image_width: int
    image_depth: int
    in_channels: int = 1
    n_layers: int = 3
    base_channels: int = 16
    out_channels: int = 1
    layer_type: str = "simple"
    keep_z: list[bool] = field(default_factory=lambda: [False, True, True, True])
    noise_schedule: str = "cosine"
    norm: str = "identity"
    dvf_scale_factor: float = 1.0


def _build(cls, values: dict[str, Any], path: Path):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: model_args has unknown key {unknown[0]!r} (research {cls.__name__} fields: "
                         f"{', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"{path}: model_args incomplete ({exc})") from exc


def read_args(path: str | Path, kind: str) -> tuple[AutoencoderArgs | UNetArgs, dict[str, Any]]:
    """``(model_args, train_args)`` of an ``args.json``; ``kind`` is ``"autoencoder"`` or ``"unet"``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: args.json not found (it must sit beside the checkpoint)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("model_args"), dict):
        raise ValueError(f"{p}: expected an object with a 'model_args' object")
    cls = {"autoencoder": AutoencoderArgs, "unet": UNetArgs}[kind]
    return _build(cls, doc["model_args"], p), dict(doc.get("train_args") or {})


def args_document(model_args: AutoencoderArgs | UNetArgs, train_args: dict[str, Any]) -> dict[str, Any]:
    """The ``args.json`` content for ``model_args`` (inverse of :func:`read_args`)."""
    return {"model_args": dataclasses.asdict(model_args), "train_args": dict(train_args)}
