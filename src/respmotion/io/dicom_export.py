"""Write a (synthesized) 4D-CT as DICOM CT series that 3D Slicer and planning systems import.

One CT series per phase, one file per slice (CT Image Storage, explicit VR little endian, int16
pixels with ``RescaleSlope`` 1 / ``RescaleIntercept`` -1024, ``RescaleType`` HU).  With a template
the phases join the input's study (its StudyInstanceUID and FrameOfReferenceUID), so a planning
system lists them beside the planning CT; without one they share one new StudyInstanceUID.  Each
phase gets a new SeriesInstanceUID and new SOPInstanceUIDs.  The phase is carried the way TCIA
4D-Lung does it, ``SeriesDescription = "Gated, 40%"`` (optionally prefixed, what
:func:`respmotion.io.dicom.phase_from_description` parses), plus ``TemporalPositionIdentifier`` /
``TemporalPositionIndex`` (1-based phase rank) and ``NumberOfTemporalPositions``.  The series are
derived images (``ImageType`` DERIVED\\SECONDARY, ``DerivationDescription`` says synthesized).
:class:`DicomCycleWriter` writes them one phase at a time.

With a ``template`` (the folder of the input CT series):

* geometry: when the phase volumes have the template's geometry (the normal case: synthesis on
  the native grid), ImagePositionPatient, ImageOrientationPatient, PixelSpacing and SliceThickness
  strings are copied slice by slice from the template; otherwise they are computed from the
  volume's :class:`~respmotion.core.geometry.Geometry` (same patient coordinates, other grid;
  :mod:`respmotion.io.dicom_series` reads the template and makes these strings);
* StudyInstanceUID, FrameOfReferenceUID and the whitelisted patient/study attributes
  (:data:`~respmotion.io.dicom_series.COPIED_ATTRIBUTES`) are copied; nothing else from the input is written
  (no private tags, no institution, no device serials), and nothing is invented: an attribute the input
  lacks is written empty (DICOM type 2) or left out.

Without a template (NIfTI/MHA/phantom input) a fresh FrameOfReferenceUID is made and the patient
is ``ANONYMOUS``.  Each series is written into a hidden temporary folder inside ``out_dir`` and
renamed into place (``phase_00`` ... ``phase_90``) only when all phases are written; on any error
nothing is left behind.

Every input problem raises :class:`DicomExportError` (a ``ValueError``) whose one-line message
names the file or folder.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.geometry import Geometry
from ..core.types import Volume
from .dicom_series import (
    COPIED_ATTRIBUTES,
    CT_IMAGE_STORAGE,
    DicomExportError,
    SeriesRef,
    decimal_string,
    read_series_headers,
    required_attribute,
    series_geometry,
    slice_geometry_from_template,
    slice_geometry_from_volume,
    whitelisted,
)

#: DICOM type-2 attributes: written (empty when unknown) even if the input lacks them.
TYPE2_ATTRIBUTES: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID", "PositionReferenceIndicator",
)
ANONYMOUS = "ANONYMOUS"
RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0
TMP_DIR_PREFIX = ".tmp-dicom-"


def gated_series_description(description: str, phase_percent: float) -> str:
    """``("", 40) -> "Gated, 40%"``, ``("respmotion", 5) -> "respmotion, Gated, 05%"``, ``("", 12.5) ->
    "Gated, 12.5%"`` (TCIA 4D-Lung style, what :func:`respmotion.io.dicom.phase_from_description` reads)."""
    p = float(phase_percent)
    pct = f"{int(p):02d}" if p.is_integer() else f"{p:.1f}"
    return f"{description}, Gated, {pct}%" if description else f"Gated, {pct}%"


# ---------------------------------------------------------------------------- writing
def _hu_to_stored(array: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """HU -> int16 stored values (round((HU - intercept) / slope)), clipped; returns (stored, n_clipped).

    Integer HU (e.g. int16 volumes already rounded) take an exact integer path."""
    if np.issubdtype(np.asarray(array).dtype, np.integer) and float(RESCALE_SLOPE) == 1.0:
        wide = np.asarray(array, dtype=np.int32) - int(RESCALE_INTERCEPT)
        n_clipped = int(np.count_nonzero((wide < -32768) | (wide > 32767)))
        return np.clip(wide, -32768, 32767).astype(np.int16), n_clipped
    a = np.asarray(array, dtype=np.float32)  # exact for every HU value int16 storage can hold
    if not np.all(np.isfinite(a)):
        raise DicomExportError(f"{where}: volume holds NaN or infinite values")
    stored = np.round((a - RESCALE_INTERCEPT) / RESCALE_SLOPE)
    n_clipped = int(np.count_nonzero((stored < -32768) | (stored > 32767)))
    return np.clip(stored, -32768, 32767).astype(np.int16), n_clipped


def _now() -> tuple[str, str]:
    t = _dt.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


def new_instance(sop_class_uid: str, attributes: Mapping[str, Any]):
    """A new DICOM instance: file meta (explicit VR little endian), a fresh SOPInstanceUID, the SOP class,
    and ``attributes`` (patient/study/series values) copied in.  Shared by the CT series and RTSTRUCT writers."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    return ds


def _write_series(
    folder: Path, stored: np.ndarray, slices: list[dict[str, Any]], common: dict[str, Any],
    series_uid: str, series_number: int, description: str, temporal: tuple[int, int],
) -> list[str]:
    """Write one series (int16 stored values ``(z, y, x)``, one file per slice) into ``folder``;
    returns the SOPInstanceUIDs in slice order."""
    nz, ny, nx = stored.shape
    date, time = _now()
    uids = []
    for k in range(nz):
        ds = new_instance(CT_IMAGE_STORAGE, common)
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.TemporalPositionIdentifier = temporal[0]
        ds.TemporalPositionIndex = temporal[0]
        ds.NumberOfTemporalPositions = temporal[1]
        for key, value in slices[k].items():
            setattr(ds, key, value)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = decimal_string(RESCALE_INTERCEPT)
        ds.RescaleSlope = decimal_string(RESCALE_SLOPE)
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return uids


def _common_attributes(template: dict[str, Any] | None, frame_uid: str, study_uid: str) -> dict[str, Any]:
    """Patient, study, frame-of-reference, equipment and image-type attributes shared by every file."""
    date, time = _now()
    common: dict[str, Any] = {}
    if template is None:
        common.update(PatientName=ANONYMOUS, PatientID=ANONYMOUS, StudyDate=date, StudyTime=time,
                      PatientIdentityRemoved="YES")
    else:
        common.update(template)
    for key in TYPE2_ATTRIBUTES:
        common.setdefault(key, "")
    common.update(
        StudyInstanceUID=study_uid,
        FrameOfReferenceUID=frame_uid,
        Modality="CT",
        Manufacturer="respmotion",
        ImageType=["DERIVED", "SECONDARY", "AXIAL"],
        DerivationDescription="respiratory phase synthesized by respmotion",
        BurnedInAnnotation="NO",
        KVP="",
    )
    return common


class DicomCycleWriter:
    """Write the phases of one 4D-CT as CT series, one phase at a time (memory: one phase).

    Usage::

        with DicomCycleWriter(out_dir, geometry, [0, 10, ..., 90], template) as w:
            for p in phases:
                w.write(p, volume_p)          # HU (z, y, x) on ``geometry``
        result = w.result                     # as write_dicom_4dct returns

    Each series is written into a hidden temporary folder inside ``out_dir``; :meth:`finish`
    (called on leaving the ``with`` block without an error) renames them all to ``phase_XX``;
    on an error they are removed and nothing is left behind.  See :func:`write_dicom_4dct`.
    """

    def __init__(self, out_dir: str | os.PathLike, geometry: Geometry, phases: list[int],
                 template: str | os.PathLike | None = None, description: str = "", overwrite: bool = False) -> None:
        from pydicom.uid import generate_uid

        self.out_dir = out_dir = Path(out_dir)
        if not phases:
            raise DicomExportError(f"{out_dir}: no phases to write")
        self.order = sorted(int(p) for p in phases)
        for p in self.order:
            if not 0 <= p < 100:
                raise DicomExportError(f"{out_dir}: phase {p}% is not in 0..99")
        self.geometry, self.description = geometry, description
        self.targets = {p: out_dir / f"phase_{p:02d}" for p in self.order}
        existing = [t for t in self.targets.values() if t.exists()]
        if existing and not overwrite:
            raise DicomExportError(f"{existing[0]}: already exists (pass overwrite=True to replace)")
        template_attrs: dict[str, Any] | None = None
        study_uid = ""
        if template is not None:
            tfolder = Path(template)
            headers = read_series_headers(tfolder)
            tgeom, ordered = series_geometry(tfolder, headers)
            first = headers[ordered[0].path]
            frame_uid = required_attribute(first, "FrameOfReferenceUID", ordered[0].path)
            study_uid = str(first.get("StudyInstanceUID", ""))
            template_attrs = whitelisted(first)
            if tgeom.same_as(geometry, tol=1e-3):
                self.slices, self.geometry_from = slice_geometry_from_template(headers, ordered), "template"
            else:
                self.slices, self.geometry_from = slice_geometry_from_volume(geometry), "volume"
        else:
            frame_uid = generate_uid()
            self.slices, self.geometry_from = slice_geometry_from_volume(geometry), "none"
        # the phases join the input's study (a planning system shows them beside the planning CT)
        self.study_uid = study_uid or generate_uid()
        self.frame_uid = frame_uid
        self.common = _common_attributes(template_attrs, frame_uid, self.study_uid)
        self.clipped = 0
        self.refs: dict[int, SeriesRef] = {}
        self.tmp_dirs: dict[int, Path] = {}
        self.result: dict[str, Any] | None = None
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(TMP_DIR_PREFIX + "*"):  # left by an interrupted run
            shutil.rmtree(stale)

    def write(self, phase: int, volume: Volume) -> SeriesRef:
        """Write one phase (HU ``(z, y, x)`` on the writer's geometry) into its temporary folder."""
        from pydicom.uid import generate_uid

        p = int(phase)
        if p not in self.targets or p in self.refs:
            raise DicomExportError(f"{self.out_dir}: phase {p}% is not expected or already written")
        if not volume.geometry.same_as(self.geometry):
            raise DicomExportError(f"{self.out_dir}: phase {p}% has another geometry than the series")
        stored, clipped = _hu_to_stored(volume.array, f"{self.out_dir} phase {p}%")
        self.clipped += clipped
        rank = self.order.index(p)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_DIR_PREFIX}{p:02d}-", dir=self.out_dir))
        self.tmp_dirs[p] = tmp
        series_uid = generate_uid()
        uids = _write_series(tmp, stored, self.slices, self.common, series_uid, 1000 + rank,
                             gated_series_description(self.description, p), (rank + 1, len(self.order)))
        self.refs[p] = SeriesRef(self.geometry, self.study_uid, series_uid, self.frame_uid, uids,
                                 patient_study={k: self.common[k] for k in COPIED_ATTRIBUTES if k in self.common},
                                 folder=self.targets[p])
        return self.refs[p]

    def finish(self) -> dict[str, Any]:
        """Move every written series into place; the result of :func:`write_dicom_4dct`."""
        missing = [p for p in self.order if p not in self.refs]
        if missing:
            raise DicomExportError(f"{self.out_dir}: phase {missing[0]}% was not written")
        for p in self.order:
            if self.targets[p].exists():
                shutil.rmtree(self.targets[p])
            os.replace(self.tmp_dirs.pop(p), self.targets[p])
        self.result = {"study_uid": self.study_uid, "frame_of_reference_uid": self.frame_uid,
                       "geometry_from": self.geometry_from, "clipped_voxels": self.clipped, "series": self.refs}
        return self.result

    def abort(self) -> None:
        """Remove the temporary folders of the series written so far."""
        for tmp in self.tmp_dirs.values():
            if tmp.exists():
                shutil.rmtree(tmp)
        self.tmp_dirs.clear()

    def __enter__(self) -> "DicomCycleWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.finish()
        self.abort()


def write_dicom_4dct(
    phases: Mapping[int, Volume],
    out_dir: str | os.PathLike,
    template: str | os.PathLike | None = None,
    description: str = "",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write each phase volume (HU, ``(z, y, x)``) as a CT series ``out_dir/phase_XX/CT0001.dcm ...``.

    Args:
        phases: phase percent (0, 10, ..., 90) -> HU volume; all on one geometry.
        out_dir: output folder (created); the series go into ``phase_XX`` sub-folders.
        template: folder of the input CT series (join its study: StudyInstanceUID,
            FrameOfReferenceUID, the whitelisted patient/study attributes and its slice geometry),
            or None for a fresh anonymous study.
        description: prefix of SeriesDescription (``"<description>, Gated, 40%"``; empty:
            ``"Gated, 40%"``).
        overwrite: replace existing ``phase_XX`` folders (otherwise an existing one is an error).

    Returns:
        ``{"study_uid", "frame_of_reference_uid", "geometry_from": "template" | "volume" | "none",
        "clipped_voxels", "series": {phase: SeriesRef}}``.
    """
    out_dir = Path(out_dir)
    if not phases:
        raise DicomExportError(f"{out_dir}: no phases to write")
    order = sorted(int(p) for p in phases)
    with DicomCycleWriter(out_dir, phases[order[0]].geometry, order, template, description, overwrite) as w:
        for p in order:
            w.write(p, phases[p])
    return w.result
