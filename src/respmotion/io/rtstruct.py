"""Read and write DICOM RT Structure Sets (RTSTRUCT) with pydicom alone.

* Reading (:func:`read_rtstruct`): every ``CLOSED_PLANAR`` contour (LPS mm) is mapped with the
  reference CT's :class:`~respmotion.core.geometry.Geometry` into continuous array indices; it
  must lie on a slice of that grid (within :data:`PLANE_TOL` of a slice, so read the structure on
  the CT's native grid and resample the mask afterwards).  Its polygon is filled on that slice:
  a voxel is inside when its **centre** is inside the polygon (matplotlib's ``Path``).  Several
  contours on one slice combine by even-odd (XOR), the usual way holes are encoded.  The
  RTSTRUCT must reference the CT: its referenced SeriesInstanceUID(s) must include the CT's and
  its FrameOfReferenceUID must equal the CT's, otherwise a one-line error names the file.
* Writing (:func:`write_rtstruct`): per slice, the iso-line at 0.5 of the 0/1 mask (zero-padded,
  so every line is closed) is traced with ``contourpy`` -- the contour generator of matplotlib
  (a hard dependency of matplotlib, which we already require), tested and fast, with linear
  interpolation between voxel centres, and without scikit-image or OpenCV.  The 0.5 iso-line
  passes half-way between inside and outside voxel centres, so filling it again by voxel
  centres gives the mask back (up to diagonal one-voxel saddles).  Holes come out as separate
  closed lines, which the reader's even-odd rule turns back into holes.

Every problem raises :class:`RTStructError` (a ``ValueError``) whose one-line message names the file.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.geometry import Geometry
from ..core.types import Volume
from .atomic import atomic_path
from .dicom_export import new_instance
from .dicom_series import SeriesRef

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # conventional ReferencedSOPClassUID of the study
#: a contour may sit at most this far (in slices) from a slice of the reference grid.
PLANE_TOL = 0.25
DEFAULT_COLORS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (255, 0, 255), (0, 200, 200))


class RTStructError(ValueError):
    """An RTSTRUCT problem; the message names the file."""


# ---------------------------------------------------------------------------- reading
def _referenced_uids(ds) -> tuple[set[str], set[str]]:
    """(FrameOfReferenceUIDs, SeriesInstanceUIDs) the structure set references."""
    frames, series = set(), set()
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        if "FrameOfReferenceUID" in fr:
            frames.add(str(fr.FrameOfReferenceUID))
        for st in fr.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in se:
                    series.add(str(se.SeriesInstanceUID))
    for roi in ds.get("StructureSetROISequence", []):
        if "ReferencedFrameOfReferenceUID" in roi:
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    return frames, series


def _check_reference(path: Path, ds, reference: SeriesRef | Volume) -> Geometry:
    """Check the RTSTRUCT references ``reference``; return the reference geometry."""
    if isinstance(reference, SeriesRef):
        geometry, series_uid, frame_uid = reference.geometry, reference.series_uid, reference.frame_of_reference_uid
    elif isinstance(reference, Volume):
        geometry = reference.geometry
        series_uid = reference.meta.get("series_uid")
        frame_uid = reference.meta.get("frame_of_reference_uid")
        if not series_uid and not frame_uid:
            raise RTStructError(
                f"{path}: the reference volume carries no series or frame-of-reference UID to check against")
    else:
        raise TypeError(f"reference must be a SeriesRef or a Volume, got {type(reference).__name__}")
    frames, series = _referenced_uids(ds)
    if series_uid and series and series_uid not in series:
        raise RTStructError(
            f"{path}: RTSTRUCT references series {', '.join(sorted(series))}, not the CT series {series_uid}")
    if frame_uid and frames and frame_uid not in frames:
        raise RTStructError(
            f"{path}: RTSTRUCT frame of reference {', '.join(sorted(frames))} is not the CT's {frame_uid}")
    if not series and not frames:
        raise RTStructError(f"{path}: RTSTRUCT references no series and no frame of reference")
    return geometry


def _fill_polygon(shape_yx: tuple[int, int], poly_yx: np.ndarray) -> np.ndarray:
    """Bool ``(ny, nx)``: voxels whose centre is inside the polygon ``(N, 2)`` given in (y, x) indices."""
    from matplotlib.path import Path as MplPath

    out = np.zeros(shape_yx, dtype=bool)
    lo = np.maximum(np.floor(poly_yx.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(poly_yx.max(0)).astype(int) + 1, shape_yx)
    if np.any(hi <= lo):
        return out
    yy, xx = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]]
    inside = MplPath(poly_yx[:, ::-1]).contains_points(np.stack([xx.ravel(), yy.ravel()], 1))
    out[lo[0]:hi[0], lo[1]:hi[1]] = inside.reshape(yy.shape)
    return out


def _roi_number(path: Path, item, keyword: str, where: str) -> int:
    """The integer ``keyword`` (``ROINumber``, ``ReferencedROINumber``) of a sequence item; an
    :class:`RTStructError` naming the file and ``where`` when it is missing or not a number."""
    value = item.get(keyword)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RTStructError(f"{path}: {where} has no valid {keyword} ({str(value or '')!r}; the file is cut short "
                            f"or damaged)") from None


def _roi_names(path: Path, ds) -> dict[int, str]:
    names: dict[int, str] = {}
    for j, roi in enumerate(ds.get("StructureSetROISequence", [])):
        number = _roi_number(path, roi, "ROINumber", f"StructureSetROISequence item {j + 1}")
        name = str(roi.get("ROIName", "")).strip() or f"ROI {number}"
        base, n = name, 2
        while name in names.values():  # duplicate names get a suffix
            name, n = f"{base} ({n})", n + 1
        names[number] = name
    return names


def read_rtstruct(
    path: str | os.PathLike, reference: SeriesRef | Volume, names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Masks ``{ROIName: uint8 (z, y, x)}`` on the reference CT's grid from an RTSTRUCT file.

    ``reference`` is the CT the structure set was drawn on: a :class:`SeriesRef`
    (``SeriesRef.from_folder(ct_folder)``) or a :class:`Volume` read by
    :func:`respmotion.io.dicom.read_dicom_series` (its ``meta["series_uid"]`` is checked).
    ROIs without closed planar contours (points, empty ROIs) are left out; ``names`` selects
    ROIs, and a requested name that is missing is an error listing those present.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
        for _ in ds.iterall():  # parse every element now (pydicom defers it): a file cut short fails here
            pass
    except Exception as exc:  # pydicom raises many types; re-raised typed with the file name
        raise RTStructError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(ds.get("Modality", "")) != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise RTStructError(f"{path}: not an RTSTRUCT (Modality {ds.get('Modality', '?')})")
    geom = _check_reference(path, ds, reference)
    roi_names = _roi_names(path, ds)
    masks: dict[str, np.ndarray] = {}
    for j, rc in enumerate(ds.get("ROIContourSequence", [])):
        number = _roi_number(path, rc, "ReferencedROINumber", f"ROIContourSequence item {j + 1}")
        name = roi_names.get(number, f"ROI {number}")
        if names is not None and name not in names:
            continue
        mask = np.zeros(geom.shape, dtype=bool)
        found = False
        for i, c in enumerate(rc.get("ContourSequence", [])):
            if str(c.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue
            if c.get("ContourData") is None:
                raise RTStructError(f"{path}: ROI '{name}' contour {i + 1} has no ContourData (the file is cut short "
                                    f"or damaged)")
            pts = np.asarray([float(v) for v in c.ContourData], dtype=np.float64)
            if not np.isfinite(pts).all():
                raise RTStructError(f"{path}: ROI '{name}' contour {i + 1} has coordinates that are NaN or infinite")
            if pts.size < 9 or pts.size % 3:
                raise RTStructError(
                    f"{path}: ROI '{name}' contour {i + 1} has {pts.size} coordinates (need 3 per point, >= 3 points)")
            idx = geom.world_to_index(pts.reshape(-1, 3))  # (N, 3) z, y, x
            k = float(np.median(idx[:, 0]))
            kk = int(round(k))
            if np.max(np.abs(idx[:, 0] - kk)) > PLANE_TOL:
                raise RTStructError(
                    f"{path}: ROI '{name}' contour {i + 1} does not lie on a slice of the CT grid "
                    f"(slice index {k:.2f})")
            if not 0 <= kk < geom.shape[0]:
                raise RTStructError(f"{path}: ROI '{name}' contour {i + 1} lies outside the CT (slice index {kk})")
            mask[kk] ^= _fill_polygon(geom.shape[1:], idx[:, 1:])
            found = True
        if found:
            masks[name] = mask.astype(np.uint8)
    if names is not None:
        missing = [n for n in names if n not in masks]
        if missing:
            raise RTStructError(f"{path}: no closed contours for ROI(s) {', '.join(missing)} "
                                f"(present: {', '.join(roi_names.values())})")
    return masks


# ---------------------------------------------------------------------------- writing
def mask_contours(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Closed contours of a binary ``(z, y, x)`` mask: ``[(slice k, points (N, 2) in (y, x) indices)]``.

    The 0.5 iso-line of the zero-padded slice, traced by contourpy; the closing point is dropped.
    """
    import contourpy

    out = []
    m = np.asarray(mask) != 0
    for k in np.nonzero(m.any(axis=(1, 2)))[0]:
        sl = np.pad(m[k].astype(np.float64), 1)
        gen = contourpy.contour_generator(z=sl, name="serial", line_type=contourpy.LineType.Separate)
        for line in gen.lines(0.5):  # (N, 2) in (x, y) of the padded slice
            pts = np.asarray(line, dtype=np.float64)[:, ::-1] - 1.0
            if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
                pts = pts[:-1]
            if len(pts) >= 3:
                out.append((int(k), pts))
    return out


def _ds(value: float) -> str:
    s = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _contour_image_item(ref: SeriesRef, k: int):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uids[k]
    return item


Contours = Sequence[tuple[int, np.ndarray]]  # [(slice k, points (N, 2) in (y, x) indices)] (mask_contours)


def write_rtstruct(
    masks: Mapping[str, np.ndarray],
    reference: SeriesRef,
    path: str | os.PathLike,
    label: str = "respmotion",
    description: str = "",
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    interpreted_types: Mapping[str, str] | None = None,
) -> Path:
    """Write ``masks`` (name -> binary ``(z, y, x)`` on ``reference.geometry``) as an RTSTRUCT at ``path``.

    The structure set joins the reference CT's study (StudyInstanceUID, patient/study attributes
    copied from ``reference.patient_study``), references its series, frame of reference and, per
    contour, the slice's SOPInstanceUID.  ``interpreted_types`` sets RTROIInterpretedType (e.g.
    ``{"GTV": "GTV", "ITV": "CTV"}``; empty by default).  Written atomically.
    """
    geom = reference.geometry
    for name, m in masks.items():
        if tuple(np.shape(m)) != geom.shape:
            raise RTStructError(f"{path}: mask '{name}' has shape {np.shape(m)}, the CT {geom.shape}")
    return write_rtstruct_contours({name: mask_contours(m) for name, m in masks.items()}, reference, path, label,
                                   description, colors, interpreted_types)


def write_rtstruct_contours(
    contours: Mapping[str, Contours],
    reference: SeriesRef,
    path: str | os.PathLike,
    label: str = "respmotion",
    description: str = "",
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    interpreted_types: Mapping[str, str] | None = None,
) -> Path:
    """:func:`write_rtstruct` from contours already traced by :func:`mask_contours` (name -> ``[(k,
    points (N, 2) (y, x) indices)]`` on ``reference.geometry``): a caller that streams phases keeps
    these few polygons instead of full-size masks."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence
    from pydicom.uid import generate_uid

    path = Path(path)
    geom = reference.geometry
    if len(reference.sop_instance_uids) != geom.shape[0]:
        raise RTStructError(
            f"{path}: reference has {len(reference.sop_instance_uids)} slice UIDs for {geom.shape[0]} slices")
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = new_instance(RT_STRUCTURE_SET_STORAGE, {k: v for k, v in reference.patient_study.items()
                                                 if k not in ("PatientPosition", "PositionReferenceIndicator")})
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if key not in ds:
            setattr(ds, key, "")
    ds.Modality = "RTSTRUCT"
    ds.Manufacturer = "respmotion"
    ds.StudyInstanceUID = reference.study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 2000
    ds.SeriesDescription = description or label
    ds.InstanceNumber = 1
    ds.OperatorsName = ""
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"

    series_item = Dataset()
    series_item.SeriesInstanceUID = reference.series_uid
    series_item.ContourImageSequence = DSequence([_contour_image_item(reference, k) for k in range(geom.shape[0])])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = reference.study_uid
    study_item.RTReferencedSeriesSequence = DSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = reference.frame_of_reference_uid
    frame_item.RTReferencedStudySequence = DSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DSequence([frame_item])

    rois, roi_contours, observations = [], [], []
    for i, (name, lines) in enumerate(contours.items()):
        number = i + 1
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = reference.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        rc = Dataset()
        color = (colors or {}).get(name, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
        rc.ROIDisplayColor = [int(c) for c in color]
        rc.ReferencedROINumber = number
        items = []
        for k, pts in lines:
            if not 0 <= k < geom.shape[0]:
                raise RTStructError(f"{path}: structure '{name}' has a contour on slice {k} of {geom.shape[0]}")
            idx = np.concatenate([np.full((len(pts), 1), float(k)), pts], axis=1)
            world = geom.index_to_world(idx)
            c = Dataset()
            c.ContourImageSequence = DSequence([_contour_image_item(reference, k)])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(world)
            c.ContourData = [_ds(v) for v in world.ravel()]
            items.append(c)
        rc.ContourSequence = DSequence(items)
        roi_contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = (interpreted_types or {}).get(name, "")
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DSequence(rois)
    ds.ROIContourSequence = DSequence(roi_contours)
    ds.RTROIObservationsSequence = DSequence(observations)
    with atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


__all__ = ["RTStructError", "SeriesRef", "mask_contours", "read_rtstruct", "write_rtstruct", "write_rtstruct_contours"]
