"""Datasets of CT volumes and displacement fields over the cohort layout (:mod:`respmotion.io.layout`).

Items are dicts ``{"x": tensor, "key": str}`` in **physical units**: CT ``(1, Z, Y, X)`` in HU,
fields ``(3, Z, Y, X)`` in mm (components ``z, y, x``, pull convention).  Models convert to
network units themselves (:meth:`respmotion.models.autoencoder.Autoencoder.normalize`).

Where displacement fields come from is a :class:`FieldSource`: :class:`GroundTruthFields` reads
the phantom's exact fields (``gt/dvf_step_XX`` or ``gt/dvf_ref_XX``); :class:`RegistrationFields` reads
``respmotion register`` output; any object with the same two methods plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.types import DisplacementField
from ..anatomy.features import lung_features
from ..io.layout import PHASES, REFERENCE_PHASE, StudyDir, phase_name


class FieldSource(Protocol):
    """Where a study's displacement fields come from."""

    name: str

    def field_ids(self, study: StudyDir) -> list[str]:
        """Ids of the fields this source has for ``study`` (e.g. ``"step_40"``), sorted."""
        ...

    def load(self, study: StudyDir, field_id: str) -> DisplacementField:
        """The dense field ``(3, z, y, x)`` mm (pull) of ``field_id``."""
        ...


@dataclass(frozen=True)
class GroundTruthFields:
    """The phantom's exact fields: ``kind="step"`` (phase XX -> XX+10) or ``"ref"`` (phase XX vs 00).

    ``ref_00`` (the identity) is left out.
    """

    kind: str = "step"

    def __post_init__(self) -> None:
        if self.kind not in ("step", "ref"):
            raise ValueError(f"ground-truth field kind must be 'step' or 'ref', got {self.kind!r}")

    @property
    def name(self) -> str:
        return f"gt_{self.kind}"

    def field_ids(self, study: StudyDir) -> list[str]:
        ids = []
        for p in PHASES:
            if self.kind == "ref" and p == 0:
                continue
            if study.gt_path(self.kind, p).exists():
                ids.append(f"{self.kind}_{p:02d}")
        return ids

    def load(self, study: StudyDir, field_id: str) -> DisplacementField:
        kind, pct = field_id.split("_")
        return study.load_gt(kind, int(pct))


@dataclass(frozen=True)
class RegistrationFields:
    """Fields of ``respmotion register`` (B-spline control points turned dense at load time).

    ``root`` is the registration output folder; ``kind`` is ``ref`` or ``step`` (same ids as ``gt/``).
    """

    root: str
    kind: str = "ref"

    def __post_init__(self) -> None:
        if self.kind not in ("step", "ref"):
            raise ValueError(f"registration field kind must be 'step' or 'ref', got {self.kind!r}")

    @property
    def name(self) -> str:
        return f"reg_{self.kind}@{self.root}"

    def path(self, study: StudyDir, field_id: str) -> Path:
        """The ``.npz`` file of ``field_id`` (e.g. ``ref_40``) of ``study``."""
        return Path(self.root) / study.patient / study.study / f"{field_id}.npz"

    def field_ids(self, study: StudyDir) -> list[str]:
        ids = [f"{self.kind}_{p:02d}" for p in PHASES if not (self.kind == "ref" and p == 0)]
        return [i for i in ids if self.path(study, i).exists()]

    def load(self, study: StudyDir, field_id: str) -> DisplacementField:
        from ..registration.bspline import dense_field

        return dense_field(self.path(study, field_id))


def field_source(name: str) -> FieldSource:
    """Field source by config name: ``gt_step``, ``gt_ref`` (phantom ground truth) or
    ``reg_ref@DIR`` / ``reg_step@DIR`` (registration output folder ``DIR``)."""
    if name in ("gt_step", "gt_ref"):
        return GroundTruthFields(name.split("_")[1])
    if name.startswith(("reg_ref@", "reg_step@")):
        kind, root = name[4:].split("@", 1)
        if not Path(root).is_dir():
            raise ValueError(f"{root}: registration output folder not found (field source {name!r})")
        return RegistrationFields(root, kind)
    raise ValueError(f"unknown field source {name!r} (known: gt_step, gt_ref, reg_ref@DIR, reg_step@DIR)")


class _ShapeChecked(Dataset):
    """Base: every item must have the same spatial shape (batches need it)."""

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None

    def _check(self, arr: np.ndarray, where: str) -> np.ndarray:
        if self._shape is None:
            self._shape = tuple(arr.shape)
        elif tuple(arr.shape) != self._shape:
            raise ValueError(f"{where}: shape {tuple(arr.shape)} differs from {self._shape} of the other items "
                             "(resample the cohort to one shape)")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: contains NaN or inf values")
        return arr


class VolumeDataset(_ShapeChecked):
    """CT volumes of every phase of every study: item ``{"x": (1, Z, Y, X) HU float32, "key"}``."""

    def __init__(self, studies: Sequence[StudyDir], phases: Sequence[int] = PHASES) -> None:
        super().__init__()
        self.items = [(s, p) for s in studies for p in phases if s.phase_path(p).exists()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        study, p = self.items[i]
        arr = self._check(study.load_phase(p).array.astype(np.float32, copy=False), str(study.phase_path(p)))
        return {"x": torch.from_numpy(np.ascontiguousarray(arr))[None], "key": f"{study.key}/{phase_name(p)}"}


class FieldDataset(_ShapeChecked):
    """Displacement fields of a :class:`FieldSource`: item ``{"x": (3, Z, Y, X) mm float32, "key", "field_id"}``.

    With a ``prior`` (:class:`respmotion.models.prior.MotionPrior`) ``x`` is the residual
    ``prior.residual(field_id, u, features)`` (``u`` minus the prior's field in mm, divided by the id's scale for a
    scaled or regressed prior: what the DVF VAE trains on in prior mode); a regressed prior reads each study's lung
    features from its reference CT (:meth:`features`).
    """

    def __init__(self, studies: Sequence[StudyDir], source: FieldSource, prior=None) -> None:
        super().__init__()
        self.source = source
        self.prior = prior
        self.items = [(s, f) for s in studies for f in source.field_ids(s)]
        self._features: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int) -> tuple[str, np.ndarray, str]:
        """``(field_id, field (3, Z, Y, X) mm, study key)`` of item ``i`` without the prior subtracted."""
        study, fid = self.items[i]
        arr = self._check(self.source.load(study, fid).array.astype(np.float32, copy=False), f"{study.key} {fid}")
        return fid, arr, study.key

    def features(self, i: int) -> np.ndarray:
        """Lung features (:func:`respmotion.anatomy.features.lung_features`) of item ``i``'s reference CT, read
        once per study; a study whose CT shows no lung is named in the error."""
        study = self.items[i][0]
        if study.key not in self._features:
            ref = study.load_phase(REFERENCE_PHASE)
            try:
                self._features[study.key] = lung_features(ref.array, ref.geometry.spacing)
            except ValueError as exc:
                raise ValueError(f"{study.phase_path(REFERENCE_PHASE)}: {exc} (a regressed motion prior reads the "
                                 f"lung features; use data.motion_prior=scaled for CTs without lungs)") from exc
        return self._features[study.key]

    def __getitem__(self, i: int) -> dict:
        fid, arr, key = self.raw(i)
        if self.prior is not None:
            self.prior.check_shape(arr.shape[1:], f"{key} {fid}")
            arr = self.prior.residual(fid, arr, self.features(i) if self.prior.needs_features else None)
        return {"x": torch.from_numpy(np.ascontiguousarray(arr)), "key": f"{key}/{fid}", "field_id": fid}
