"""Read CT DICOM series with pydicom into :class:`Volume` objects in Hounsfield units.

* Slices are ordered by their position along the slice normal (ImagePositionPatient projected on
  the cross product of the two ImageOrientationPatient rows), never by file name, and never by
  the SpacingBetweenSlices tag (real series carry a negative one).
* HU = pydicom's modality LUT (RescaleSlope / RescaleIntercept, or a Modality LUT Sequence),
  applied slice by slice.
* Only the attributes needed are read by keyword or tag: some real series carry malformed
  private elements that raise when *all* elements are iterated over (POPI's (01F1,1026)).
* The respiratory phase comes from SeriesDescription (TCIA 4D-Lung: ``..., Gated, 40.0%``) or,
  failing that, from the Philips/Elscint private tag (01E1,xx1E) (POPI: ``0.0%``).

* Refused (not imported wrongly): slices that do not stack along the normal (tilted gantry), an
  ImageOrientationPatient that is not two orthogonal unit vectors, and files of two series that
  share one SeriesInstanceUID (other study/frame/description/phase, or an InstanceNumber twice).

Every problem is a :class:`DicomError` whose one-line message names the file or folder.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.geometry import Geometry, direction_from_orientation, slice_normal
from ..core.types import Volume

# "P4^P100^S102^I0, Gated, 40.0%" -> 40.0
_GATED_RE = re.compile(r"gated\s*,\s*([0-9]+(?:\.[0-9]*)?)\s*%", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*%\s*$")
# Philips (Elscint) CT private tag holding the gating phase, e.g. b"0.0%" (group, element offset, creator).
_PRIVATE_PHASE = (0x01E1, 0x1E, "ELSCINT1")
# Relative tolerance on slice gaps before a series counts as having mixed spacing.
SPACING_RTOL = 0.01
# In-plane drift of the slice positions (fraction of a pixel) before a series counts as tilted/sheared.
IN_PLANE_TOL = 0.1


class DicomError(ValueError):
    """A DICOM input problem; the message names the file or folder."""


@dataclass
class SliceInfo:
    """What one image file contributes to a series (geometry and grouping keys)."""

    path: Path
    series_uid: str
    position: np.ndarray  # ImagePositionPatient, LPS mm (x, y, z)
    orientation: np.ndarray  # ImageOrientationPatient, 6 numbers
    pixel_spacing: tuple[float, float]  # (row spacing = y, column spacing = x) mm
    rows: int
    cols: int
    study_uid: str = ""
    patient_id: str = ""
    series_description: str = ""
    study_date: str = ""
    phase: float | None = None
    slice_thickness: float | None = None
    frame_uid: str = ""
    instance_number: int | None = None


@dataclass
class SeriesFiles:
    """The files of one series found in a folder, with its grouping keys (from the first header)."""

    series_uid: str
    study_uid: str
    patient_id: str
    series_description: str
    study_date: str
    phase: float | None
    files: list[Path] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.files[0].parent


# ---------------------------------------------------------------- reading single files
def _quiet(func):
    """Run ``func`` with Python warnings off: pydicom validates values when they are first read
    (one warning per file for an odd PatientID: hundreds for a 4D study); problems that matter
    are our own one-line errors naming the file."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return func(*args, **kwargs)
    return wrapper


def _dcmread(path: Path, header_only: bool):
    import pydicom

    try:
        with warnings.catch_warnings():
            # pydicom warns about what it then fails on; our error names the file instead
            warnings.simplefilter("ignore")
            return pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct/OSErrors...; re-raised typed
        raise DicomError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def is_dicom_file(path: Path) -> bool:
    """``.dcm`` suffix or the ``DICM`` magic after the 128-byte preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError as exc:
        raise DicomError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def series_uid_of(path: str | os.PathLike) -> str:
    """SeriesInstanceUID of one DICOM file (header only)."""
    path = Path(path)
    ds = _dcmread(path, header_only=True)
    uid = ds.get("SeriesInstanceUID", None)
    if not uid:
        raise DicomError(f"{path}: not a readable DICOM image (no SeriesInstanceUID; corrupt or truncated file)")
    return str(uid)


def list_dicom_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """DICOM files under ``folder`` (hidden files and DICOMDIR skipped), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a folder")
    it = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in sorted(it):
        if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            continue
        if is_dicom_file(p):
            out.append(p)
    return out


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def phase_from_description(description: str) -> float | None:
    """``"P4^P100^S102^I0, Gated, 40.0%"`` -> 40.0; None when there is no ``Gated, N%`` part."""
    m = _GATED_RE.search(description or "")
    return float(m.group(1)) if m else None


def phase_percent(ds) -> float | None:
    """Respiratory phase in percent from SeriesDescription or the Elscint private tag; None if absent."""
    from_desc = phase_from_description(_text(ds, "SeriesDescription"))
    if from_desc is not None:
        return from_desc
    group, offset, creator = _PRIVATE_PHASE
    try:
        elem = ds.get_private_item(group, offset, creator)
    except KeyError:  # no such private block or element in this file
        return None
    raw = elem.value
    text = raw.decode("latin-1", errors="replace") if isinstance(raw, bytes) else str(raw)
    m = _PERCENT_RE.match(text.strip("\x00 "))
    return float(m.group(1)) if m else None


@_quiet
def slice_info(path: Path, ds=None) -> SliceInfo:
    """Geometry and grouping keys of one image file (reads the header when ``ds`` is None)."""
    ds = ds if ds is not None else _dcmread(path, header_only=True)
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ps = tuple(float(v) for v in ds.PixelSpacing)
        rows, cols, series_uid = int(ds.Rows), int(ds.Columns), str(ds.SeriesInstanceUID)
    except AttributeError as exc:
        raise DicomError(f"{path}: missing DICOM attribute needed for a CT volume ({exc})") from exc
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{path}: malformed geometry attribute ({exc})") from exc
    if ipp.shape != (3,) or iop.shape != (6,) or len(ps) != 2:
        raise DicomError(f"{path}: ImagePositionPatient/ImageOrientationPatient/PixelSpacing have the wrong length")
    if min(ps) <= 0:
        raise DicomError(f"{path}: PixelSpacing must be positive, got {ps}")
    thick = ds.get("SliceThickness", None)
    inst = ds.get("InstanceNumber", None)
    return SliceInfo(
        path, series_uid, ipp, iop, (ps[0], ps[1]), rows, cols,
        study_uid=_text(ds, "StudyInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        series_description=_text(ds, "SeriesDescription"),
        study_date=_text(ds, "StudyDate"),
        phase=phase_percent(ds),
        slice_thickness=float(thick) if thick not in (None, "") else None,
        frame_uid=_text(ds, "FrameOfReferenceUID"),
        instance_number=int(inst) if inst not in (None, "") else None,
    )


_NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "SEG", "RWV"}


@_quiet
def _is_image(ds, path: Path | None = None) -> bool:
    """True for an image slice; False for a non-image object (RTSTRUCT, SR...) that a folder may
    also hold; a file that claims to be an image (CT/MR/... or has Rows) but lacks its position is
    a broken (e.g. truncated) header and raises."""
    if "Rows" in ds and "ImagePositionPatient" in ds:
        return True
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES:
        return False
    if modality or "Rows" in ds or "PixelData" in ds:
        raise DicomError(f"{path}: incomplete image header (no ImagePositionPatient/Rows); truncated or damaged file")
    return False


@_quiet
def read_pixels_hu(path: Path, ds=None) -> np.ndarray:
    """One slice in HU, float32 ``(rows, cols)`` (pydicom's modality LUT: slope/intercept or LUT)."""
    from pydicom.pixels import apply_modality_lut

    ds = ds if ds is not None else _dcmread(path, header_only=False)
    try:
        arr = apply_modality_lut(ds.pixel_array, ds)
    except Exception as exc:  # decoders raise many types (missing handler, truncated data); re-raised typed
        raise DicomError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 2:
        raise DicomError(f"{path}: expected one 2D slice per file, got pixel array shape {arr.shape}")
    return np.asarray(arr, dtype=np.float32)


# ---------------------------------------------------------------- series geometry
def check_one_series(slices: list[SliceInfo], where: Path) -> None:
    """Files grouped by one SeriesInstanceUID must be one series: the same study, frame of reference,
    description and phase, and no InstanceNumber twice; two exports that reuse a UID are refused."""
    first = slices[0]
    keys = (("StudyInstanceUID", "study_uid"), ("FrameOfReferenceUID", "frame_uid"),
            ("SeriesDescription", "series_description"), ("respiratory phase", "phase"))
    for s in slices[1:]:
        for label, attr in keys:
            if getattr(s, attr) != getattr(first, attr):
                raise DicomError(f"{where}: {first.path.name} and {s.path.name} share SeriesInstanceUID "
                                 f"{first.series_uid} but differ in {label} ({getattr(first, attr)!r} vs "
                                 f"{getattr(s, attr)!r}): two series under one UID; put them in separate folders")
    seen: dict[int, Path] = {}
    for s in slices:
        if s.instance_number is None:
            continue
        if s.instance_number in seen:
            raise DicomError(f"{where}: {seen[s.instance_number].name} and {s.path.name} share SeriesInstanceUID "
                             f"{first.series_uid} and InstanceNumber {s.instance_number}: two exports under one "
                             f"UID; put them in separate folders")
        seen[s.instance_number] = s.path


def geometry_of_slices(slices: list[SliceInfo], where: Path) -> tuple[Geometry, list[SliceInfo]]:
    """Sort slices along the normal and derive the volume geometry; checks the series is regular.

    Raises :class:`DicomError` (naming ``where`` or the offending file) for mixed orientation,
    size or pixel spacing, two slices at one position, or non-uniform slice spacing.
    """
    if not slices:
        raise DicomError(f"{where}: no image slices")
    first = slices[0]
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise DicomError(f"{where}: slices have different ImageOrientationPatient ({s.path.name})")
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise DicomError(f"{where}: slices have different sizes ({s.rows}x{s.cols} in {s.path.name})")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise DicomError(f"{where}: slices have different PixelSpacing ({s.pixel_spacing} in {s.path.name})")
    check_one_series(slices, where)
    row, col = first.orientation[:3], first.orientation[3:]
    normal = slice_normal(first.orientation)
    if not (np.isclose(np.linalg.norm(row), 1.0, atol=1e-3) and np.isclose(np.linalg.norm(col), 1.0, atol=1e-3)
            and abs(float(np.dot(row, col))) < 1e-3):
        raise DicomError(f"{first.path}: ImageOrientationPatient {first.orientation.tolist()} is not two orthogonal "
                         f"unit vectors (|row| {np.linalg.norm(row):.3f}, |col| {np.linalg.norm(col):.3f}, "
                         f"row.col {float(np.dot(row, col)):.3f})")
    pos = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    if len(slices) > 1:
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            dup = slices[int(np.argmin(gaps)) + 1].path.name
            raise DicomError(f"{where}: two slices at the same position (e.g. {dup}); duplicate or mixed series")
        dz = float(np.median(gaps))
        if np.max(np.abs(gaps - dz)) > SPACING_RTOL * dz + 1e-3:
            raise DicomError(
                f"{where}: non-uniform slice spacing ({gaps.min():.3f}..{gaps.max():.3f} mm; missing or extra slices?)"
            )
        # the slices must stack along the normal: a tilted gantry shifts each slice within its plane
        shift = np.array([s.position - slices[0].position for s in slices])
        shift -= np.outer(shift @ normal, normal)
        drift = float(np.linalg.norm(shift, axis=1).max())
        if drift > IN_PLANE_TOL * min(first.pixel_spacing):
            raise DicomError(f"{where}: slice positions drift {drift:.2f} mm within the slice plane over the series "
                             f"(tilted gantry or sheared stack: not a regular grid); resample it to an untilted grid "
                             f"before importing")
    else:
        dz = first.slice_thickness if first.slice_thickness and first.slice_thickness > 0 else 1.0
    direction = direction_from_orientation(first.orientation)  # columns: index axes i (x), j (y), k (z)
    geom = Geometry(
        (len(slices), first.rows, first.cols),
        (dz, first.pixel_spacing[0], first.pixel_spacing[1]),
        tuple(slices[0].position),
        direction,
    )
    return geom, slices


# ---------------------------------------------------------------- series discovery
def scan_series(files: Iterable[Path], errors: list[DicomError] | None = None) -> list[SeriesFiles]:
    """Group image files by SeriesInstanceUID (headers only); non-image DICOM objects are skipped.

    An unreadable file raises :class:`DicomError` naming it, or, when an ``errors`` list is
    given, is appended there (for the caller to report) and the scan goes on.
    """
    groups: dict[str, SeriesFiles] = {}
    for p in files:
        try:
            ds = _dcmread(p, header_only=True)
            if not _is_image(ds, p):
                continue  # RTSTRUCT, RTPLAN, SR...: not part of an image volume
            s = slice_info(p, ds)
        except DicomError as exc:
            if errors is None:
                raise
            errors.append(exc)
            continue
        g = groups.get(s.series_uid)
        if g is None:
            g = groups[s.series_uid] = SeriesFiles(
                s.series_uid, s.study_uid, s.patient_id, s.series_description, s.study_date, s.phase
            )
        g.files.append(p)
    return sorted(groups.values(), key=lambda g: (g.study_uid, g.phase if g.phase is not None else -1, g.series_uid))


def read_series_files(files: list[Path], where: Path, meta: dict[str, Any] | None = None) -> Volume:
    """Read the given files of one series (each file once) into an HU float32 ``(z, y, x)`` volume."""
    infos, pixels = [], {}
    for p in files:
        ds = _dcmread(p, header_only=False)
        info = slice_info(p, ds)
        infos.append(info)
        pixels[p] = read_pixels_hu(p, ds)
    uids = {s.series_uid for s in infos}
    if len(uids) > 1:
        raise DicomError(f"{where}: files belong to {len(uids)} different series")
    geom, infos = geometry_of_slices(infos, where)
    arr = np.stack([pixels[s.path] for s in infos]).astype(np.float32, copy=False)
    first = infos[0]
    info_meta = {
        "source": str(where),
        "series_uid": first.series_uid,
        "study_uid": first.study_uid,
        "patient_id": first.patient_id,
        "series_description": first.series_description,
        "phase_percent": first.phase,
        "modality": "CT",
        "units": "HU",
    }
    info_meta.update(meta or {})
    return Volume(arr, geom, info_meta)


def describe_series(series: list[SeriesFiles]) -> str:
    parts = []
    for s in series:
        label = s.series_description or (f"phase {s.phase:g}%" if s.phase is not None else "no description")
        parts.append(f"{s.series_uid} '{label}' ({len(s.files)} files)")
    return "; ".join(parts)


def read_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, phase: float | None = None
) -> Volume:
    """Read one CT series from ``folder`` (recursive) into HU (float32, ``(z, y, x)``).

    With several series in the folder, pick one by ``series_uid`` or by respiratory ``phase``
    (percent); otherwise that is an error listing them.
    """
    folder = Path(folder)
    files = list_dicom_files(folder)
    if not files:
        raise DicomError(f"{folder}: no DICOM files found")
    series = scan_series(files)
    if not series:
        raise DicomError(f"{folder}: no image series among {len(files)} DICOM files")
    chosen = series
    if series_uid is not None:
        chosen = [s for s in series if s.series_uid == series_uid]
        if not chosen:
            raise DicomError(f"{folder}: no series {series_uid} (found: {describe_series(series)})")
    if phase is not None:
        chosen = [s for s in chosen if s.phase is not None and abs(s.phase - phase) < 1e-6]
        if not chosen:
            raise DicomError(f"{folder}: no series at phase {phase:g}% (found: {describe_series(series)})")
    if len(chosen) > 1:
        raise DicomError(
            f"{folder}: holds {len(chosen)} series, pick one by SeriesInstanceUID or phase: {describe_series(chosen)}"
        )
    return read_series_files(chosen[0].files, folder)
