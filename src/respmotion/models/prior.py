"""Population-mean motion prior: the DVF models learn a patient-specific residual on top of it.

``u = u_bar[id] + r``: ``u_bar[id]`` is the mean over the *training* patients of the training
target ``id`` (``"ref_40"``: phase 40 relative to 00; ``"step_40"``: 40 -> 50), taken from the
same field source the DVF autoencoder trains on (registration fields in the demo, never ground
truth of held-out patients).  With ``data.motion_prior = "mean"`` (the default) the DVF VAE
encodes and decodes ``r = u - u_bar[id]``, the latent set holds latents of ``r``, and synthesis
adds ``u_bar`` back after decoding (:class:`respmotion.diffusion.pipeline.MotionGenerator`).

Why (measured, see ``docs/diffusion.md`` for the numbers): the full
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

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..io.atomic import file_sha256, read_json, read_npy, write_json, write_npy
from ..io.checkpoint import recorded_file

FORMAT = "respmotion.motion_prior/1"
NPY, JSON = "motion_prior.npy", "motion_prior.json"
#: "none": the DVF VAE codes the full field; "mean": the residual ``u - u_bar[id]``; "scaled": that residual
#: divided by the target's scale ``c[id]`` (:meth:`MotionPrior.residual`)
PRIOR_MODES = ("none", "mean", "scaled")
#: smallest residual scale: a target whose mean field is tiny is not blown up by more than 1 / this
MIN_SCALE = 0.1


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

    @property
    def scales(self) -> dict[str, float]:
        """Residual scale ``c[id]`` per field id (1 for every id unless the prior was built ``scaled``)."""
        recorded = self.meta.get("residual_scale") or {}
        return {fid: float(recorded.get(fid, 1.0)) for fid in self.ids}

    def residual(self, field_id: str, field: np.ndarray) -> np.ndarray:
        """What the DVF VAE codes: ``(u - u_bar[id]) / c[id]``, ``field`` ``(3, Z, Y, X)`` mm.

        Why the scale (mode "scaled"): the phases next to the reference move a few tenths of the end-exhale
        motion, and so do their residuals; an L1 loss in mm then fits them least, and a VAE error that is small
        at end-exhale is as large as the population mean's own error at 10 %.  Dividing by ``c[id]`` (the RMS
        of ``u_bar[id]`` over that of the largest target, at least :data:`MIN_SCALE`) gives every phase's
        residual the same scale; :meth:`restore` multiplies it back."""
        return (np.asarray(field, np.float32) - self.field(field_id)) / np.float32(self.scales[field_id])

    def restore(self, field_ids: Sequence[str], coded: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`residual` for decoded residuals ``(..., N, 3, Z, Y, X)`` (one id per entry of the
        N axis): ``u_bar[id] + c[id] * r`` in mm, on ``coded``'s device and dtype."""
        scale = torch.tensor([self.scales[f] for f in field_ids], device=coded.device, dtype=coded.dtype)
        return coded * scale.view(-1, 1, 1, 1, 1) + self.stack(field_ids, like=coded)

    def check_shape(self, shape: Sequence[int], where: str = "") -> None:
        if tuple(int(s) for s in shape) != self.shape:
            raise ValueError(f"{where or 'field'}: shape {tuple(shape)} differs from the motion prior's {self.shape} "
                             f"({self.path or 'prior'}); the prior lives on the training grid")

    # ------------------------------------------------------------------ build / files
    @classmethod
    def from_fields(cls, items: Iterable[tuple[str, np.ndarray]], meta: dict[str, Any] | None = None,
                    scaled: bool = False) -> "MotionPrior":
        """Mean per field id of ``(field_id, (3, Z, Y, X) mm)`` items (float64 accumulation); ``scaled``: also
        the residual scale per id (:meth:`residual`), recorded as ``meta["residual_scale"]``."""
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
        meta = {**(meta or {}), "items_per_id": {f: counts[f] for f in ids}}
        if scaled:
            rms = np.sqrt((fields.astype(np.float64) ** 2).mean(axis=(1, 2, 3, 4)))
            top = float(rms.max()) or 1.0
            meta["residual_scale"] = {f: max(MIN_SCALE, float(r) / top) for f, r in zip(ids, rms)}
        return cls(ids, fields, meta)

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
        # relpath: from the folder it was saved in (the run folder whose checkpoints record it), for a moved run tree
        return {"mode": "scaled" if self.meta.get("residual_scale") else "mean", "path": str(self.path),
                "relpath": self.path.name, "sha256": self.meta["sha256"],
                "ids": self.ids, "shape": list(self.shape), "patients": self.meta.get("patients"),
                "field_source": self.meta.get("field_source")}


def prior_from_record(record: dict[str, Any] | None, base: str | os.PathLike | None = None) -> MotionPrior | None:
    """The prior a checkpoint/latent set recorded (``None`` when it recorded none).

    ``base``: the run folder of the checkpoint holding the record; when the recorded path is gone (the run
    tree was moved), the prior is taken from ``base / relpath`` if its sha256 matches
    (:func:`respmotion.io.checkpoint.recorded_file`)."""
    if not record or record.get("mode", "none") == "none":
        return None
    path = record["path"] if base is None else recorded_file(record, base)
    return MotionPrior.load(path, record.get("sha256"))


# ---------------------------------------------------------------------------- anatomical prior
class AnatomicalPrior:
    """Population breathing motion (the measured DIR-Lab reference) expressed in a given CT's own anatomy.

    For a CT ``(z, y, x)`` HU: lung/body/bone masks and the motion weight map
    (:func:`respmotion.anatomy.lung_frame.motion_regions`: lungs 1, below the diaphragm decaying, mediastinum
    small, vertebrae/ribs/chest wall 0, so the lungs slide along the chest wall), normalised lung coordinates
    from the CT's own lung extent, and the reference's end-exhale displacement per mm of amplitude there
    (:func:`respmotion.data.motion_reference.spatial_unit`).  Phase ``k``'s point motion (push, mm) is
    ``D_k = A * weight * (s_k * superior, h_k * posterior, h_k * lateral)`` with the reference's phase curve
    (``s``: superior-inferior, ``h``: AP/LR with hysteresis; :func:`~respmotion.data.motion_reference.phase_state`),
    and the returned pull field solves ``u(q) = -D_k(q + u(q))`` (fixed point, :data:`INVERSE_ITERATIONS`).

    ``amplitude_mm``: the mean superior displacement of the lung at 50 % (the one number a user knows,
    e.g. from a 4D-CT's landmarks); ``None`` = the DIR-Lab median.  ``peak``: end-exhale phase as a
    fraction (``None`` = the reference's).  Deterministic: the same CT gives the same fields.
    """

    INVERSE_ITERATIONS = 6

    def __init__(self, amplitude_mm: float | None = None, peak: float | None = None,
                 reference: dict[str, Any] | None = None) -> None:
        from ..data.motion_reference import load_reference

        self.reference = reference or load_reference()
        pc = self.reference["phase_curve"]
        self.n, self.eta = float(pc["n"]), float(pc["eta"])
        self.peak = float(pc["peak"] if peak is None else peak)
        if not 0.05 <= self.peak <= 0.95:
            raise ValueError(f"end-exhale phase must be a fraction in [0.05, 0.95], got {self.peak}")
        a = self.reference["spatial_model"]["amplitude_median_mm"] if amplitude_mm is None else float(amplitude_mm)
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"breathing amplitude must be a finite number of mm >= 0, got {amplitude_mm}")
        self.amplitude_mm = a

    def states(self, percent: float) -> tuple[float, float]:
        """(SI state, AP/LR state) of a phase, scaled so that the SI state is 1 at 50 %."""
        from ..data.motion_reference import phase_state

        s50 = float(phase_state(50.0, self.n, self.peak)[0])
        s, h = phase_state(float(percent), self.n, self.peak, self.eta)
        return float(s) / s50, float(h) / s50

    def unit_push(self, hu: np.ndarray, geometry, regions: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """End-exhale point motion per mm of amplitude times the weight map, before the phase states:
        ``(3, z, y, x)`` with LPS world components ``(x, y, z)`` (x = lateral on the patient's left, medial on
        the right; y = posterior; z = superior)."""
        from ..anatomy.lung_frame import lateral_sign, lung_box, motion_regions, normalised, voxel_points
        from ..data.motion_reference import spatial_unit

        reg = regions if regions is not None else motion_regions(hu, geometry)
        box = lung_box(voxel_points(geometry, reg["lung"]))
        out = np.zeros((3, *hu.shape), np.float32)
        moving = np.argwhere(reg["weight"] > 0)
        model = self.reference["spatial_model"]
        for i in range(0, len(moving), 1 << 18):
            idx = moving[i:i + (1 << 18)]
            pts = geometry.index_to_world(idx.astype(np.float64))
            f = spatial_unit(model, normalised(pts, box))  # superior, posterior, lateral
            xyz = np.stack([f[:, 2] * lateral_sign(pts, box), f[:, 1], f[:, 0]], 1)
            out[:, idx[:, 0], idx[:, 1], idx[:, 2]] = (xyz * reg["weight"][tuple(idx.T)][:, None]).T
        return out

    def fields(self, hu: np.ndarray, geometry, phases: Sequence[int] = tuple(range(0, 100, 10)),
               regions: dict[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Pull fields ``{phase: (3, z, y, x) mm}`` (array-axis components) of a CT ``(z, y, x)`` HU."""
        from ..core import warp as W

        unit = self.unit_push(hu, geometry, regions)  # LPS x, y, z (weighted)
        out = {}
        for k in phases:
            s, h = self.states(k)
            if s == 0 and h == 0:
                out[int(k)] = np.zeros_like(unit)
                continue
            push_xyz = self.amplitude_mm * np.stack([h * unit[0], h * unit[1], s * unit[2]])
            push = torch.from_numpy(geometry.world_to_axes(push_xyz, axis=0).astype(np.float32))[None]
            u = W.invert(push, geometry.spacing, iterations=self.INVERSE_ITERATIONS, tol_mm=0.0)  # all iterations
            out[int(k)] = u[0].numpy()
        return out


class PriorMotion:
    """The anatomical prior as a synthesis motion model (``shape``, ``generate``): no network, no training.
    The default motion model when no ``--model`` is given (docs/motion.md).

    Every sample is the same population cycle (the prior has no randomness); ``meta`` records what it is
    (copied into every field's ``meta``)."""

    SHAPE = (48, 128, 128)
    resamples_input = False

    def __init__(self, amplitude_mm: float | None = None, shape: Sequence[int] = SHAPE) -> None:
        from ..data.motion_reference import reference_sha256

        self.prior = AnatomicalPrior(amplitude_mm)
        self.shape = tuple(int(s) for s in shape)
        self.meta = {"model": "anatomical population prior (no network)",
                     "calibrated_on": "DIR-Lab 4D-CT landmarks, cases 1-9 (population motion model; make "
                                      "motion-reference); not trained on images, not validated clinically",
                     "reference_sha256": reference_sha256(),
                     "amplitude_mm": self.prior.amplitude_mm, "peak_phase": self.prior.peak}

    def describe(self) -> dict:
        """What summary.json records about the motion (the model's label and provenance)."""
        return {"kind": "anatomical prior", "model_shape": list(self.shape), **self.meta}

    def generate(self, ct, samples: int, seed: int) -> list[dict]:
        from ..core.types import DisplacementField

        fields = self.prior.fields(np.asarray(ct.array, np.float32), ct.geometry)
        cycle = {k: DisplacementField(f, ct.geometry, {**self.meta, "phase": k}) for k, f in fields.items()}
        return [cycle for _ in range(samples)]
