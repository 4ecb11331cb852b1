"""Population-mean motion prior: the DVF models learn a patient-specific residual on top of it.

``u = u_bar[id] + r``: ``u_bar[id]`` is the mean over the *training* patients of the training
target ``id`` (``"ref_40"``: phase 40 relative to 00; ``"step_40"``: 40 -> 50), taken from the
same field source the DVF autoencoder trains on (registration fields in the demo, never ground
truth of held-out patients).  With ``data.motion_prior = "mean"`` (the default) the DVF VAE
encodes and decodes ``r = u - u_bar[id]``, the latent set holds latents of ``r``, and synthesis
adds ``u_bar`` back after decoding (:class:`respmotion.diffusion.pipeline.MotionGenerator`).

Why (measured, see ``respmotion.diffusion.pipeline``'s docstring for the numbers): the full
field's DVF-VAE reconstruction error (0.6-2.2 mm after short CPU training) was larger than the
population-mean field's own error on the phantom, so no diffusion model on those latents could
beat the mean field.  The residual is several times smaller than the field, so the same VAE
reconstructs it to a fraction of a millimetre, an under-trained diffusion model falls back to
the prior instead of to "no motion", and whatever patient-specific motion it learns is gained
on top of the mean.

Files (next to the DVF autoencoder's checkpoints, written once per run)::

    motion_prior.npy   (N, 3, Z, Y, X) float32, mm, components (z, y, x), pull
    motion_prior.json  {"format", "ids": [N field ids], "patients": [...], "field_source",
                        "shape": [Z, Y, X], "items_per_id", "sha256": of the .npy, "units"}

Checkpoints, latent sets and diffusion bundles record the prior's path and sha256
(:meth:`MotionPrior.record`); loading checks the hash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..io.atomic import file_sha256, read_json, read_npy, write_json, write_npy

FORMAT = "respmotion.motion_prior/1"
NPY, JSON = "motion_prior.npy", "motion_prior.json"
PRIOR_MODES = ("none", "mean")


class MotionPrior:
    """Per-target mean fields ``(N, 3, Z, Y, X)`` mm, addressed by field id (``"ref_40"``)."""

    def __init__(self, ids: Sequence[str], fields: np.ndarray, meta: dict[str, Any] | None = None,
                 path: Path | None = None) -> None:
        fields = np.asarray(fields, dtype=np.float32)
        if fields.ndim != 5 or fields.shape[1] != 3 or fields.shape[0] != len(ids):
            raise ValueError(f"motion prior must be (N={len(ids)}, 3, Z, Y, X), got {fields.shape}")
        if not np.all(np.isfinite(fields)):
            raise ValueError("motion prior contains NaN or inf values")
        self.ids = [str(i) for i in ids]
        self.index = {fid: i for i, fid in enumerate(self.ids)}
        self.fields = fields
        self.meta = dict(meta or {})
        self.path = path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.fields.shape[2:])  # type: ignore[return-value]

    def field(self, field_id: str) -> np.ndarray:
        """The mean field of ``field_id`` ``(3, Z, Y, X)`` mm."""
        if field_id not in self.index:
            raise ValueError(f"motion prior has no field {field_id!r} (has {', '.join(self.ids)}; it was computed "
                             f"from field source {self.meta.get('field_source')!r}: encode/generate those fields only)")
        return self.fields[self.index[field_id]]

    def stack(self, field_ids: Sequence[str], like: torch.Tensor | None = None) -> torch.Tensor:
        """``(len(ids), 3, Z, Y, X)`` mm as a tensor (on ``like``'s device/dtype when given)."""
        t = torch.from_numpy(np.stack([self.field(f) for f in field_ids]))
        return t if like is None else t.to(like.device, like.dtype)

    def check_shape(self, shape: Sequence[int], where: str = "") -> None:
        if tuple(int(s) for s in shape) != self.shape:
            raise ValueError(f"{where or 'field'}: shape {tuple(shape)} differs from the motion prior's {self.shape} "
                             f"({self.path or 'prior'}); the prior lives on the training grid")

    # ------------------------------------------------------------------ build / files
    @classmethod
    def from_fields(cls, items: Iterable[tuple[str, np.ndarray]], meta: dict[str, Any] | None = None) -> "MotionPrior":
        """Mean per field id of ``(field_id, (3, Z, Y, X) mm)`` items (float64 accumulation)."""
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for fid, arr in items:
            a = np.asarray(arr, dtype=np.float64)
            if sums and a.shape != next(iter(sums.values())).shape:
                raise ValueError(f"field {fid}: shape {a.shape} differs from the other fields' "
                                 f"{next(iter(sums.values())).shape}")
            sums[fid] = sums[fid] + a if fid in sums else a.copy()
            counts[fid] = counts.get(fid, 0) + 1
        if not sums:
            raise ValueError("the motion prior needs at least one training field")
        ids = sorted(sums)
        fields = np.stack([(sums[f] / counts[f]).astype(np.float32) for f in ids])
        return cls(ids, fields, {**(meta or {}), "items_per_id": {f: counts[f] for f in ids}})

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``motion_prior.npy`` + ``.json`` into ``folder``; returns the .npy path."""
        folder = Path(folder)
        npy = folder / NPY
        write_npy(npy, self.fields)
        meta = {**self.meta, "format": FORMAT, "ids": self.ids, "shape": list(self.shape),
                "units": "mm (z, y, x), pull; mean over training patients per field id",
                "sha256": file_sha256(npy)}
        write_json(folder / JSON, meta)
        self.meta, self.path = meta, npy.resolve()
        return npy

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None = None) -> "MotionPrior":
        """Read a prior (its .npy, .json or folder); ``sha256`` (of the .npy) is checked when given."""
        p = Path(path)
        npy = p / NPY if p.is_dir() else p.with_name(NPY) if p.name == JSON else p
        meta_path = npy.with_name(JSON)
        if not npy.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"{npy}: motion prior not found (needs {NPY} and {JSON})")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: unknown motion prior format {meta.get('format')!r}")
        digest = file_sha256(npy)
        for want, what in ((meta.get("sha256"), meta_path.name), (sha256, "the checkpoint's record")):
            if want and want != digest:
                raise ValueError(f"{npy}: sha256 {digest[:12]}... differs from {what} ({str(want)[:12]}...); "
                                 "the prior file was changed or replaced")
        return cls(meta["ids"], read_npy(npy), meta, npy.resolve())

    def record(self) -> dict[str, Any]:
        """What checkpoints, latent sets and bundles store to find and verify this prior."""
        if self.path is None:
            raise ValueError("motion prior is not saved yet (call save first)")
        return {"mode": "mean", "path": str(self.path), "sha256": self.meta["sha256"], "ids": self.ids,
                "shape": list(self.shape), "patients": self.meta.get("patients"),
                "field_source": self.meta.get("field_source")}


def prior_from_record(record: dict[str, Any] | None) -> MotionPrior | None:
    """The prior a checkpoint/latent set recorded (``None`` when it recorded none)."""
    if not record or record.get("mode", "none") == "none":
        return None
    return MotionPrior.load(record["path"], record.get("sha256"))
