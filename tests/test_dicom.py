"""DICOM reader: ordering, HU, phase parsing and one-line errors on pydicom-made series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_factory import gated_description, write_ct_series

from respmotion.io.dicom import DicomError, phase_percent, read_dicom_series


def _vol(nz: int = 6, ny: int = 8, nx: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=(nz, ny, nx)).astype(np.float64)


def test_shuffled_files_and_rescale_give_source_hu(tmp_path):
    hu = _vol()
    # slope 2: HU must be even multiples relative to the intercept to be representable exactly
    hu = np.round(hu / 2) * 2
    paths = write_ct_series(tmp_path, hu, (2.5, 0.7, 0.8), (-10.0, 5.0, 100.0), rescale=(2.0, -1000.0), shuffle=True)
    assert sorted(paths) != paths  # file names are not in slice order
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, hu.astype(np.float32))
    assert vol.array.dtype == np.float32
    g = vol.geometry
    assert g.shape == hu.shape
    np.testing.assert_allclose(g.spacing, (2.5, 0.7, 0.8))
    np.testing.assert_allclose(g.origin, (-10.0, 5.0, 100.0))
    # index -> world of the last slice matches its ImagePositionPatient
    np.testing.assert_allclose(g.index_to_world([5, 0, 0]), (-10.0, 5.0, 100.0 + 5 * 2.5), atol=1e-4)


def test_descending_positions_are_sorted_along_normal(tmp_path):
    hu = _vol(seed=1)
    zs = [50.0 - 3.0 * k for k in range(hu.shape[0])]  # slice k written at decreasing z
    write_ct_series(tmp_path, hu, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), z_positions=zs)
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, hu[::-1].astype(np.float32))  # index 0 = most inferior
    np.testing.assert_allclose(vol.geometry.origin, (0.0, 0.0, zs[-1]))


def test_phase_from_description_and_private_tag(tmp_path):
    write_ct_series(tmp_path / "a", _vol(nz=2), series_description=gated_description(40))
    write_ct_series(tmp_path / "b", _vol(nz=2), series_description="", private_phase="0.0%")
    write_ct_series(tmp_path / "c", _vol(nz=2), series_description="chest w/o contrast")
    read = lambda d: pydicom.dcmread(next((tmp_path / d).iterdir()), stop_before_pixels=True)  # noqa: E731
    assert phase_percent(read("a")) == 40.0
    assert phase_percent(read("b")) == 0.0
    assert phase_percent(read("c")) is None


def test_two_phases_in_one_folder(tmp_path):
    hu = _vol()
    write_ct_series(tmp_path, hu, series_description=gated_description(0), file_prefix="A", seed=1)
    write_ct_series(tmp_path, hu + 7, series_description=gated_description(50), file_prefix="B", seed=2)
    with pytest.raises(DicomError, match="holds 2 series") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    v50 = read_dicom_series(tmp_path, phase=50)
    np.testing.assert_array_equal(v50.array, (hu + 7).astype(np.float32))
    assert v50.meta["phase_percent"] == 50.0


def test_corrupt_file_is_named(tmp_path):
    write_ct_series(tmp_path, _vol())
    bad = tmp_path / "IM9999.dcm"
    bad.write_bytes(b"this is not dicom at all" * 10)
    with pytest.raises(DicomError) as err:
        read_dicom_series(tmp_path)
    assert str(bad) in str(err.value) and "not a readable DICOM file" in str(err.value)


def test_truncated_pixel_data_is_named(tmp_path):
    paths = write_ct_series(tmp_path, _vol())
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-50])
    with pytest.raises(DicomError) as err:
        read_dicom_series(tmp_path)
    assert str(paths[2]) in str(err.value)


def test_mixed_slice_spacing(tmp_path):
    zs = [0.0, 3.0, 6.0, 9.0, 14.0, 17.0]  # one 5 mm gap (a missing slice or mixed series)
    write_ct_series(tmp_path, _vol(), z_positions=zs)
    with pytest.raises(DicomError, match="non-uniform slice spacing") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_duplicate_position(tmp_path):
    write_ct_series(tmp_path, _vol(nz=4), z_positions=[0.0, 3.0, 3.0, 6.0])
    with pytest.raises(DicomError, match="same position"):
        read_dicom_series(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(DicomError, match="no DICOM files") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_pydicom_sample_single_slice(shared_data):
    folder = shared_data / "pydicom-ct-samples"
    # CT_small alone: a one-slice volume with HU = raw - 1024
    vol = read_dicom_series(folder, series_uid=pydicom.dcmread(folder / "CT_small.dcm").SeriesInstanceUID)
    assert vol.array.shape[0] == 1
    raw = pydicom.dcmread(folder / "CT_small.dcm").pixel_array.astype(np.float32)
    np.testing.assert_array_equal(vol.array[0], raw - 1024)


def test_pydicom_mini_series_gaps(shared_data):
    with pytest.raises(DicomError, match="non-uniform slice spacing"):
        read_dicom_series(shared_data / "pydicom-ct-samples" / "CT2_mini_series")
