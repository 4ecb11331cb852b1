"""import_ct: a user's CT from a DICOM folder or file, NIfTI or MHA, optionally resampled."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import gated_description, write_ct_series

from respmotion.core.geometry import Geometry
from respmotion.core.types import Volume
from respmotion.data.importer import import_ct
from respmotion.io.volumes import save_volume


def _volume() -> Volume:
    rng = np.random.default_rng(3)
    arr = rng.normal(-300, 200, size=(6, 12, 10)).astype(np.float32)
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # axes swapped and flipped: geometry must survive
    return Volume(arr, Geometry(arr.shape, (2.5, 0.8, 0.9), (10.0, -20.0, 30.0), direction))


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.mha"])
def test_nifti_and_mha_keep_values_and_geometry(tmp_path, name):
    vol = _volume()
    save_volume(vol, tmp_path / name)
    got = import_ct(tmp_path / name)
    np.testing.assert_allclose(got.array, vol.array, atol=1e-4)
    assert got.array.dtype == np.float32
    assert got.geometry.same_as(vol.geometry)
    res = import_ct(tmp_path / name, shape=(3, 6, 5))
    assert res.geometry.same_as(vol.geometry.resized((3, 6, 5)))
    assert res.meta["original_geometry"] == got.geometry.to_dict()


def test_dicom_file_stands_for_its_series(tmp_path):
    hu = np.arange(4 * 6 * 5, dtype=np.float64).reshape(4, 6, 5) - 100
    a = write_ct_series(tmp_path, hu, series_description=gated_description(0), file_prefix="A")
    write_ct_series(tmp_path, hu + 5, series_description=gated_description(50), file_prefix="B")
    got = import_ct(a[1])
    np.testing.assert_array_equal(got.array, hu.astype(np.float32))
    assert import_ct(tmp_path, phase=50).array[0, 0, 0] == hu[0, 0, 0] + 5
    save_volume(got, tmp_path / "x.mha")
    with pytest.raises(ValueError, match="series/phase selection applies only to DICOM"):
        import_ct(tmp_path / "x.mha", phase=0)


def test_bad_shape(tmp_path):
    save_volume(_volume(), tmp_path / "ct.mha")
    with pytest.raises(ValueError, match="shape must be 3 positive numbers"):
        import_ct(tmp_path / "ct.mha", shape=(0, 4, 4))
