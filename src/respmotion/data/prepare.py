"""Gated 4D-CT DICOM series -> resampled HU phases in the layout of :mod:`respmotion.io.layout`.

Steps:

1. Scan every folder under ``src`` holding DICOM files (headers only, parallel over folders) and
   group image series by StudyInstanceUID.  The phase of a series comes from SeriesDescription
   (``..., Gated, 40.0%``) or the Elscint private tag (see :mod:`respmotion.io.dicom`).
2. Check each study: exactly one series for each of the phases 0, 10, ..., 90 %, no unreadable
   file.  Others are reported and skipped.  Studies already complete in ``out`` are skipped.
3. Read each series (slices ordered by position, HU), resample it to ``shape`` with
   :func:`respmotion.core.ops.resample_volume` (same field of view; spacing/origin/direction
   recorded) and write ``phase_XX.npy`` + JSON sidecar into a hidden temporary study folder,
   parallel over series with a progress bar.
4. When all ten phases of a study are written and share one geometry, write ``study.json`` and
   rename the temporary folder into place: a study is either complete or absent.  Temporary
   folders of an interrupted run are removed at the start of the next.

Study folders are ``<out>/<PatientID>/<StudyInstanceUID>``.  Volumes stay in HU (float32); the
window the networks use is :data:`respmotion.data.intensity.HU_WINDOW`, recorded in the metadata.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from .. import __version__
from ..core.geometry import Geometry
from ..core.ops import resample_volume
from ..io.atomic import write_json
from ..io.dicom import DicomError, SeriesFiles, list_dicom_files, read_series_files, scan_series
from ..io.layout import PHASES, StudyDir
from .importer import check_target_shape
from .intensity import HU_WINDOW, HUWindow

log = logging.getLogger(__name__)

TMP_STUDY_PREFIX = ".tmp-study-"
REPORT_NAME = "prepare_report.json"
DEFAULT_SHAPE: tuple[int, int, int] = (50, 256, 256)


@dataclass
class PrepareConfig:
    """``respmotion data prepare`` settings."""

    src: str = "data/dicom"  # folder with the DICOM series (e.g. what `data fetch` wrote)
    out: str = "data/prepared"  # dataset root in the io.layout layout
    shape: tuple[int, int, int] = DEFAULT_SHAPE  # target (z, y, x) voxels; same field of view
    workers: int = 2  # processes; 1 runs in this process
    hu_window: HUWindow = HU_WINDOW  # recorded for the networks (see data.intensity)


@dataclass
class StudyPlan:
    """The series of one study found in ``src`` and what is wrong with it (empty = fine)."""

    patient_id: str
    study_uid: str
    study_date: str
    series: dict[int, SeriesFiles] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def folder_name(self) -> tuple[str, str]:
        return safe_name(self.patient_id or "unknown"), safe_name(self.study_uid)


@dataclass
class PrepareReport:
    prepared: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # study key or folder -> reason

    def to_dict(self) -> dict[str, Any]:
        return {"prepared": self.prepared, "already_done": self.already_done, "skipped": self.skipped}


def safe_name(text: str) -> str:
    """A folder name from a DICOM identifier (anything but letters, digits, ``._-`` becomes ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip())
    return name.lstrip(".") or "unknown"


# ---------------------------------------------------------------- scanning (worker functions)
def dicom_folders(src: Path) -> list[Path]:
    """Folders under ``src`` (itself included) holding at least one DICOM file; hidden ones skipped."""
    out = []
    for dirpath, dirnames, _ in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if list_dicom_files(Path(dirpath), recursive=False):
            out.append(Path(dirpath))
    return out


def _scan_folder(folder: Path) -> tuple[Path, list[SeriesFiles], list[str]]:
    errors: list[DicomError] = []
    series = scan_series(list_dicom_files(folder, recursive=False), errors)
    return folder, series, [str(e) for e in errors]


def group_studies(scans: list[tuple[Path, list[SeriesFiles], list[str]]]) -> tuple[list[StudyPlan], dict[str, str]]:
    """Studies with their phase series and problems; plus folders whose errors belong to no study."""
    studies: dict[str, StudyPlan] = {}
    merged: dict[str, SeriesFiles] = {}
    orphan: dict[str, str] = {}
    for folder, series, errors in scans:
        for s in series:
            if s.series_uid in merged:  # one series split over folders
                merged[s.series_uid].files.extend(s.files)
                continue
            merged[s.series_uid] = s
            studies.setdefault(s.study_uid, StudyPlan(s.patient_id, s.study_uid, s.study_date))
        if errors:
            owners = {s.study_uid for s in series}
            if not owners:
                orphan[str(folder)] = errors[0]
            for uid in owners:
                studies[uid].problems.append(errors[0] if len(errors) == 1 else f"{errors[0]} (+{len(errors) - 1} more)")
    for s in merged.values():
        st = studies[s.study_uid]
        if s.phase is None:
            st.problems.append(f"{s.folder}: series {s.series_uid} has no phase ('{s.series_description}')")
            continue
        p = int(round(s.phase))
        if abs(s.phase - p) > 1e-6 or p not in PHASES:
            st.problems.append(f"{s.folder}: phase {s.phase:g}% is not one of {', '.join(map(str, PHASES))}")
        elif p in st.series:
            st.problems.append(f"duplicate phase {p}% (series in {st.series[p].folder} and {s.folder})")
        else:
            st.series[p] = s
    for st in studies.values():
        missing = [p for p in PHASES if p not in st.series]
        if missing and not any("duplicate" in q for q in st.problems):
            st.problems.append(f"missing phase(s) {', '.join(f'{p}%' for p in missing)}")
    return sorted(studies.values(), key=lambda s: (s.patient_id, s.study_date, s.study_uid)), orphan


# ---------------------------------------------------------------- converting (worker functions)
def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; avoid oversubscription


def convert_series(
    files: list[Path], where: Path, dest: Path, shape: tuple[int, int, int], meta: dict[str, Any]
) -> dict[str, Any]:
    """Read one series, resample to ``shape`` and write ``dest`` (.npy + sidecar); returns its geometry."""
    vol = read_series_files(files, where)
    original = vol.geometry
    out = resample_volume(vol, shape, order=1)
    out.meta = {**vol.meta, **meta, "n_files": len(files), "original_geometry": original.to_dict(),
                "resampling": "linear, Gaussian anti-aliasing when shrinking (core.ops.resample_volume)"}
    StudyDir(dest.parent).save_phase(meta["phase_percent"], out)
    return out.geometry.to_dict()


# ---------------------------------------------------------------- driver
def _clean_stale(out: Path) -> int:
    """Remove temporary study folders of an interrupted run (only ours: ``.tmp-study-*``)."""
    n = 0
    if out.is_dir():
        for patient in out.iterdir():
            if patient.is_dir():
                for tmp in patient.glob(TMP_STUDY_PREFIX + "*"):
                    shutil.rmtree(tmp)
                    n += 1
    return n


def _finalize(st: StudyPlan, tmp: Path, final: Path, geoms: dict[int, dict], cfg: PrepareConfig, src: Path) -> None:
    first = Geometry.from_dict(geoms[PHASES[0]])
    for p, g in geoms.items():
        if not Geometry.from_dict(g).same_as(first, tol=1e-2):
            raise DicomError(f"{st.series[p].folder}: phase {p}% has a different geometry than phase 0%")
    StudyDir(tmp).mark_complete({
        "patient": st.patient_id,
        "study_uid": st.study_uid,
        "study_date": st.study_date,
        "kind": "4d-ct",
        "phases": list(PHASES),
        "geometry": first.to_dict(),
        "series": {f"{p:02d}": st.series[p].series_uid for p in PHASES},
        "source": str(src),
        "units": "HU",
        "hu_window": list(cfg.hu_window),
        "prepared_by": f"respmotion {__version__}",
    })
    if final.exists():
        raise DicomError(f"{final}: exists without {StudyDir(final).marker.name}; remove it to prepare the study again")
    os.rename(tmp, final)


def _executor(workers: int) -> Executor | None:
    if workers <= 1:
        return None
    # forkserver, not fork: the parent may already run OpenMP/torch threads, which do not survive fork;
    # the server imports this module (and torch) once, each worker forks from that clean process.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)


def _completed(pool: Executor | None, fn: Callable[..., Any], jobs: list[tuple]) -> Iterator[tuple[int, Any, DicomError | None]]:
    """Run ``fn(*job)`` for every job (in ``pool``, or here one by one when it is None) and yield
    ``(job index, result, None)`` or ``(job index, None, DicomError)`` as they finish.  Any other
    exception is a bug and propagates.
    """
    if pool is None:
        for i, job in enumerate(jobs):
            try:
                result = fn(*job)
            except DicomError as exc:  # an input problem of this job: handed to the caller to report
                yield i, None, exc
                continue
            yield i, result, None
        return
    futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
    for fut in as_completed(futures):
        exc = fut.exception()
        if exc is not None and not isinstance(exc, DicomError):
            raise exc
        yield futures[fut], (None if exc is not None else fut.result()), exc


def prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareReport:
    """Prepare every complete gated study under ``cfg.src`` into ``cfg.out``; see the module docstring."""
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: DICOM source folder not found")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    shape = check_target_shape(cfg.shape, cfg.workers)
    out.mkdir(parents=True, exist_ok=True)
    if n := _clean_stale(out):
        log.info("removed %d unfinished study folder(s) of an earlier run", n)
    report = PrepareReport()
    pool = _executor(cfg.workers)
    try:
        folders = dicom_folders(src)
        if not folders:
            raise FileNotFoundError(f"{src}: no DICOM files found")
        scans = []
        for _, scan, exc in tqdm(_completed(pool, _scan_folder, [(d,) for d in folders]), total=len(folders),
                                 desc="scan", unit="folder", disable=not progress):
            if exc is not None:  # a folder that cannot be listed: nothing sensible to prepare around it
                raise exc
            scans.append(scan)
        studies, orphan = group_studies(sorted(scans, key=lambda s: str(s[0])))
        report.skipped.update(orphan)
        todo: list[StudyPlan] = []
        for st in studies:
            key = "/".join(st.folder_name)
            if StudyDir(out.joinpath(*st.folder_name)).is_complete():
                report.already_done.append(key)
            elif st.problems:
                report.skipped[key] = "; ".join(st.problems)
            else:
                todo.append(st)
        jobs, owners = [], []
        for st in todo:
            tmp = out / st.folder_name[0] / (TMP_STUDY_PREFIX + st.folder_name[1])
            for p, s in sorted(st.series.items()):
                meta = {"phase_percent": p, "study_uid": st.study_uid, "patient_id": st.patient_id,
                        "series_uid": s.series_uid, "series_description": s.series_description,
                        "source_folder": str(s.folder), "units": "HU", "hu_window": list(cfg.hu_window)}
                jobs.append((sorted(s.files), s.folder, StudyDir(tmp).phase_path(p), shape, meta))
                owners.append((st, p))
        geoms: dict[str, dict[int, dict]] = {}
        failed: set[str] = set()
        for i, geom, exc in tqdm(_completed(pool, convert_series, jobs), total=len(jobs), desc="prepare",
                                 unit="series", disable=not progress):
            st, p = owners[i]
            key = "/".join(st.folder_name)
            tmp = out / st.folder_name[0] / (TMP_STUDY_PREFIX + st.folder_name[1])
            if key in failed:
                continue
            if exc is not None:  # the study's temporary folder is removed below, once its workers are done
                failed.add(key)
                report.skipped[key] = str(exc)
                continue
            geoms.setdefault(key, {})[p] = geom
            if len(geoms[key]) == len(PHASES):
                try:
                    _finalize(st, tmp, out.joinpath(*st.folder_name), geoms[key], cfg, src)
                    report.prepared.append(key)
                except DicomError as err:
                    report.skipped[key] = str(err)
                    failed.add(key)
        for key in failed:
            patient, study = key.split("/")
            tmp = out / patient / (TMP_STUDY_PREFIX + study)
            if tmp.exists():
                shutil.rmtree(tmp)
            if not any((out / patient).iterdir()):
                (out / patient).rmdir()  # the patient folder was made for this study only
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    write_json(out / REPORT_NAME, report.to_dict())
    return report
