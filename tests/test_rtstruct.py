"""RTSTRUCT: mask -> RTSTRUCT -> mask round trip on a pydicom-made CT, holes, and bad references."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_factory import write_ct_series

from respmotion.io.dicom import read_dicom_series
from respmotion.io.rtstruct import RTStructError, mask_contours, read_rtstruct, write_rtstruct
from respmotion.io.dicom_series import SeriesRef

SHAPE = (12, 40, 36)
SPACING = (2.5, 0.9, 1.1)
ORIGIN = (-20.0, 13.0, -40.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture()
def ct(tmp_path):
    folder = tmp_path / "ct"
    write_ct_series(folder, np.zeros(SHAPE), SPACING, ORIGIN, frame_of_reference_uid="1.2.3.4.5", patient_id="P1")
    return folder


def _sphere(ref: SeriesRef, centre_xyz, radius: float) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ref.geometry.shape], indexing="ij"), -1)
    d = np.linalg.norm(ref.geometry.index_to_world(idx.astype(float)) - np.asarray(centre_xyz), axis=-1)
    return (d <= radius).astype(np.uint8)


def test_sphere_and_ring_round_trip(ct, tmp_path):
    ref = SeriesRef.from_folder(ct)
    sphere = _sphere(ref, (-20.0 + 17.3, 13.0 + 16.1, -40.0 + 13.4), 9.0)
    ring = np.zeros(SHAPE, np.uint8)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    r = np.hypot(yy - 20, xx - 18)
    ring[3:6][:, (r <= 12) & (r >= 5)] = 1  # a hole on every slice: two closed lines per slice
    path = write_rtstruct({"GTV": sphere, "ring": ring}, ref, tmp_path / "rs.dcm", interpreted_types={"GTV": "GTV"})
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == ref.study_uid and ds.PatientID == "P1"
    used = {c.ContourImageSequence[0].ReferencedSOPInstanceUID
            for rc in ds.ROIContourSequence for c in rc.ContourSequence}
    assert used <= set(ref.sop_instance_uids)
    masks = read_rtstruct(path, ref)
    assert set(masks) == {"GTV", "ring"}
    assert masks["GTV"].dtype == np.uint8 and masks["GTV"].shape == SHAPE
    assert _dice(masks["GTV"], sphere) > 0.9
    np.testing.assert_array_equal(masks["ring"], ring)  # holes survive (even-odd fill)
    assert len([k for k, _ in mask_contours(ring) if k == 4]) == 2
    # a Volume read by our DICOM reader works as the reference too (its series UID is checked)
    vol = read_dicom_series(ct)
    np.testing.assert_array_equal(read_rtstruct(path, vol, names=["GTV"])["GTV"], masks["GTV"])
    with pytest.raises(RTStructError, match=r"rs\.dcm: no closed contours for ROI\(s\) PTV"):
        read_rtstruct(path, ref, names=["PTV"])


def test_rtstruct_of_another_series_is_refused(ct, tmp_path):
    other = tmp_path / "other"
    write_ct_series(other, np.zeros(SHAPE), SPACING, ORIGIN, frame_of_reference_uid="1.2.3.4.5")
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:7, 10:20, 10:20] = 1
    path = write_rtstruct({"GTV": mask}, SeriesRef.from_folder(other), tmp_path / "rs_other.dcm")
    with pytest.raises(RTStructError) as err:
        read_rtstruct(path, SeriesRef.from_folder(ct))
    msg = str(err.value)
    assert str(path) in msg and "references series" in msg and "\n" not in msg
    # same series UID but another frame of reference
    ref = SeriesRef.from_folder(ct)
    ref.frame_of_reference_uid = "9.9.9"
    p2 = write_rtstruct({"GTV": mask}, ref, tmp_path / "rs_frame.dcm")
    msg = r"rs_frame\.dcm: RTSTRUCT frame of reference 9\.9\.9 is not the CT's 1\.2\.3\.4\.5"
    with pytest.raises(RTStructError, match=msg):
        read_rtstruct(p2, SeriesRef.from_folder(ct))
    with pytest.raises(RTStructError, match=r"ct.*not an RTSTRUCT|not an RTSTRUCT"):
        read_rtstruct(sorted(ct.iterdir())[0], ref)


def test_rtstruct_on_written_4dct_phase(tmp_path):
    """The SeriesRef returned by write_dicom_4dct is enough to write an RTSTRUCT per phase."""
    from respmotion.core.geometry import Geometry
    from respmotion.core.types import Volume
    from respmotion.io.dicom_export import write_dicom_4dct

    g = Geometry((6, 20, 18), (2.0, 1.0, 1.0), (5.0, -3.0, 40.0))
    vol = Volume(np.full(g.shape, -800.0, np.float32), g)
    res = write_dicom_4dct({0: vol, 50: vol}, tmp_path / "4d")
    mask = np.zeros(g.shape, np.uint8)
    mask[2:4, 5:12, 6:10] = 1
    path = write_rtstruct({"GTV": mask}, res["series"][50], tmp_path / "4d" / "rtstruct_50.dcm")
    back = read_rtstruct(path, SeriesRef.from_folder(tmp_path / "4d" / "phase_50"))
    np.testing.assert_array_equal(back["GTV"], mask)
    assert pydicom.dcmread(path).PatientName == "ANONYMOUS"
    with pytest.raises(RTStructError, match="references series"):
        read_rtstruct(path, SeriesRef.from_folder(tmp_path / "4d" / "phase_00"))
