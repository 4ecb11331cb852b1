"""data prepare: pydicom-made gated studies -> resampled HU phases in the layout; bad studies skipped whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_factory import gated_description, write_ct_series, write_study

from respmotion.cli import main
from respmotion.core.ops import resample_volume
from respmotion.data.prepare import TMP_STUDY_PREFIX, PrepareConfig, prepare, safe_name
from respmotion.io.dicom import read_dicom_series
from respmotion.io.layout import PHASES, StudyDir, iter_studies

SHAPE = (4, 8, 8)


def _hu(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1000, size=(6, 16, 16)).astype(np.float64)


def _cfg(src, out, **kw) -> PrepareConfig:
    return PrepareConfig(src=str(src), out=str(out), shape=SHAPE, workers=kw.pop("workers", 1), **kw)


def test_prepares_a_study_with_geometry_and_metadata(tmp_path):
    src, out = tmp_path / "dicom", tmp_path / "prep"
    hu = _hu()
    uid, files = write_study(src, hu, patient_id="100_TEST", spacing_zyx=(3.0, 1.5, 1.5), origin_xyz=(-12, -12, 40))
    rep = prepare(_cfg(src, out), progress=False)
    assert rep.prepared == [f"100_TEST/{safe_name(uid)}"] and not rep.skipped
    (sd,) = list(iter_studies(out))
    info = sd.info()
    assert info["phases"] == list(PHASES) and info["study_uid"] == uid
    for p in (0, 40):
        vol = sd.load_phase(p)
        src_vol = read_dicom_series(files[p][0].parent)
        np.testing.assert_array_equal(src_vol.array, (hu + p).astype(np.float32))  # HU after ordering
        want = resample_volume(src_vol, SHAPE)
        np.testing.assert_allclose(vol.array, want.array, atol=1e-3)
        assert vol.geometry.same_as(want.geometry)
        assert vol.meta["phase_percent"] == p and vol.meta["series_uid"] == src_vol.meta["series_uid"]
        assert vol.meta["original_geometry"] == src_vol.geometry.to_dict()
        assert vol.meta["hu_window"] == [-1000.0, 1000.0]
    # field of view kept: the world extent of the volume is the same
    g0 = read_dicom_series(files[0][0].parent).geometry
    g1 = sd.load_phase(0).geometry
    np.testing.assert_allclose(g1.index_to_world([-0.5, -0.5, -0.5]), g0.index_to_world([-0.5, -0.5, -0.5]), atol=1e-6)
    # idempotent
    rep2 = prepare(_cfg(src, out), progress=False)
    assert rep2.prepared == [] and rep2.already_done == rep.prepared


def test_missing_duplicate_and_corrupt_studies_are_skipped_whole(tmp_path):
    src, out = tmp_path / "dicom", tmp_path / "prep"
    write_study(src, _hu(), patient_id="101_OK")
    write_study(src, _hu(1), phases=[p for p in PHASES if p != 30], patient_id="102_MISSING")
    uid_dup, _ = write_study(src, _hu(2), patient_id="103_DUP")
    write_ct_series(src / "103_DUP" / uid_dup / "extra", _hu(2), series_description=gated_description(40),
                    study_uid=uid_dup, patient_id="103_DUP")
    uid_bad, files = write_study(src, _hu(3), patient_id="104_CORRUPT")
    bad = files[60][2]
    bad.write_bytes(b"garbage" * 20)
    rep = prepare(_cfg(src, out), progress=False)
    assert [k.split("/")[0] for k in rep.prepared] == ["101_OK"]
    reasons = {k.split("/")[0]: v for k, v in rep.skipped.items()}
    assert set(reasons) == {"102_MISSING", "103_DUP", "104_CORRUPT"}
    assert "missing phase(s) 30%" in reasons["102_MISSING"]
    assert "duplicate phase 40%" in reasons["103_DUP"]
    assert str(bad) in reasons["104_CORRUPT"] and "not a readable DICOM file" in reasons["104_CORRUPT"]
    # nothing half-written: only the good study exists, no temporary folders
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["101_OK"]
    assert not list(out.rglob(TMP_STUDY_PREFIX + "*"))
    assert json.loads((out / "prepare_report.json").read_text())["skipped"] == rep.skipped


def test_unreadable_pixels_leave_no_partial_study(tmp_path):
    src, out = tmp_path / "dicom", tmp_path / "prep"
    _, files = write_study(src, _hu(), patient_id="105_TRUNC")
    f = files[70][1]
    f.write_bytes(f.read_bytes()[:-40])  # header fine, pixel data truncated: fails while converting
    rep = prepare(_cfg(src, out), progress=False)
    (reason,) = rep.skipped.values()
    assert str(f) in reason and "cannot decode pixel data" in reason
    assert not (out / "105_TRUNC").exists()


def test_two_phases_per_folder_and_mixed_spacing(tmp_path):
    src, out = tmp_path / "dicom", tmp_path / "prep"
    write_study(src, _hu(), patient_id="106_FLAT", layout="flat")  # all ten phases in one folder
    uid, files = write_study(src, _hu(1), patient_id="107_SPACING")
    folder = files[20][0].parent
    for p in folder.iterdir():
        p.unlink()
    write_ct_series(folder, _hu(1) + 20, z_positions=[0, 3, 6, 9, 12, 16], study_uid=uid,
                    series_description=gated_description(20), patient_id="107_SPACING")
    rep = prepare(_cfg(src, out), progress=False)
    assert [k.split("/")[0] for k in rep.prepared] == ["106_FLAT"]
    (reason,) = rep.skipped.values()
    assert "non-uniform slice spacing" in reason and str(folder) in reason


def test_stale_temporary_study_is_cleaned_and_parallel_workers(tmp_path):
    src, out = tmp_path / "dicom", tmp_path / "prep"
    uid, _ = write_study(src, _hu(), patient_id="108_PAR")
    stale = out / "108_PAR" / (TMP_STUDY_PREFIX + safe_name(uid))
    stale.mkdir(parents=True)
    (stale / "phase_00.npy").write_bytes(b"half")
    rep = prepare(_cfg(src, out, workers=2), progress=False)
    assert len(rep.prepared) == 1 and not stale.exists()
    sd = StudyDir(out / "108_PAR" / safe_name(uid))
    assert sd.is_complete() and sd.load_phase(90).array.shape == SHAPE


def test_cli_prepare_and_import(tmp_path, capsys):
    src, out = tmp_path / "dicom", tmp_path / "prep"
    _, files = write_study(src, _hu(), patient_id="109_CLI")
    assert main(["data", "prepare", "--src", str(src), "--out", str(out), "--shape", "4,8,8", "workers=1"]) == 0
    assert (out / "prepare_config.yaml").exists() and len(list(iter_studies(out))) == 1
    # import: one phase of the DICOM folder resampled, written as .npy + sidecar
    capsys.readouterr()
    dest = tmp_path / "ct.npy"
    assert main(["data", "import", str(files[50][0].parent), "--out", str(dest), "--shape", "3,8,8"]) == 0
    assert (tmp_path / "ct.import_config.yaml").exists()
    assert np.load(dest).shape == (3, 8, 8)


@pytest.mark.parametrize("argv, text", [
    (["data", "prepare", "--src", "{tmp}/nope", "--out", "{tmp}/o"], "nope: DICOM source folder not found"),
    (["data", "import", "{tmp}/nope.nii.gz", "--out", "{tmp}/x.npy"], "nope.nii.gz: no such file"),
    (["data", "import", "{tmp}/empty", "--out", "{tmp}/x.npy"], "empty: no DICOM files found"),
    (["data", "import", "{tmp}/two", "--out", "{tmp}/x.npy"], "two: holds 2 series"),
    (["data", "import", "{tmp}/two", "--out", "{tmp}/x.npy", "--shape", "4,8"], "shape"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, text):
    (tmp_path / "empty").mkdir()
    write_ct_series(tmp_path / "two", _hu(), series_description=gated_description(0), file_prefix="A")
    write_ct_series(tmp_path / "two", _hu(), series_description=gated_description(10), file_prefix="B")
    capsys.readouterr()
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and text in err[0], err
    assert not (tmp_path / "x.npy").exists()
