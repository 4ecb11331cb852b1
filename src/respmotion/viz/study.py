"""Render studies of our dataset layout (:mod:`respmotion.io.layout`): what ``respmotion render`` runs.

Field sources (``fields``):

* ``None``: the real phases only (no motion overlay).
* ``"gt"``: the phantom's exact fields ``gt/dvf_ref_XX.npy`` drawn over the real phases.
* a folder with ``dvf_XX.npy|nii.gz|nii|mha|mhd|nrrd`` (e.g. written by synthesis), either directly
  or in ``<folder>/<patient>/<study>/``: the study's phase 00 is pulled through each field to make
  the generated phases, and a real | generated | difference comparison is added (real motion
  drawn from ``gt`` when the study has it).  ``dvf_00`` may be absent (no motion).  A field on a
  coarser grid with the same field of view is resampled to the CT grid.

Masks named in ``contours`` (``masks/<name>_XX.npy``) are outlined: the real ones on the real
phases, and the phase-00 mask pulled through the generated fields on the generated phases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.ops import resample_field
from ..core.types import DisplacementField, Volume
from ..io.atomic import read_npy
from ..io.layout import PHASES, StudyDir, iter_studies
from ..io.volumes import load_field
from .config import RenderConfig
from .cycle import render_cycle, warp_masks

FIELD_SUFFIXES = (".npy", ".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclass
class RenderJob:
    """Config of ``respmotion render`` (saved beside its outputs).

    Attributes:
        data: dataset root (layout of :mod:`respmotion.io.layout`).
        out: output folder; GIFs go to ``<out>/<patient>/<study>/``.
        patient: patient folder name, or its leading number (``117`` matches ``117_HM10395``,
            ``phantom`` does not match ``phantom_000``);
            ``None`` = every patient.
        num_studies: first N studies of each patient.
        fields: ``None``, ``"gt"`` or a folder of ``dvf_XX`` files (see module docstring).
        contours: mask names to outline (``masks/<name>_XX.npy``).
        render: how the GIFs look.
    """

    data: str = ""
    out: str = ""
    patient: str | None = None
    num_studies: int = 1
    fields: str | None = None
    contours: tuple[str, ...] = ()
    render: RenderConfig = field(default_factory=RenderConfig)


def select_studies(data: str | os.PathLike, patient: str | None, num_studies: int) -> list[StudyDir]:
    """Complete studies of ``patient`` (or of all patients), the first ``num_studies`` of each."""
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    studies = list(iter_studies(data))
    if patient is not None:
        studies = [s for s in studies
                   if s.patient == patient or (patient.isdigit() and s.patient.split("_")[0] == patient)]
    picked: list[StudyDir] = []
    per_patient: dict[str, int] = {}
    for s in studies:
        if per_patient.get(s.patient, 0) < num_studies:
            picked.append(s)
            per_patient[s.patient] = per_patient.get(s.patient, 0) + 1
    return picked


def _fit_field(f: DisplacementField, ct: Volume, source: Path) -> DisplacementField:
    """``f`` on ``ct``'s grid: as is, or resampled when it covers the same field of view."""
    if f.geometry.same_as(ct.geometry):
        return f
    if ct.geometry.resized(f.geometry.shape).same_as(f.geometry, tol=1e-3):
        return resample_field(f, ct.geometry.shape)
    raise ValueError(f"{source}: field grid {f.geometry.shape} / {f.geometry.spacing} mm / origin "
                     f"{tuple(round(o, 2) for o in f.geometry.origin)} does not match the CT "
                     f"{ct.geometry.shape} / {ct.geometry.spacing} mm / {tuple(round(o, 2) for o in ct.geometry.origin)}")


def _field_file(folder: Path, percent: int) -> Path | None:
    for sfx in FIELD_SUFFIXES:
        p = folder / f"dvf_{percent:02d}{sfx}"
        if p.exists():
            return p
    return None


def field_folder(source: str | os.PathLike, study: StudyDir, single: bool) -> Path:
    """Where ``study``'s fields are: ``<source>/<patient>/<study>`` or ``<source>`` itself."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: field folder not found (use --fields gt or a folder of dvf_XX files)")
    nested = root / study.patient / study.study
    if nested.is_dir():
        return nested
    if not single:
        raise ValueError(f"{root}: several studies selected but no {study.patient}/{study.study} subfolder; "
                         "pick one with --patient/--num-studies 1")
    return root


def load_fields(folder: Path, ct: Volume) -> list[DisplacementField | None]:
    """Fields ``dvf_XX`` of every phase from ``folder`` (``dvf_00`` optional = no motion)."""
    out: list[DisplacementField | None] = []
    missing = []
    for p in PHASES:
        path = _field_file(folder, p)
        if path is None:
            if p != 0:
                missing.append(f"dvf_{p:02d}")
            out.append(None)
            continue
        out.append(_fit_field(load_field(path), ct, path))
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (any of {', '.join(FIELD_SUFFIXES)})")
    return out


def load_gt_fields(study: StudyDir) -> list[DisplacementField | None]:
    """The phantom's exact fields of every phase relative to 00 (``None`` for 00 when absent)."""
    out: list[DisplacementField | None] = []
    for p in PHASES:
        path = study.gt_path("ref", p)
        if not path.exists():
            if p == 0:
                out.append(None)
                continue
            raise FileNotFoundError(f"{path}: no ground-truth field (only phantom studies have gt/; use --fields DIR)")
        out.append(study.load_gt("ref", p))
    return out


def load_masks(study: StudyDir, name: str) -> list[np.ndarray]:
    paths = [study.mask_path(name, p) for p in PHASES]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{study.path / 'masks'}: no {name} masks {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}")
    return [read_npy(p).astype(bool) for p in paths]


def render_study(study: StudyDir, out_dir: str | os.PathLike, fields: str | None, contours: Sequence[str],
                 cfg: RenderConfig, single: bool = True) -> list[Path]:
    """Render one study (see module docstring); returns the files written."""
    for p in PHASES:
        if not study.phase_path(p).exists():
            raise FileNotFoundError(f"{study.phase_path(p)}: phase missing")
    phases = [study.load_phase(p) for p in PHASES]
    masks = [load_masks(study, n) for n in contours]
    name = f"{study.patient}_{study.study}_"
    if fields is None:
        return render_cycle(out_dir, phases, None, contours=masks or None, name=name, config=cfg)
    if fields == "gt":
        return render_cycle(out_dir, phases, load_gt_fields(study), contours=masks or None, name=name, config=cfg)
    folder = field_folder(fields, study, single)
    gen_fields = load_fields(folder, phases[0])
    has_gt = study.gt_path("ref", PHASES[1]).exists()
    gen_masks = [warp_masks(m[0], phases[0], gen_fields) for m in masks]
    return render_cycle(
        out_dir, None, gen_fields, reference=phases[0], contours=gen_masks or None,
        real_phases=phases, real_fields=load_gt_fields(study) if has_gt else None,
        real_contours=masks or None, name=name, config=cfg,
    )
