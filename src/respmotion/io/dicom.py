"""Read a CT DICOM series with pydicom into a :class:`Volume` in Hounsfield units.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on
the cross product of the ImageOrientationPatient rows), never by file name; HU = stored value
* RescaleSlope + RescaleIntercept.  Only the tags needed are read (no iteration over all
elements: some real series carry malformed private elements).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.geometry import Geometry
from ..core.types import Volume


class DicomError(ValueError):
    """A DICOM input problem; the message names the file or folder."""


@dataclass
class SliceInfo:
    path: Path
    series_uid: str
    position: np.ndarray  # IPP, LPS mm
    orientation: np.ndarray  # IOP 6 numbers
    pixel_spacing: tuple[float, float]  # (row spacing = y, column spacing = x) mm
    rows: int
    cols: int


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct errors...
        raise DicomError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def list_dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursive) that look like DICOM (DICM preamble or .dcm suffix)."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() == ".dcm":
            out.append(p)
            continue
        try:
            with open(p, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    out.append(p)
        except OSError:
            continue
    return out


def slice_info(path: Path, ds=None) -> SliceInfo:
    ds = ds if ds is not None else _read_header(path)
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        ps = tuple(float(v) for v in ds.PixelSpacing)
        return SliceInfo(path, str(ds.SeriesInstanceUID), ipp, iop, (ps[0], ps[1]), int(ds.Rows), int(ds.Columns))
    except AttributeError as exc:
        raise DicomError(f"{path}: missing DICOM attribute needed for geometry ({exc})") from exc


def geometry_of_slices(slices: list[SliceInfo], where: Path) -> tuple[Geometry, list[SliceInfo]]:
    """Sort slices along the normal and derive the volume geometry; checks spacing is uniform."""
    first = slices[0]
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise DicomError(f"{where}: slices have different ImageOrientationPatient")
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise DicomError(f"{where}: slices have different sizes ({s.rows}x{s.cols} in {s.path.name})")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    pos = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(pos)
    slices = [slices[i] for i in order]
    pos = pos[order]
    if len(slices) > 1:
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            dup = slices[int(np.argmin(gaps)) + 1].path.name
            raise DicomError(f"{where}: two slices at the same position (e.g. {dup}); duplicate or mixed series")
        dz = float(np.median(gaps))
        if np.max(np.abs(gaps - dz)) > 0.01 * dz + 1e-3:
            raise DicomError(f"{where}: non-uniform slice spacing ({gaps.min():.3f}..{gaps.max():.3f} mm)")
    else:
        dz = 1.0
    direction = np.stack([row, col, normal], axis=1)  # columns: index axes i (x), j (y), k (z)
    geom = Geometry(
        (len(slices), first.rows, first.cols),
        (dz, first.pixel_spacing[0], first.pixel_spacing[1]),
        tuple(slices[0].position),
        tuple(direction.ravel()),
    )
    return geom, slices


def read_pixels_hu(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise DicomError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * slope + intercept


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one CT series from ``folder`` into HU (float32, ``(z, y, x)``)."""
    folder = Path(folder)
    files = list_dicom_files(folder)
    if not files:
        raise DicomError(f"{folder}: no DICOM files found")
    infos = [slice_info(p) for p in files]
    uids = sorted({s.series_uid for s in infos})
    if series_uid is None:
        if len(uids) > 1:
            raise DicomError(f"{folder}: holds {len(uids)} series; pick one by SeriesInstanceUID")
        series_uid = uids[0]
    infos = [s for s in infos if s.series_uid == series_uid]
    if not infos:
        raise DicomError(f"{folder}: no slices of series {series_uid}")
    geom, infos = geometry_of_slices(infos, folder)
    arr = np.stack([read_pixels_hu(s.path) for s in infos])
    return Volume(arr.astype(np.float32), geom, {"source": str(folder), "series_uid": series_uid, "modality": "CT"})
