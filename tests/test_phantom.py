"""The synthetic phantom: layout, exact motion, landmarks, invertibility."""

import json

import numpy as np
import pytest
import torch

from respmotion.cli import main
from respmotion.core import ops
from respmotion.core import warp as W
from respmotion.data.phantom import BreathingCurve, make_patient
from respmotion.io.layout import PHASES, iter_studies


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", "--out", str(out), "--patients", "2", "--shape", "16,64,64", "--seed", "0"]) == 0
    return out


def test_layout_reads_back(cohort):
    studies = list(iter_studies(cohort))
    assert [s.patient for s in studies] == ["phantom_000", "phantom_001"]
    assert (cohort / "phantom_config.yaml").exists()
    for sd in studies:
        assert sd.info()["phases"] == list(PHASES)
        for k in PHASES:
            v = sd.load_phase(k)
            assert v.array.shape == (16, 64, 64) and v.array.dtype == np.float32
            assert sd.load_gt("ref", k).array.shape == (3, 16, 64, 64)
        assert -1100 < sd.load_phase(0).array.min() < -900 and sd.load_phase(0).array.max() > 400  # air .. bone


def test_anatomy_varies_with_seed(cohort):
    a, b = list(iter_studies(cohort))
    assert not np.allclose(a.load_phase(0).array, b.load_phase(0).array)
    ea = a.info()["motion"]["diaphragm_si_excursion_mm"]
    eb = b.info()["motion"]["diaphragm_si_excursion_mm"]
    assert ea != eb and 3 <= ea <= 40 and 3 <= eb <= 40  # SI scale: the lung mean is drawn from DIR-Lab (3.5-13 mm)


def test_warping_phase0_by_gt_reproduces_phase(cohort):
    sd = next(iter_studies(cohort))
    p0 = sd.load_phase(0)
    lung = np.load(sd.mask_path("lung", 50)).astype(bool)
    for k in (20, 50):
        pk = sd.load_phase(k)
        warped = ops.warp_volume(p0, sd.load_gt("ref", k))
        err = np.abs(warped.array - pk.array)[lung].mean()
        no_motion = np.abs(p0.array - pk.array)[lung].mean()
        # residual = image noise (10 HU sd, twice) + interpolation of a coarse 16x64x64 grid
        assert err < 0.6 * no_motion, (k, err, no_motion)


def test_landmarks_follow_the_field(cohort):
    sd = next(iter_studies(cohort))
    lm = json.loads(sd.landmarks_path.read_text())
    p0 = np.asarray(lm["phases"]["00"])
    assert len(p0) > 100 and sum(lm["in_lung"]) > 50
    # landmarks are kept only where the grid resolves the sliding shear (phantom.landmark_margin); the
    # margin is recorded and every kept landmark is farther than it from the interface
    assert lm["sliding_margin_mm"] > 2 * max(sd.load_phase(0).geometry.spacing[1:])
    assert np.all(np.abs(lm["sliding_distance_mm"]) > 0.5 * lm["sliding_margin_mm"])
    assert len(lm["in_lung"]) - sum(lm["in_lung"]) > 10  # outside the lungs too (below the diaphragm)
    for k in (30, 50):
        pk = np.asarray(lm["phases"][f"{k:02d}"])
        field = sd.load_gt("ref", k)
        moved = ops.move_world_points(field, p0)
        err = np.linalg.norm(moved - pk, axis=1)
        assert np.max(err) < 0.1 and np.median(err) < 0.05, (k, np.sort(err)[-3:])
        assert np.mean(np.linalg.norm(p0 - pk, axis=1)) > 1.0  # they do move
    # the analytic motion and the stored points agree exactly
    ph = make_patient(sd.info()["seed"], (16, 64, 64))
    pk = np.asarray(lm["phases"]["50"])
    u = ph.displacement(50, pk[:, 2], pk[:, 1], pk[:, 0])
    np.testing.assert_allclose(pk[:, ::-1] + u.T, p0[:, ::-1], atol=1e-4)


def test_fields_invertible_and_consistent(cohort):
    sd = next(iter_studies(cohort))
    sp = sd.load_phase(0).geometry.spacing
    ref = {k: torch.from_numpy(sd.load_gt("ref", k).array)[None].double() for k in PHASES}
    for k in PHASES:
        assert float(W.jacobian_determinant(ref[k], sp).min()) > 0
        step = torch.from_numpy(sd.load_gt("step", k).array)[None].double()
        assert float(W.jacobian_determinant(step, sp).min()) > 0
    # composition of ref_40 with step_40 equals ref_50 away from the borders (not the sum)
    step40 = torch.from_numpy(sd.load_gt("step", 40).array)[None].double()
    comp = W.compose(ref[40], step40, sp)
    inner = (slice(None), slice(None), slice(4, -4), slice(8, -8), slice(8, -8))
    err = (comp - ref[50])[inner].abs()
    assert float(err.mean()) < 0.05 and float((ref[40] + step40 - ref[50])[inner].abs().max()) > float(err.mean())


def test_breathing_curve():
    s = BreathingCurve.population().states(np.array(PHASES))[0]
    assert s[0] == 0 and s[5] == 1 and np.all(np.diff(s[:6]) > 0) and np.all(np.diff(s[5:]) < 0)
    # asymmetric (end-exhale after 50 %): the inhale branch lags the exhale branch at mirrored phases
    assert np.all(s[6:] > s[1:5][::-1])


def test_threads_do_not_change_the_files(tmp_path):
    """Phases written concurrently (threads=2) give byte-identical files to a serial write."""
    from respmotion.data.phantom import write_patient

    a = write_patient(tmp_path / "a", "p", 7, (8, 32, 32), threads=1).path
    b = write_patient(tmp_path / "b", "p", 7, (8, 32, 32), threads=2).path
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 40
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_motion_is_calibrated_to_the_dirlab_reference():
    """Phantom statistics within stated tolerances of the measured reference (docs/motion.md table)."""
    from respmotion.data.motion_reference_fit import phantom_comparison

    cmp = phantom_comparison(8, (16, 64, 64))
    pa, ra = cmp["amplitude_mm"]["phantom"], cmp["amplitude_mm"]["reference"]
    assert np.median(pa) == pytest.approx(np.median(ra), rel=0.25)  # amplitudes drawn from the distribution
    assert 0.8 * min(ra) <= min(pa) and max(pa) <= 1.2 * max(ra) and max(pa) > 2 * min(pa)
    # motion grows from apex to base and from anterior to posterior as measured (each bin within 0.4)
    for axis in ("si", "ap", "ml"):
        ph, ref = cmp["superior_profile"][axis]["phantom"], cmp["superior_profile"][axis]["reference"]
        assert all(abs(p - r) < 0.4 for p, r in zip(ph, ref) if p is not None)
    assert cmp["superior_profile"]["si"]["phantom"][-1] > 3 * cmp["superior_profile"]["si"]["phantom"][0]
    assert cmp["superior_profile"]["ap"]["phantom"][-1] > 2 * cmp["superior_profile"]["ap"]["phantom"][0]
    # in-plane motion is small, as measured (mean posterior and lateral within 1.5 mm)
    for j in (1, 2):
        assert abs(cmp["component_mean_mm"]["phantom"][j] - cmp["component_mean_mm"]["reference"][j]) < 1.5
    # the exhale half of the phase curve follows DIR-Lab's (within 0.1); the vertebral bodies stay (< 1 mm)
    st = cmp["superior_state"]
    assert all(abs(st["phantom"][k] - v) < 0.1 for k, v in st["reference_exhale"].items())
    assert cmp["spine_max_mm"] < 1.0
    # per-patient curves: end-exhale within [0.50, 0.60] (DIR-Lab's per-case 0.50..0.55 widened to 0.60), exponents
    # within DIR-Lab's per-case range; hysteresis loops present and of a few mm at most
    peaks, ns = cmp["end_exhale_phase"]["phantom"], cmp["curve_n"]["phantom"]
    assert 0.50 <= min(peaks) and max(peaks) <= 0.60 and min(cmp["end_exhale_phase"]["reference"]) == 0.50
    assert min(cmp["curve_n"]["reference"]) - 1e-9 <= min(ns) and max(ns) <= max(cmp["curve_n"]["reference"]) + 1e-9
    assert all(0.01 < v < 3.0 for v in cmp["hysteresis_loop_mm"])


def test_redone_study_drops_an_interrupted_writers_temporary_files(tmp_path):
    from respmotion.data.phantom import write_patient
    from respmotion.io.atomic import TMP_PREFIX

    study = tmp_path / "phantom_000" / "study_0"
    study.mkdir(parents=True)
    stale = study / f"{TMP_PREFIX}landmarks-123.json"  # what a kill -9 during a write leaves
    stale.write_text("{")
    sd = write_patient(tmp_path, "phantom_000", seed=0, shape=(8, 32, 32), threads=1)
    assert sd.is_complete() and not stale.exists()
    assert not list(study.rglob(f"{TMP_PREFIX}*"))


def test_step_fields_are_exact_with_per_component_states(cohort):
    """x + t_k(x) = phi_k^-1(phi_{k+1}(x)) with the analytic motion (SI state s_k, AP/LR state h_k != s_k): the
    stored step field moves x to the point that phase k pulls from the same reference point as phase k+1."""
    sd = next(iter_studies(cohort))
    ph = make_patient(sd.info()["seed"], (16, 64, 64))
    assert sd.info()["motion"]["end_exhale_phase"] == ph.curve.peak
    Z, Y, X = ph.base_coords()
    x = np.stack([Z, Y, X])
    assert max(abs(np.subtract(*ph.states(k))) for k in PHASES) > 0.01  # h_k != s_k (hysteresis)
    for k in PHASES:
        k1 = (k + 10) % 100
        q = x + sd.load_gt("step", k).array.astype(np.float64)
        err = np.abs(q + ph.displacement(k, *q) - (x + ph.displacement(k1, *x))).max()
        assert err < 2e-5, (k, err)  # float32 storage of t (mm, ~5e-6 measured); the solve is exact to 1e-6 mm


def test_peak_phase_varies_across_seeds_within_the_stated_range():
    from respmotion.data.motion_reference import exponent_per_case, load_reference
    from respmotion.data.phantom import PEAK_RANGE

    curves = [make_patient(seed, (8, 32, 32)).curve for seed in range(12)]
    peaks = np.array([c.peak for c in curves])
    assert np.all((peaks >= PEAK_RANGE[0]) & (peaks <= PEAK_RANGE[1])) and PEAK_RANGE == (0.50, 0.60)
    assert np.ptp(peaks) > 0.04 and np.any(peaks > 0.55)  # varies, and beyond DIR-Lab's 0.55 cap
    ns = np.array([c.n for c in curves])
    per_case = exponent_per_case(load_reference()["phase_curve"])
    assert np.ptp(ns) > 0.2 and min(per_case) - 1e-9 <= ns.min() and ns.max() <= max(per_case) + 1e-9
    # same seed, same patient (curve and motion)
    a, b = make_patient(5, (8, 32, 32)), make_patient(5, (8, 32, 32))
    assert a.curve == b.curve and np.array_equal(a.field(70), b.field(70))
    # the lung's superior motion is largest at the patient's own end-exhale phase (1 % steps)
    pct = np.arange(40.0, 71.0, 1.0)
    for ph in (make_patient(s, (8, 32, 32)) for s in (int(np.argmin(peaks)), int(np.argmax(peaks)))):
        a = ph.anatomy
        pts = np.array([c for c, kind in zip(a.landmarks_ref, a.landmark_kind) if kind == "lung_parenchyma"])
        up = [float((ph.move_points(k, pts)[:, 0] - pts[:, 0]).mean()) for k in pct]
        assert abs(pct[int(np.argmax(up))] - 100.0 * ph.curve.peak) <= 1.0, (ph.curve.peak, pct[int(np.argmax(up))])


def test_ap_lr_lag_si_a_bounded_loop():
    """Hysteresis: at the same SI state (phase 30 and its inhale mirror, near 70 %) the SI positions agree but the
    AP/LR motion lags on exhale and leads on inhale, so a tissue point's path is a loop, not retraced (< 3 mm)."""
    ph = make_patient(0, (16, 64, 64))
    assert ph.curve.eta < 0
    ref = np.array(ph.anatomy.landmarks_ref)
    back = float(ph.curve.same_si_state(30.0))
    assert 60.0 < back < 80.0 and ph.states(30)[0] == pytest.approx(ph.states(back)[0], abs=1e-12)
    p_ex, p_in = ph.move_points(30, ref), ph.move_points(back, ref)
    inplane_ex = np.linalg.norm(p_ex[:, 1:] - ref[:, 1:], axis=1)
    inplane_in = np.linalg.norm(p_in[:, 1:] - ref[:, 1:], axis=1)
    moving = inplane_in > 0.1
    assert moving.sum() > 100 and np.all(inplane_ex[moving] < inplane_in[moving])  # AP/LR lag SI on exhale
    gap = np.linalg.norm(p_ex[:, 1:] - p_in[:, 1:], axis=1)
    assert 0.02 < gap.max() < 3.0, gap.max()  # a loop of a few mm at most
    # the SI positions differ only through the in-plane gap (u_z is sampled where the point is in-plane)
    assert np.abs(p_ex[:, 0] - p_in[:, 0]).max() < 3.0 * gap.max() + 1e-6
    # without hysteresis the path would retrace itself: the model's h equals s when eta = 0
    from respmotion.data.phantom import BreathingCurve

    flat = BreathingCurve(ph.curve.n, ph.curve.peak, 0.0)
    np.testing.assert_allclose(*flat.states(np.array([30.0, back])), atol=1e-12)


def test_population_phase_curve_gives_every_patient_the_reference_curve(tmp_path):
    from respmotion.data.phantom import BreathingCurve, write_cohort
    from respmotion.io.ownership import OwnershipError

    pop = BreathingCurve.population()
    assert make_patient(1, (8, 32, 32), phase_curve="population").curve == pop
    assert make_patient(1, (8, 32, 32)).curve != pop  # the default: the patient's own curve
    out = tmp_path / "cohort"
    write_cohort(out, 1, seed=0, shape=(8, 32, 32), phase_curve="population")
    with pytest.raises(OwnershipError, match="--overwrite"):  # a rerun with the patient curves would mix the two
        write_cohort(out, 1, seed=0, shape=(8, 32, 32))
    with pytest.raises(ValueError, match="phase_curve"):
        write_cohort(tmp_path / "bad", 1, seed=0, shape=(8, 32, 32), phase_curve="wobbly")


def test_chest_wall_landmarks_lie_in_tissue_outside_the_cavity():
    """Chest-wall landmarks sit between the cavity and the skin (at least SKIN_DEPTH_MM under it, never in air),
    and enough of them lie far enough from the sliding interface to be kept."""
    from respmotion.data.phantom import SKIN_DEPTH_MM, landmark_table

    kept = 0
    for seed in (0, 1, 2):
        ph = make_patient(seed, (16, 128, 128))  # in-plane spacing sets the margin: 13.6 mm here, 19.2 at 64x64
        ref = np.array([c for c, k in zip(ph.anatomy.landmarks_ref, ph.anatomy.landmark_kind) if k == "chest_wall"])
        depth = (1.0 - np.hypot(ref[:, 2] / ph.p.body_ax, ref[:, 1] / ph.p.body_ay)) * min(ph.p.body_ax, ph.p.body_ay)
        assert len(ref) == 16 and depth.min() >= SKIN_DEPTH_MM - 1e-6, depth.min()
        assert ph.p.sliding_distance(ref[:, 1], ref[:, 2]).min() > 0  # outside the cavity: the chest wall's field
        kept += landmark_table(ph)["kind"].count("chest_wall")
    assert kept >= 10, kept
