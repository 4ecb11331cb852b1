"""DICOM 4D-CT export: geometry, UIDs, phase descriptions, HU, read back by our reader, SimpleITK and prepare."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import write_ct_series

from respmotion.core.geometry import Geometry
from respmotion.core.types import Volume
from respmotion.data.prepare import _scan_folder, group_studies
from respmotion.io.dicom import list_dicom_files, phase_from_description, read_dicom_series
from respmotion.io.dicom_export import write_dicom_4dct
from respmotion.io.dicom_series import DicomExportError, SeriesRef
from respmotion.io.layout import PHASES
from respmotion.io.volumes import from_sitk

SPACING = (2.5, 0.7, 0.8)
ORIGIN = (-10.0, 5.0, 100.0)
FRAME = "1.2.826.0.1.3680043.8.498.111"


def _headers(folder):
    hs = [pydicom.dcmread(p, stop_before_pixels=True) for p in list_dicom_files(folder)]
    return sorted(hs, key=lambda d: float(d.ImagePositionPatient[2]))


@pytest.fixture()
def template(tmp_path):
    """A pydicom-made input series (6 x 12 x 10) with patient data and attributes that must not be copied."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1200, size=(6, 12, 10)).astype(np.float64)
    folder = tmp_path / "input"
    write_ct_series(folder, hu, SPACING, ORIGIN, series_description="input CT", frame_of_reference_uid=FRAME,
                    patient_id="100_HM10395", study_date="20200102")
    for p in list_dicom_files(folder):
        ds = pydicom.dcmread(p)
        ds.PatientName = "DOE^JANE"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.AccessionNumber = "A123"
        ds.InstitutionName = "Secret Hospital"  # not whitelisted: must not be written
        ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", "private")
        ds.save_as(p)
    return folder


def _phases(vol: Volume) -> dict[int, Volume]:
    rng = np.random.default_rng(1)
    return {p: Volume(vol.array + p + rng.uniform(-0.4, 0.4, vol.array.shape).astype(np.float32), vol.geometry)
            for p in PHASES}


def test_4dct_from_dicom_template(template, tmp_path):
    vol = read_dicom_series(template)
    phases = _phases(vol)
    out = tmp_path / "out"
    res = write_dicom_4dct(phases, out, template=template, description="P4^P100^S102^I0")
    assert res["geometry_from"] == "template" and res["frame_of_reference_uid"] == FRAME
    tmpl = _headers(template)
    series_uids, study_uids, sop_uids = set(), set(), set()
    for p in PHASES:
        folder = out / f"phase_{p:02d}"
        hs = _headers(folder)
        assert len(hs) == len(tmpl)
        for h, t in zip(hs, tmpl):
            assert list(h.ImagePositionPatient) == list(t.ImagePositionPatient)
            assert list(h.ImageOrientationPatient) == list(t.ImageOrientationPatient)
            assert list(h.PixelSpacing) == list(t.PixelSpacing)
            assert float(h.SliceThickness) == float(t.SliceThickness)
            assert h.FrameOfReferenceUID == FRAME
            assert h.SOPClassUID == pydicom.uid.CTImageStorage == h.file_meta.MediaStorageSOPClassUID
            assert h.SeriesDescription == f"P4^P100^S102^I0, Gated, {p:02d}%"
            assert phase_from_description(h.SeriesDescription) == p
            patient = (h.PatientName, h.PatientID, h.PatientBirthDate, h.PatientSex)
            assert patient == ("DOE^JANE", "100_HM10395", "19500101", "F")
            assert (h.StudyDate, h.AccessionNumber) == ("20200102", "A123")
            assert "InstitutionName" not in h and not any(e.tag.is_private for e in h)
            assert h.BitsAllocated == 16 and h.PixelRepresentation == 1 and h.RescaleType == "HU"
            assert h.TemporalPositionIndex == PHASES.index(p) + 1 and h.NumberOfTemporalPositions == 10
            sop_uids.add(h.SOPInstanceUID)
        series_uids.add(hs[0].SeriesInstanceUID)
        study_uids.update(h.StudyInstanceUID for h in hs)
        assert res["series"][p].series_uid == hs[0].SeriesInstanceUID
        # our reader: same geometry, HU within rescale rounding
        back = read_dicom_series(folder)
        assert back.geometry.same_as(vol.geometry)
        np.testing.assert_allclose(back.array, phases[p].array, atol=0.5 + 1e-4)
        assert back.meta["phase_percent"] == p
        # SimpleITK reads it back identically
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        arr, geom = from_sitk(reader.Execute())
        np.testing.assert_array_equal(arr.astype(np.float32), back.array)
        assert geom.same_as(back.geometry)
    assert len(series_uids) == 10 and tmpl[0].SeriesInstanceUID not in series_uids
    # the phases join the input's study (same StudyInstanceUID and FrameOfReferenceUID)
    assert tmpl[0].StudyInstanceUID and study_uids == {res["study_uid"]} == {tmpl[0].StudyInstanceUID}
    assert len(sop_uids) == 10 * len(tmpl) and not sop_uids & {t.SOPInstanceUID for t in tmpl}
    # the data-prepare phase parser sees one complete 10-phase study
    studies, orphans = group_studies([_scan_folder(out / f"phase_{p:02d}") for p in PHASES])
    assert not orphans and len(studies) == 1
    assert studies[0].problems == [] and sorted(studies[0].series) == list(PHASES)
    assert not list(out.glob(".tmp-*"))
    # the SeriesRef read from the written folder matches the returned one
    ref = SeriesRef.from_folder(out / "phase_40")
    assert ref.sop_instance_uids == res["series"][40].sop_instance_uids
    assert ref.frame_of_reference_uid == FRAME and ref.patient_study["PatientID"] == "100_HM10395"


def test_4dct_without_template_is_anonymous_and_reads_back(tmp_path):
    g = Geometry((4, 8, 9), (3.0, 1.5, 1.25), (1.0, -2.0, 30.0))
    arr = np.linspace(-1000, 400, 4 * 8 * 9, dtype=np.float32).reshape(4, 8, 9)
    res = write_dicom_4dct({0: Volume(arr, g), 50: Volume(arr + 7, g)}, tmp_path / "o")
    assert res["geometry_from"] == "none"
    h = _headers(tmp_path / "o" / "phase_50")[0]
    assert h.SeriesDescription == "Gated, 50%" and h.StudyInstanceUID == res["study_uid"]
    assert h.PatientName == "ANONYMOUS" and h.PatientID == "ANONYMOUS" and h.PatientBirthDate == ""
    assert h.FrameOfReferenceUID == res["frame_of_reference_uid"]
    back = read_dicom_series(tmp_path / "o" / "phase_50")
    assert back.geometry.same_as(g)
    np.testing.assert_allclose(back.array, arr + 7, atol=0.5)


def test_resampled_phases_keep_frame_but_own_geometry(template, tmp_path):
    vol = read_dicom_series(template)
    g = vol.geometry.resized((3, 6, 5))
    res = write_dicom_4dct({0: Volume(np.zeros(g.shape, np.float32), g)}, tmp_path / "o", template=template)
    assert res["geometry_from"] == "volume" and res["frame_of_reference_uid"] == FRAME
    assert read_dicom_series(tmp_path / "o" / "phase_00").geometry.same_as(g)


def test_bad_inputs_leave_nothing(template, tmp_path):
    vol = read_dicom_series(template)
    other = Volume(np.zeros((3, 6, 5), np.float32), vol.geometry.resized((3, 6, 5)))
    out = tmp_path / "o"
    with pytest.raises(DicomExportError, match="phase 50% has another geometry"):
        write_dicom_4dct({0: vol, 50: other}, out, template=template)
    assert not out.exists() or not any(out.iterdir())
    write_dicom_4dct({0: vol}, out, template=template)
    with pytest.raises(DicomExportError, match=r"phase_00: already exists"):
        write_dicom_4dct({0: vol}, out, template=template)
    nan = Volume(np.full(vol.array.shape, np.nan, np.float32), vol.geometry)
    with pytest.raises(DicomExportError, match="NaN"):
        write_dicom_4dct({10: nan}, out, template=template)
    assert sorted(x.name for x in out.iterdir()) == ["phase_00"]
    with pytest.raises(DicomExportError, match="not a folder"):
        write_dicom_4dct({20: vol}, out, template=tmp_path / "missing")
