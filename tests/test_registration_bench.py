"""The registration bench's plumbing (bench.registration, bench.registration_cases): candidates read once, pair
names parsed once with the layout's phase order, tuning refused outside the tuning sets.  No registration runs and
no time is asserted here (tests/test_bench_smoke.py runs the methods)."""

from __future__ import annotations

import pytest

from bench import registration as bench_reg  # the repository root is on sys.path under `python -m pytest`
from bench.registration_cases import SETS, TUNING_SETS, _pair_phases


@pytest.fixture
def spy(monkeypatch):
    """Count reads of the candidates file and capture what main hands to run (which then does nothing)."""
    seen = {"reads": 0, "run": None}
    real = bench_reg.load_candidates

    def counted(method):
        seen["reads"] += 1
        return real(method)

    def fake_run(*args, **kwargs):
        seen["run"] = args
        return {}

    monkeypatch.setattr(bench_reg, "load_candidates", counted)
    monkeypatch.setattr(bench_reg, "run", fake_run)
    return seen


def test_main_reads_the_candidates_file_once_and_keeps_the_asked_order(spy):
    assert bench_reg.main(["--set", "tune", "--tune", "--candidates", "before_texture,default"]) == 0
    assert spy["reads"] == 1
    methods, candidates = spy["run"][3], spy["run"][-1]
    assert methods == ["ours"] and list(candidates) == ["before_texture", "default"]
    assert candidates["before_texture"].bending_texture == ()


def test_main_without_tune_reads_no_candidates(spy):
    assert bench_reg.main(["--set", "real", "--methods", "ours"]) == 0
    assert spy["reads"] == 0 and spy["run"][-1] is None


@pytest.mark.parametrize("argv, message", [
    (["--set", "tune", "--tune", "--candidates", "default,no_such"], "no_such"),
    (["--set", "heldout", "--tune"], "tuning sets only"),
    (["--set", "real", "--tune"], "tuning sets only"),
    (["--set", "tune", "--methods", "ours,bogus"], "bogus"),
    (["--set", "tune", "--tune", "--methods", "ours,deepali-example"], "one of"),
])
def test_main_refuses_bad_requests_before_running(spy, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench_reg.main(argv)
    assert message in capsys.readouterr().err
    assert spy["run"] is None


def test_pair_names_map_to_fixed_and_moving_phases():
    assert _pair_phases("ref_50") == ("ref", 50, 50, 0)
    assert _pair_phases("step_20") == ("step", 20, 30, 20)
    assert _pair_phases("step_90") == ("step", 90, 0, 90)  # wraps to end-inhale


def test_held_out_patients_are_not_tuning_patients():
    tuned = {s for name in TUNING_SETS for s in SETS[name]["seeds"]}
    assert tuned and not tuned & set(SETS["heldout"]["seeds"])
    assert {"ref_20", "ref_50"} <= set(SETS["heldout"]["pairs"]) and len(SETS["heldout"]["seeds"]) >= 2


def test_methods_are_checked_by_name():
    bench_reg.check_methods(["ours", "ours-pair", "deepali"])
    with pytest.raises(ValueError, match="ours-batch"):
        bench_reg.check_methods(["ours", "ours-batch"])
