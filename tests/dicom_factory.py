"""Write small synthetic CT DICOM series with pydicom (for tests; no network, no real data).

``write_ct_series`` stores an HU array ``(z, y, x)`` as one file per slice with the given
geometry, rescale slope/intercept and (by default) shuffled file names, so a reader that orders
by file name gets it wrong.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def gated_description(phase_percent: float, prefix: str = "P4^P100^S102^I0") -> str:
    """A TCIA 4D-Lung style SeriesDescription, e.g. ``P4^P100^S102^I0, Gated, 40.0%``."""
    return f"{prefix}, Gated, {phase_percent:.1f}%"


def write_ct_series(
    folder: str | Path,
    array_hu: np.ndarray,
    spacing_zyx: Sequence[float] = (3.0, 1.0, 1.0),
    origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
    series_description: str = "",
    rescale: tuple[float, float] = (1.0, -1024.0),
    shuffle: bool = True,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "100_TEST",
    study_date: str = "20240101",
    z_positions: Sequence[float] | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    private_phase: str | None = None,
    file_prefix: str = "IM",
    seed: int = 0,
) -> list[Path]:
    """Write ``array_hu`` (z, y, x) as a CT series; returns the paths in slice order (index 0 first).

    Stored value = round((HU - intercept) / slope) as int16 (PixelRepresentation 1).  Slice ``k``
    sits at ``origin + k * dz * normal`` unless ``z_positions`` (mm along the normal) is given.
    ``private_phase`` (e.g. ``"0.0%"``) writes the Elscint (01E1,xx1E) gating tag as in POPI.
    File names are a random permutation of slice numbers when ``shuffle`` is set.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array_hu, dtype=np.float64)
    nz, ny, nx = arr.shape
    slope, intercept = rescale
    stored = np.round((arr - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("HU values do not fit int16 with this rescale")
    stored = stored.astype(np.int16)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    dz = float(spacing_zyx[0])
    zs = [k * dz for k in range(nz)] if z_positions is None else [float(z) for z in z_positions]
    names = list(range(nz))
    if shuffle:
        random.Random(seed).shuffle(names)
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate = study_date
        ds.SeriesDescription = series_description
        ds.InstanceNumber = k + 1
        ipp = np.asarray(origin_xyz, dtype=float) + zs[k] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.PixelSpacing = [f"{spacing_zyx[1]:g}", f"{spacing_zyx[2]:g}"]
        ds.SliceThickness = f"{dz:g}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        if private_phase is not None:
            block = ds.private_block(0x01E1, "ELSCINT1", create=True)
            block.add_new(0x1E, "UN", private_phase.encode("latin-1"))
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{file_prefix}{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_study(
    root: str | Path,
    array_hu: np.ndarray,
    phases: Sequence[float] = tuple(range(0, 100, 10)),
    patient_id: str = "100_TEST",
    study_uid: str | None = None,
    spacing_zyx: Sequence[float] = (3.0, 1.0, 1.0),
    origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
    layout: str = "series",
) -> tuple[str, dict[float, list[Path]]]:
    """Write one gated 4D-CT study: phase ``p`` gets ``array_hu + p`` HU (so phases differ).

    ``layout="series"`` puts each series in ``root/<patient>/<study>/<series>/`` (the fetch
    layout); ``"flat"`` puts all phases in one folder ``root/<patient>/<study>/``.
    """
    study_uid = study_uid or generate_uid()
    frame = generate_uid()
    out: dict[float, list[Path]] = {}
    for i, p in enumerate(phases):
        series_uid = generate_uid()
        base = Path(root) / patient_id / study_uid
        folder = base / series_uid if layout == "series" else base
        out[p] = write_ct_series(
            folder, np.asarray(array_hu) + p, spacing_zyx, origin_xyz,
            series_description=gated_description(p), study_uid=study_uid, series_uid=series_uid,
            frame_of_reference_uid=frame, patient_id=patient_id, file_prefix=f"S{i:02d}_", seed=i,
        )
    return study_uid, out
