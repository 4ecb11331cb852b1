"""The demo's output folder: a rerun starts from nothing; a foreign folder is never touched."""

from __future__ import annotations

import pytest

from respmotion.demo import prepare_out


def test_rerun_clears_the_earlier_demo(tmp_path):
    out = tmp_path / "demo"
    (out / "latents" / "p").mkdir(parents=True)
    (out / "latents" / "p" / "x.npy").write_bytes(b"old")
    (out / "runs").mkdir()
    (out / "demo_config.yaml").write_text("out: x\n")
    (out / "demo_summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not a stage output: kept
    prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == ["demo_config.yaml", "notes.txt"]


def test_foreign_folder_is_refused_and_untouched(tmp_path):
    (tmp_path / "latents").mkdir()
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not the output of an earlier demo"):
        prepare_out(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "precious" and (tmp_path / "latents").is_dir()


def test_missing_or_empty_folder_is_fine(tmp_path):
    prepare_out(tmp_path / "new")
    prepare_out(tmp_path)


def test_too_few_patients_refused_before_writing(tmp_path):
    from respmotion.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="at least 3 patients"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), patients=2))
    assert not (tmp_path / "demo").exists()
