"""The CT series that synthesized DICOM belongs with: a template series read, the slice geometry a new series
is written with, and what another object needs to reference a series (:class:`SeriesRef`).

* :func:`read_series_headers`: the headers (no pixels) of the one image series in a folder, keyed by file;
  :func:`series_geometry`: its :class:`~respmotion.core.geometry.Geometry` and the slices in array order.
* :func:`slice_geometry_from_template` / :func:`slice_geometry_from_volume`: per-slice
  ``ImagePositionPatient`` / ``ImageOrientationPatient`` / ``PixelSpacing`` / ``SliceThickness`` /
  ``SliceLocation`` values, copied from the template's slices as they are, or computed from a geometry (LPS mm)
  as DICOM decimal strings (:func:`decimal_string`).
* :func:`whitelisted`: the patient/study attributes (:data:`COPIED_ATTRIBUTES`) a new series copies; nothing
  else of the input is carried (no private tags, no institution, no device serials).

Every problem raises :class:`DicomExportError` (a ``ValueError``) whose one-line message names the file or folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.geometry import Geometry, slice_normal
from .dicom import DicomError, geometry_of_slices, list_dicom_files, scan_series, slice_info

#: patient/study attributes copied from the input series (a fixed whitelist; others are dropped).
COPIED_ATTRIBUTES: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
    "PatientPosition",
    "PositionReferenceIndicator",
)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class DicomExportError(DicomError):
    """A DICOM export problem; the message names the file or folder."""


@dataclass
class SeriesRef:
    """What another object (an RTSTRUCT) needs to reference one CT series.

    ``sop_instance_uids`` are in array slice order (index ``k`` of the ``(z, y, x)`` volume).
    ``patient_study`` holds the whitelisted patient/study attributes (:data:`COPIED_ATTRIBUTES`).
    """

    geometry: Geometry
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    sop_class_uid: str = CT_IMAGE_STORAGE
    patient_study: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-slice UIDs)."""
        return {
            "folder": str(self.folder) if self.folder else None,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "slices": len(self.sop_instance_uids),
            "geometry": self.geometry.to_dict(),
        }

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "SeriesRef":
        """Read the headers of the one CT series in ``folder`` (its geometry, UIDs, patient/study)."""
        folder = Path(folder)
        headers = read_series_headers(folder)
        geom, ordered = series_geometry(folder, headers)
        first = headers[ordered[0].path]
        return cls(
            geometry=geom,
            study_uid=str(first.get("StudyInstanceUID", "")),
            series_uid=str(first.SeriesInstanceUID),
            frame_of_reference_uid=required_attribute(first, "FrameOfReferenceUID", ordered[0].path),
            sop_instance_uids=[str(headers[s.path].SOPInstanceUID) for s in ordered],
            sop_class_uid=str(first.get("SOPClassUID", CT_IMAGE_STORAGE)),
            patient_study=whitelisted(first),
            folder=folder,
        )


# ---------------------------------------------------------------------------- reading a series
def required_attribute(ds, keyword: str, path: Path) -> str:
    """``ds``'s ``keyword`` as a string; a :class:`DicomExportError` naming ``path`` when it is missing or empty."""
    value = ds.get(keyword, None)
    if not value:
        raise DicomExportError(f"{path}: template slice has no {keyword}")
    return str(value)


def whitelisted(ds) -> dict[str, Any]:
    """The :data:`COPIED_ATTRIBUTES` present in ``ds`` (values as pydicom gives them)."""
    return {k: ds[k].value for k in COPIED_ATTRIBUTES if k in ds}


def read_series_headers(folder: Path) -> dict[Path, Any]:
    """Headers of the one image series in ``folder`` keyed by path; errors name the folder."""
    import pydicom

    if not folder.is_dir():
        raise DicomExportError(f"{folder}: template is not a folder of DICOM files")
    files = list_dicom_files(folder)
    series = scan_series(files)
    if not series:
        raise DicomExportError(f"{folder}: no CT image series in the template folder")
    if len(series) > 1:
        raise DicomExportError(f"{folder}: template folder holds {len(series)} series; give the folder of one series")
    out = {}
    for p in series[0].files:
        try:
            out[p] = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types; re-raised typed with the file name
            raise DicomExportError(f"{p}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return out


def series_geometry(folder: Path, headers: dict[Path, Any]):
    """The series' :class:`~respmotion.core.geometry.Geometry` and its slices in array order (``z`` index),
    from the headers of :func:`read_series_headers` (:func:`respmotion.io.dicom.geometry_of_slices`)."""
    infos = [slice_info(p, ds) for p, ds in headers.items()]
    return geometry_of_slices(infos, folder)


# ---------------------------------------------------------------------------- geometry strings
def decimal_string(value: float) -> str:
    """A DICOM decimal string (<= 16 characters) for ``value``."""
    for digits in (10, 8, 6, 4):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    raise DicomExportError(f"value {value!r} does not fit a DICOM decimal string")


def slice_geometry_from_volume(geometry: Geometry) -> list[dict[str, Any]]:
    """Per-slice IPP/IOP/PixelSpacing/SliceThickness/SliceLocation strings from a Geometry."""
    orientation = geometry.image_orientation()
    iop = [decimal_string(v) for v in orientation]
    ps = [decimal_string(geometry.spacing[1]), decimal_string(geometry.spacing[2])]
    dicom_normal = slice_normal(orientation)
    out = []
    for k in range(geometry.shape[0]):
        ipp = geometry.index_to_world([k, 0, 0])
        out.append({
            "ImagePositionPatient": [decimal_string(v) for v in ipp],
            "ImageOrientationPatient": iop,
            "PixelSpacing": ps,
            "SliceThickness": decimal_string(geometry.spacing[0]),
            "SliceLocation": decimal_string(float(np.dot(ipp, dicom_normal))),
        })
    return out


def slice_geometry_from_template(headers: dict[Path, Any], ordered) -> list[dict[str, Any]]:
    """Per-slice geometry values copied from the template's headers, in the slice order ``ordered`` (the slices
    of :func:`series_geometry`); ``SliceLocation`` computed where a slice lacks it."""
    out = []
    for s in ordered:
        ds = headers[s.path]
        normal = slice_normal(s.orientation)
        rec = {
            "ImagePositionPatient": list(ds["ImagePositionPatient"].value),
            "ImageOrientationPatient": list(ds["ImageOrientationPatient"].value),
            "PixelSpacing": list(ds["PixelSpacing"].value),
            "SliceLocation": ds.SliceLocation if "SliceLocation" in ds
            else decimal_string(float(np.dot(s.position, normal))),
        }
        if "SliceThickness" in ds and ds.SliceThickness not in (None, ""):
            rec["SliceThickness"] = ds.SliceThickness
        out.append(rec)
    return out
