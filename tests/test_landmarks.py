"""Landmark readers (POPI, DIR-Lab, elastix) and the landmark error metric."""

import json

import numpy as np
import pytest

from respmotion.core import DisplacementField, Geometry, Volume
from respmotion.evaluation.landmarks import error_stats, landmark_error, landmark_report, points_in_mask
from respmotion.io.landmarks import (
    LandmarkFileError,
    read_dirlab_txt,
    read_elastix_points,
    read_landmarks_json,
    read_popi_csv,
    read_popi_pts,
    write_landmarks_json,
)
from respmotion.io.volumes import load_volume


# ---------------------------------------------------------------- real data (skipped without ../shared/data)
def test_dirlab_case1_no_motion_is_published_value(shared_data):
    d = shared_data / "dirlab-4dct-landmarks" / "case1" / "ExtremePhases"
    t00 = read_dirlab_txt(d / "Case1_300_T00_xyz.txt")
    t50 = read_dirlab_txt(d / "Case1_300_T50_xyz.txt")
    assert t00.shape == t50.shape == (300, 3)
    stats = landmark_error(None, t00, t50).summary()["all"]
    # DIR-Lab published: case 1, 300 points T00 -> T50, 3.89 (2.78) mm
    assert round(stats["mean"], 2) == 3.89
    assert round(stats["sd"], 2) == 2.78


def test_dirlab_index_convention_and_geometry_roundtrip(shared_data):
    path = shared_data / "dirlab-4dct-landmarks" / "case1" / "ExtremePhases" / "Case1_300_T00_xyz.txt"
    raw = np.loadtxt(path)
    mm = read_dirlab_txt(path)
    np.testing.assert_allclose(mm, (raw - 1) * [0.97, 0.97, 2.5])  # 1-based -> voxel (1,1,1) at the origin
    geom = Geometry((94, 256, 256), (2.5, 0.97, 0.97), (-120.0, -100.0, 30.0))
    world = read_dirlab_txt(path, geometry=geom)
    back = geom.world_to_index(world)  # (z, y, x), 0-based
    assert np.abs(back - (raw[:, ::-1] - 1)).max() < 1e-6


def test_popi_pts_match_lps_csv_and_no_motion_error(shared_data):
    d = shared_data / "popi-4dct-phase00" / "landmarks"
    csv = read_popi_csv(d / "popi_landmarks_lps_mm.csv")
    assert sorted(csv) == list(range(0, 100, 10))
    for phase, pts in csv.items():
        pts_file = read_popi_pts(d / f"{phase:02d}-Landmarks.pts")
        assert pts_file.shape == (41, 3)
        np.testing.assert_allclose(pts_file, pts, atol=1e-3)
    stats = landmark_error(None, csv[0], csv[50]).summary()["all"]
    # README: mean |displacement| 0 -> 50 % = 5.75 mm (sd 2.74, max 12.1)
    assert stats["mean"] == pytest.approx(5.75, abs=0.005)
    assert stats["sd"] == pytest.approx(2.74, abs=0.005)
    assert stats["max"] == pytest.approx(12.1, abs=0.05)


def test_popi_offset_matches_readme_voxels_and_resampled_roundtrip(shared_data):
    pts_path = shared_data / "popi-4dct-phase00" / "landmarks" / "00-Landmarks.pts"
    raw = np.loadtxt(pts_path, skiprows=1)  # POPI MetaImage mm
    lps = read_popi_pts(pts_path)
    # the DICOM series' geometry (README: SimpleITK origin, spacing; identity direction)
    dicom = Geometry((141, 512, 512), (2.0, 0.9765625, 0.9765625), (-250.0, -164.0, -164.5))
    readme_ijk = raw / [0.9765625, 0.9765625, 2.0] + [3, 19, 0]  # README: 0-based (i, j, k)
    assert np.abs(dicom.world_to_index(lps)[:, ::-1] - readme_ijk).max() < 1e-3
    model = dicom.resized((50, 256, 256))  # the model grid keeps the field of view
    idx = model.world_to_index(lps)
    assert np.all((idx > -0.5) & (idx < np.asarray(model.shape) - 0.5))
    assert np.abs(model.index_to_world(idx) - lps).max() / min(model.spacing) < 0.5


def test_elastix_pairs_inside_their_masks(shared_data):
    d = shared_data / "elastix-lung-ct-small"
    base = read_elastix_points(d / "baseline_landmarks_51.txt")
    follow = read_elastix_points(d / "followup_landmarks_51.txt")
    assert base.shape == follow.shape == (51, 3)
    assert points_in_mask(load_volume(d / "3DCT_lung_baseline_mask.mha"), base).all()
    assert points_in_mask(load_volume(d / "3DCT_lung_followup_mask.mha"), follow).all()
    assert error_stats(np.linalg.norm(follow - base, axis=1))["mean"] == pytest.approx(35.27, abs=0.01)


# ---------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "reader,text,where",
    [
        (read_popi_pts, "#X Y Z\n1\t2\t3\n4\t5\n", ":3:"),
        (read_popi_pts, "1\t2\t3\n", ":1:"),
        (read_popi_pts, "#X Y Z\n1\t2\tabc\n", ":2:"),
        (lambda p: read_dirlab_txt(p, case=1), "1\t2\t3\r\n0\t5\t6\r\n", ":2:"),
        (lambda p: read_dirlab_txt(p, case=1), "1\t2\t3.5\n", ":1:"),
        (read_elastix_points, "point\n3\n1 2 3\n4 5 6\n", ":2:"),
        (read_elastix_points, "points\n1\n1 2 3\n", ":1:"),
        (read_elastix_points, "index\n1\n1 2 3\n", "geometry"),
        (read_popi_csv, "phase,id,x,y,z\n", ":1:"),
        (read_popi_csv, "phase_percent,landmark_id,x_lps_mm,y_lps_mm,z_lps_mm\n0,1,1,2\n", ":2:"),
    ],
)
def test_bad_files_give_one_line_error_naming_file_and_line(tmp_path, reader, text, where):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(LandmarkFileError) as exc:
        reader(path)
    msg = str(exc.value)
    assert str(path) in msg and where in msg and "\n" not in msg


def test_dirlab_case_needed_when_name_does_not_say(tmp_path):
    path = tmp_path / "points.txt"
    path.write_text("1 1 1\n")
    with pytest.raises(LandmarkFileError, match="case number"):
        read_dirlab_txt(path)
    np.testing.assert_allclose(read_dirlab_txt(path, spacing_xyz=(1, 1, 1)), [[0, 0, 0]])


def test_landmarks_json_roundtrip(tmp_path):
    pts = {0: np.arange(6.0).reshape(2, 3), 50: np.arange(6.0).reshape(2, 3) + 0.5}
    write_landmarks_json(tmp_path / "landmarks.json", pts)
    back = read_landmarks_json(tmp_path / "landmarks.json")
    assert sorted(back) == [0, 50]
    for k in pts:
        np.testing.assert_array_equal(back[k], pts[k])
    # the phantom's landmarks.json carries extra keys (kind, in_lung); the reader accepts them
    phantom_style = {"frame": "LPS mm (x, y, z)", "kind": ["nodule"], "in_lung": [True], "phases": {"00": [[1, 2, 3]]}}
    (tmp_path / "phantom.json").write_text(json.dumps(phantom_style))
    np.testing.assert_array_equal(read_landmarks_json(tmp_path / "phantom.json")[0], [[1.0, 2.0, 3.0]])
    (tmp_path / "bad.json").write_text(json.dumps({"frame": "RAS", "phases": {}}))
    with pytest.raises(LandmarkFileError, match="bad.json"):
        read_landmarks_json(tmp_path / "bad.json")


# ---------------------------------------------------------------- the metric on known fields
def _geometry():
    direction = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)  # rotated in-plane axes
    return Geometry((20, 24, 28), (2.5, 1.5, 1.25), (-10.0, 5.0, -30.0), tuple(direction.ravel()))


def _world_grid(geom):
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in geom.shape], indexing="ij"), -1)
    return geom.index_to_world(idx)  # (z, y, x, 3) LPS


def _inner_points(geom, n, rng):
    idx = rng.uniform(5, np.asarray(geom.shape) - 6, size=(n, 3))
    return geom.index_to_world(idx)


def test_translation_error_sign():
    geom = _geometry()
    t_world = np.array([3.0, -2.0, 4.0])  # LPS mm
    arr = np.broadcast_to(geom.world_to_axes(t_world)[:, None, None, None], (3, *geom.shape))
    field = DisplacementField(arr.astype(np.float32).copy(), geom)
    ref = _inner_points(geom, 10, np.random.default_rng(0))
    # pull: phase(p) = ref(p + t) -> anatomy moves by -t
    for direction in ("move", "pull"):
        assert landmark_error(field, ref, ref - t_world, direction=direction).errors_mm.max() < 1e-4
        np.testing.assert_allclose(
            landmark_error(field, ref, ref + t_world, direction=direction).errors_mm, 2 * np.linalg.norm(t_world), atol=1e-4
        )
    np.testing.assert_allclose(landmark_error(None, ref, ref - t_world).errors_mm, np.linalg.norm(t_world))


def test_move_and_pull_directions_agree_on_affine_field():
    geom = _geometry()
    rng = np.random.default_rng(1)
    a = rng.uniform(-0.05, 0.05, size=(3, 3))  # u(p) = A (p - c) + b, LPS; trilinear interpolation is exact
    b = np.array([2.0, -1.0, 3.0])
    c = geom.index_to_world((np.asarray(geom.shape) - 1) / 2.0)
    u = (_world_grid(geom) - c) @ a.T + b
    field = DisplacementField(geom.world_to_axes(np.moveaxis(u, -1, 0), axis=0).astype(np.float32), geom)
    ref = _inner_points(geom, 30, rng)
    # exact target: q + A (q - c) + b = ref
    target = np.linalg.solve(np.eye(3) + a, (ref - b + a @ c).T).T
    for direction in ("move", "pull"):
        assert landmark_error(field, ref, target, direction=direction).errors_mm.max() < 1e-3
    noisy = target + rng.normal(scale=2.0, size=target.shape)
    e_move = landmark_error(field, ref, noisy, direction="move").errors_mm
    e_pull = landmark_error(field, ref, noisy, direction="pull").errors_mm
    # pull error = |(I + A) delta|, move error = |delta|
    norm_a = np.linalg.norm(a, 2)
    assert np.all(np.abs(e_pull - e_move) <= norm_a * e_move + 1e-3)
    np.testing.assert_allclose(e_pull, np.linalg.norm((noisy - target) @ (np.eye(3) + a).T, axis=1), atol=1e-3)


def test_mask_split_and_report():
    geom = _geometry()
    mask_arr = np.zeros(geom.shape, np.uint8)
    mask_arr[:, :, :14] = 1
    mask = Volume(mask_arr, geom)
    idx_in = np.array([[10.0, 12.0, 5.0], [8.0, 6.0, 10.0]])
    idx_out = np.array([[10.0, 12.0, 20.0]])
    ref = geom.index_to_world(np.concatenate([idx_in, idx_out]))
    target = ref + np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 5.0]])
    res = landmark_error(None, ref, target, mask=mask)
    s = res.summary()
    assert s["inside"]["n"] == 2 and s["outside"]["n"] == 1
    assert s["inside"]["mean"] == pytest.approx(1.5) and s["outside"]["mean"] == pytest.approx(5.0)
    zero = DisplacementField(np.zeros((3, *geom.shape), np.float32), geom)
    rep = landmark_report(ref, {0: ref, 50: target}, fields={50: zero}, mask=mask)
    assert set(rep["phases"]) == {"0", "50"}
    assert rep["phases"]["0"]["no_motion"]["all"]["mean"] == 0.0
    assert rep["phases"]["50"]["field"]["all"]["mean"] == pytest.approx(rep["phases"]["50"]["no_motion"]["all"]["mean"], abs=1e-6)
    assert rep["phases"]["50"]["field"]["n_outside_grid"] == 0
