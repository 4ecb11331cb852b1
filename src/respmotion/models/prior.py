"""Motion prior: the DVF models learn a patient-specific residual on top of it.

``u = b[id](CT) + c[id] * r``: ``b[id]`` is what the training patients' fields of target ``id`` (``"ref_40"``:
phase 40 relative to 00; ``"step_40"``: 40 -> 50) predict for a CT, taken from the same field source the DVF
autoencoder trains on (never ground truth of held-out patients); ``c[id]`` the target's scale.  Modes
(``data.motion_prior`` of the DVF autoencoder, :data:`PRIOR_MODES`):

* ``mean``: ``b[id] = u_bar[id]``, the training patients' mean field; ``c = 1``.
* ``scaled``: the same mean, ``c[id]`` the RMS of ``u_bar[id]`` relative to the largest target's.
* ``regressed`` (default): ``b[id] = u_bar[id] + sum_j z_j W[id, j]``, a ridge regression of the field on the
  CT's standardised lung features ``z`` (:data:`respmotion.anatomy.features.LUNG_FEATURES`, clipped to
  +-:data:`FEATURE_LIMIT` sd) fitted on the training patients; ``c`` as ``scaled``.  The prior laid into each CT
  already breathes as deep as its anatomy says, and the diffusion model learns only the rest (the timing of the
  phases, which a CT does not show, and what the features miss).
* ``none``: the full field (research code).

The DVF VAE encodes and decodes ``r``; the latent set holds latents of ``r``; synthesis restores ``u`` after
decoding (:class:`respmotion.diffusion.pipeline.MotionGenerator`), so an untrained or uncertain model falls back
to the prior instead of to "no motion".  Why (measured, ``docs/diffusion.md``): the full field's DVF-VAE
reconstruction error after short CPU training was larger than the population-mean field's own error, and on the
demo's phantoms the regression alone errs 0.6-0.8x the mean field.

Files (next to the DVF autoencoder's checkpoints, written once per run)::

    motion_prior.npy   (N, 3, Z, Y, X) float32, mm, components (z, y, x), pull: u_bar per field id;
                       regressed: (N, 1 + F, 3, Z, Y, X), [:, 0] u_bar, [:, 1 + j] W_j (mm per sd of feature j)
    motion_prior.json  {"format", "ids": [N field ids], "patients": [...], "field_source",
                        "shape": [Z, Y, X], "items_per_id", "sha256": of the .npy, "units",
                        "residual_scale": {id: c} (scaled, regressed), "regression": {"features", "mean",
                        "std", "ridge"} (regressed)}

Checkpoints, latent sets and diffusion bundles record the prior's path and sha256
(:meth:`MotionPrior.record`); loading checks the hash.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..anatomy.features import FEATURE_LIMIT
from ..io.atomic import file_sha256, read_json, read_npy, write_json, write_npy
from ..io.checkpoint import recorded_file

log = logging.getLogger("respmotion")

FORMAT = "respmotion.motion_prior/1"
NPY, JSON = "motion_prior.npy", "motion_prior.json"
#: what the DVF VAE codes (module docstring): the full field, or its residual to the mean / scaled / regressed prior
PRIOR_MODES = ("none", "mean", "scaled", "regressed")
#: smallest residual scale: a target whose mean field is tiny is not blown up by more than 1 / this
MIN_SCALE = 0.1
#: ridge penalties (in patients) the regressed prior chooses from by leave-one-out error on its training items;
#: the last is large enough to give the mean field
RIDGE_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 1e6)
#: training patients needed per regression coefficient: with fewer, the in-sample residuals the DVF VAE learns are
#: much smaller than a new patient's, and the slopes are set to 0 (the prior is the scaled mean field)
PATIENTS_PER_COEFFICIENT = 5


class MotionPrior:
    """Per-target prior fields ``(N, 3, Z, Y, X)`` mm addressed by field id (``"ref_40"``), optionally regressed
    on the CT's lung features (``slopes`` ``(N, F, 3, Z, Y, X)`` mm per sd; module docstring)."""

    def __init__(self, ids: Sequence[str], fields: np.ndarray, meta: dict[str, Any] | None = None,
                 path: Path | None = None, slopes: np.ndarray | None = None) -> None:
        fields = np.asarray(fields, dtype=np.float32)
        if fields.ndim != 5 or fields.shape[1] != 3 or fields.shape[0] != len(ids):
            raise ValueError(f"motion prior must be (N={len(ids)}, 3, Z, Y, X), got {fields.shape}")
        if slopes is not None:
            slopes = np.asarray(slopes, dtype=np.float32)
            if slopes.ndim != 6 or slopes.shape[0] != len(ids) or slopes.shape[2:] != fields.shape[1:]:
                raise ValueError(f"motion prior slopes must be (N={len(ids)}, F, 3, Z, Y, X), got {slopes.shape}")
        if not all(np.all(np.isfinite(a)) for a in (fields, slopes) if a is not None):
            raise ValueError("motion prior contains NaN or inf values")
        self.ids = [str(i) for i in ids]
        self.index = {fid: i for i, fid in enumerate(self.ids)}
        self.fields = fields
        self.slopes = slopes
        self.meta = dict(meta or {})
        self.path = path
        if slopes is not None:
            reg = self.meta.get("regression") or {}
            self.feature_mean = np.asarray(reg.get("mean", []), np.float64)
            self.feature_std = np.asarray(reg.get("std", []), np.float64)
            if self.feature_mean.shape != (slopes.shape[1],) or self.feature_std.shape != (slopes.shape[1],) \
                    or np.any(self.feature_std <= 0):
                raise ValueError(f"regressed motion prior needs meta['regression'] mean and std of its "
                                 f"{slopes.shape[1]} features (std > 0), got {reg}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.fields.shape[2:])  # type: ignore[return-value]

    @property
    def needs_features(self) -> bool:
        """True for a regressed prior: every call needs the CT's lung features."""
        return self.slopes is not None

    @property
    def mode(self) -> str:
        return "regressed" if self.slopes is not None else "scaled" if self.meta.get("residual_scale") else "mean"

    def standardised(self, features: Sequence[float]) -> np.ndarray:
        """Raw lung features ``(F,)`` (:func:`respmotion.anatomy.features.lung_features`, ml and mm) ->
        ``(f - mean) / std`` of the training patients, clipped to +-:data:`FEATURE_LIMIT`."""
        f = np.asarray(features, np.float64).reshape(-1)
        if f.shape != self.feature_mean.shape or not np.all(np.isfinite(f)):
            raise ValueError(f"the regressed motion prior needs {self.feature_mean.shape[0]} finite lung features "
                             f"({', '.join((self.meta.get('regression') or {}).get('features', []))}), got {f}")
        return np.clip((f - self.feature_mean) / self.feature_std, -FEATURE_LIMIT, FEATURE_LIMIT)

    def field(self, field_id: str, features: Sequence[float] | None = None) -> np.ndarray:
        """The prior field of ``field_id`` ``(3, Z, Y, X)`` mm; a regressed prior needs the CT's raw ``features``."""
        if field_id not in self.index:
            raise ValueError(f"motion prior has no field {field_id!r} (has {', '.join(self.ids)}; it was computed "
                             f"from field source {self.meta.get('field_source')!r}: encode/generate those fields only)")
        i = self.index[field_id]
        if self.slopes is None:
            return self.fields[i]
        if features is None:
            raise ValueError("the regressed motion prior needs the CT's lung features (respmotion.anatomy.features)")
        z = self.standardised(features).astype(np.float32)
        return self.fields[i] + np.tensordot(z, self.slopes[i], axes=1)

    def stack(self, field_ids: Sequence[str], like: torch.Tensor | None = None,
              features: Sequence[float] | None = None) -> torch.Tensor:
        """``(len(ids), 3, Z, Y, X)`` mm as a tensor (on ``like``'s device/dtype when given)."""
        t = torch.from_numpy(np.stack([self.field(f, features) for f in field_ids]))
        return t if like is None else t.to(like.device, like.dtype)

    @property
    def scales(self) -> dict[str, float]:
        """Residual scale ``c[id]`` per field id (1 for every id of a ``mean`` prior)."""
        recorded = self.meta.get("residual_scale") or {}
        return {fid: float(recorded.get(fid, 1.0)) for fid in self.ids}

    def residual(self, field_id: str, field: np.ndarray, features: Sequence[float] | None = None) -> np.ndarray:
        """What the DVF VAE codes: ``(u - b[id]) / c[id]``, ``field`` ``(3, Z, Y, X)`` mm.

        Why the scale (modes "scaled", "regressed"): the phases next to the reference move a few tenths of the
        end-exhale motion, and so do their residuals; an L1 loss in mm then fits them least, and a VAE error that
        is small at end-exhale is as large as the population mean's own error at 10 %.  Dividing by ``c[id]``
        (the RMS of ``u_bar[id]`` over that of the largest target, at least :data:`MIN_SCALE`) gives every
        phase's residual the same scale; :meth:`restore` multiplies it back."""
        return (np.asarray(field, np.float32) - self.field(field_id, features)) / np.float32(self.scales[field_id])

    def restore(self, field_ids: Sequence[str], coded: torch.Tensor,
                features: Sequence[float] | None = None) -> torch.Tensor:
        """Inverse of :meth:`residual` for decoded residuals ``(..., N, 3, Z, Y, X)`` (one id per entry of the
        N axis): ``b[id] + c[id] * r`` in mm, on ``coded``'s device and dtype."""
        scale = torch.tensor([self.scales[f] for f in field_ids], device=coded.device, dtype=coded.dtype)
        return coded * scale.view(-1, 1, 1, 1, 1) + self.stack(field_ids, like=coded, features=features)

    def check_shape(self, shape: Sequence[int], where: str = "") -> None:
        if tuple(int(s) for s in shape) != self.shape:
            raise ValueError(f"{where or 'field'}: shape {tuple(shape)} differs from the motion prior's {self.shape} "
                             f"({self.path or 'prior'}); the prior lives on the training grid")

    # ------------------------------------------------------------------ build / files
    @classmethod
    def from_fields(cls, items: Callable[[], Iterable[tuple[str, np.ndarray, Any]]] | Iterable,
                    meta: dict[str, Any] | None = None, mode: str = "mean",
                    features: dict[Any, Sequence[float]] | None = None,
                    feature_names: Sequence[str] = ()) -> "MotionPrior":
        """The prior of ``(field_id, (3, Z, Y, X) mm, patient key)`` items (float64 accumulation) in ``mode``
        (:data:`PRIOR_MODES` except "none"); "regressed" needs ``features`` ``{patient key: raw lung features}``
        of every item's patient (``feature_names`` recorded with them) and reads the items twice (``items`` a
        function returning a fresh iterable, or anything iterable twice).

        The regression's ridge penalty is chosen among :data:`RIDGE_GRID` by its leave-one-out error over the
        training items (closed form, from a second read of the items): with few patients the slopes shrink to the
        mean field, with many they follow the data."""
        if mode not in PRIOR_MODES[1:]:
            raise ValueError(f"motion prior mode must be one of {PRIOR_MODES[1:]}, got {mode!r}")
        fresh = items if callable(items) else (lambda: items)
        regress = mode == "regressed"
        design = (lambda key: np.ones(1))
        if regress:
            table = np.array([np.asarray(v, np.float64) for v in (features or {}).values()])
            if table.ndim != 2 or not len(table) or not np.all(np.isfinite(table)):
                raise ValueError("the regressed motion prior needs finite lung features of its training patients")
            f_mean, f_std = table.mean(0), table.std(0)
            f_std[f_std <= 1e-9 * np.maximum(1.0, np.abs(f_mean))] = 1.0  # a constant feature: its slope stays 0

            def design(key: Any) -> np.ndarray:  # x = (1, z), z clipped standardised features
                if key not in features:
                    raise ValueError(f"{key}: no lung features for this patient")
                z = (np.asarray(features[key], np.float64) - f_mean) / f_std
                return np.concatenate([[1.0], np.clip(z, -FEATURE_LIMIT, FEATURE_LIMIT)])

        sums: dict[str, np.ndarray] = {}  # (1 + F, 3, Z, Y, X): sums of x * u
        grams: dict[str, np.ndarray] = {}  # (1 + F, 1 + F): sums of x x^T
        for fid, arr, key in fresh():
            a = np.asarray(arr, dtype=np.float64)
            if sums and a.shape != next(iter(sums.values())).shape[1:]:
                raise ValueError(f"field {fid}: shape {a.shape} differs from the other fields' "
                                 f"{next(iter(sums.values())).shape[1:]}")
            x = design(key)
            sums[fid] = sums[fid] + np.tensordot(x, a, axes=0) if fid in sums else np.tensordot(x, a, axes=0)
            grams[fid] = grams[fid] + np.outer(x, x) if fid in grams else np.outer(x, x)
        if not sums:
            raise ValueError("the motion prior needs at least one training field")
        ids = sorted(sums)
        meta = {**(meta or {}), "items_per_id": {f: int(round(grams[f][0, 0])) for f in ids}}
        ridge = 0.0
        if regress:
            loo = _leave_one_out(fresh, design, sums, grams)
            enough = len(table) >= PATIENTS_PER_COEFFICIENT * (1 + table.shape[1])
            ridge = min(loo, key=loo.get) if enough else RIDGE_GRID[-1]
            if not enough:
                log.warning("motion prior: %d training patients are too few to regress on %d lung features "
                            "(needs %d); the slopes are 0 (the scaled mean field)", len(table), table.shape[1],
                            PATIENTS_PER_COEFFICIENT * (1 + table.shape[1]))
            meta["regression"] = {"features": list(feature_names), "mean": f_mean.tolist(), "std": f_std.tolist(),
                                  "limit_sd": FEATURE_LIMIT, "ridge": ridge,
                                  "leave_one_out_rms_mm": {str(k): v for k, v in loo.items()}}
        coef = [_ridge_solve(grams[f], sums[f], ridge) for f in ids]
        if regress and ridge == RIDGE_GRID[-1]:
            coef = [np.concatenate([c[:1], np.zeros_like(c[1:])]) for c in coef]
        fields = np.stack([c[0] for c in coef]).astype(np.float32)
        slopes = np.stack([c[1:] for c in coef]).astype(np.float32) if regress else None
        if mode != "mean":
            rms = np.sqrt((fields.astype(np.float64) ** 2).mean(axis=(1, 2, 3, 4)))
            top = float(rms.max()) or 1.0
            meta["residual_scale"] = {f: max(MIN_SCALE, float(r) / top) for f, r in zip(ids, rms)}
        return cls(ids, fields, meta, slopes=slopes)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``motion_prior.npy`` + ``.json`` into ``folder``; returns the .npy path."""
        folder = Path(folder)
        npy = folder / NPY
        write_npy(npy, self.fields if self.slopes is None
                  else np.concatenate([self.fields[:, None], self.slopes], axis=1))
        meta = {**self.meta, "format": FORMAT, "ids": self.ids, "shape": list(self.shape),
                "units": "mm (z, y, x), pull; per field id: the training patients' mean field"
                         + ("; then its slopes, mm per sd of each lung feature" if self.slopes is not None else ""),
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
        arr = read_npy(npy)
        if "regression" in meta:
            if arr.ndim != 6:
                raise ValueError(f"{npy}: a regressed prior must hold (N, 1 + F, 3, Z, Y, X), got {arr.shape}")
            return cls(meta["ids"], arr[:, 0], meta, npy.resolve(), slopes=arr[:, 1:])
        return cls(meta["ids"], arr, meta, npy.resolve())

    def record(self) -> dict[str, Any]:
        """What checkpoints, latent sets and bundles store to find and verify this prior."""
        if self.path is None:
            raise ValueError("motion prior is not saved yet (call save first)")
        # relpath: from the folder it was saved in (the run folder whose checkpoints record it), for a moved run tree
        return {"mode": self.mode, "path": str(self.path),
                "relpath": self.path.name, "sha256": self.meta["sha256"],
                "ids": self.ids, "shape": list(self.shape), "patients": self.meta.get("patients"),
                "field_source": self.meta.get("field_source")}


def _ridge_matrix(gram: np.ndarray, ridge: float) -> np.ndarray:
    """``X^T X + ridge * diag(0, 1, ..., 1)``: the intercept is never penalised."""
    return gram + ridge * np.diag([0.0] + [1.0] * (len(gram) - 1))


def _ridge_solve(gram: np.ndarray, sums: np.ndarray, ridge: float) -> np.ndarray:
    """Coefficients ``(1 + F, 3, Z, Y, X)`` of the ridge regression with sufficient statistics ``gram``, ``sums``."""
    return np.linalg.solve(_ridge_matrix(gram, ridge), sums.reshape(len(gram), -1)).reshape(sums.shape)


def _leave_one_out(fresh, design, sums: dict[str, np.ndarray], grams: dict[str, np.ndarray]) -> dict[float, float]:
    """RMS leave-one-out error (mm, over items and voxels) of the regression for every ridge in :data:`RIDGE_GRID`.

    Closed form for a linear smoother: item i's leave-one-out residual is its residual over ``1 - h_i``, with
    ``h_i = x_i^T A^-1 x_i``, and its squared residual is ``|y|^2 - 2 w^T S y + w^T S S^T w`` with ``w = A^-1 x_i``
    and ``S`` the id's sums: one pass over the items, no per-ridge fields kept."""
    flat = {f: s.reshape(len(s), -1) for f, s in sums.items()}
    outer = {f: s @ s.T for f, s in flat.items()}
    total = dict.fromkeys(RIDGE_GRID, 0.0)
    count = 0
    for fid, arr, key in fresh():
        y = np.asarray(arr, np.float64).reshape(-1)
        x, q, yy = design(key), flat[fid] @ y, float(y @ y)
        for ridge in RIDGE_GRID:
            w = np.linalg.solve(_ridge_matrix(grams[fid], ridge), x)
            r2 = max(0.0, yy - 2.0 * float(w @ q) + float(w @ outer[fid] @ w))
            total[ridge] += r2 / max(1e-6, 1.0 - float(x @ w)) ** 2
        count += y.size // 3
    return {ridge: float(np.sqrt(v / max(count, 1))) for ridge, v in total.items()}


def prior_from_record(record: dict[str, Any] | None, base: str | os.PathLike | None = None) -> MotionPrior | None:
    """The prior a checkpoint/latent set recorded (``None`` when it recorded none).

    ``base``: the run folder of the checkpoint holding the record; when the recorded path is gone (the run
    tree was moved), the prior is taken from ``base / relpath`` if its sha256 matches
    (:func:`respmotion.io.checkpoint.recorded_file`)."""
    if not record or record.get("mode", "none") == "none":
        return None
    path = record["path"] if base is None else recorded_file(record, base)
    return MotionPrior.load(path, record.get("sha256"))
