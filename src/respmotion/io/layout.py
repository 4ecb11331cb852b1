"""On-disk layout of a cohort, shared by the phantom, data preparation and every later stage.

::

    <root>/<patient>/<study>/
        study.json                 # written last: the study is complete (phases, source, geometry)
        phase_00.npy + .json       # CT of phase 0 % (end-inhale), HU float32 (z, y, x) + geometry sidecar
        phase_10.npy + .json       # ... phase_90
        masks/lung_00.npy ...      # optional uint8 masks (phantom; registration writes body masks)
        gt/dvf_ref_40.npy (+json)  # phantom only: exact pull field of phase 40 relative to phase 00
        gt/dvf_step_40.npy (+json) # phantom only: exact pull field phase 40 -> phase 50 (90 -> 00 closes the cycle)
        landmarks.json             # optional: points in LPS mm per phase

Phases are named by percent of the cycle (00, 10, ..., 90); 00 = end-inhale, 50 = end-exhale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..core.types import DisplacementField, Volume
from .atomic import read_json, write_json
from .volumes import load_field, load_volume, save_field, save_volume

PHASES: tuple[int, ...] = tuple(range(0, 100, 10))
#: the phase every field is relative to (end-inhale, 00): the reference CT of a study
REFERENCE_PHASE = 0
STUDY_MARKER = "study.json"


def phase_name(percent: int) -> str:
    if percent not in PHASES:
        raise ValueError(f"phase {percent}% is not one of {PHASES}")
    return f"phase_{percent:02d}"


def next_phase(percent: int) -> int:
    return PHASES[(PHASES.index(percent) + 1) % len(PHASES)]


@dataclass(frozen=True)
class StudyDir:
    """One study folder of the layout."""

    path: Path

    @property
    def patient(self) -> str:
        return self.path.parent.name

    @property
    def study(self) -> str:
        return self.path.name

    @property
    def key(self) -> str:
        return f"{self.patient}/{self.study}"

    def phase_path(self, percent: int) -> Path:
        return self.path / f"{phase_name(percent)}.npy"

    def mask_path(self, name: str, percent: int) -> Path:
        return self.path / "masks" / f"{name}_{percent:02d}.npy"

    def gt_path(self, kind: str, percent: int) -> Path:
        if kind not in ("ref", "step"):
            raise ValueError(f"ground-truth kind must be 'ref' or 'step', got {kind!r}")
        return self.path / "gt" / f"dvf_{kind}_{percent:02d}.npy"

    @property
    def landmarks_path(self) -> Path:
        return self.path / "landmarks.json"

    @property
    def marker(self) -> Path:
        return self.path / STUDY_MARKER

    def is_complete(self) -> bool:
        return self.marker.exists()

    def info(self) -> dict:
        return read_json(self.marker)

    def load_phase(self, percent: int) -> Volume:
        return load_volume(self.phase_path(percent))

    def load_gt(self, kind: str, percent: int) -> DisplacementField:
        return load_field(self.gt_path(kind, percent))

    def save_phase(self, percent: int, volume: Volume) -> None:
        save_volume(volume, self.phase_path(percent))

    def save_gt(self, kind: str, percent: int, field: DisplacementField) -> None:
        save_field(field, self.gt_path(kind, percent))

    def mark_complete(self, info: dict) -> None:
        write_json(self.marker, info)


def iter_studies(root: str | os.PathLike, complete_only: bool = True) -> Iterator[StudyDir]:
    """All studies under ``root`` in sorted order (only complete ones by default)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    for patient in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for study in sorted(s for s in patient.iterdir() if s.is_dir() and not s.name.startswith(".")):
            sd = StudyDir(study)
            if not complete_only or sd.is_complete():
                yield sd


def list_patients(root: str | os.PathLike) -> list[str]:
    return sorted({s.patient for s in iter_studies(root)})
