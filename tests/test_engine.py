"""Training engine: LR schedule, batch assignment, NaN stop, atomic checkpoints, warm start, and
kill -9 after a checkpoint then --resume giving the same final weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from respmotion.io import checkpoint as C
from respmotion.training.checkpoint import own_run_dir
from respmotion.training.distributed import DistInfo
from respmotion.training.engine import TrainConfig, Trainer, TrainingDiverged
from respmotion.training.schedule import GlobalBatches, WarmupCosine
from respmotion.training.task import Task


# ------------------------------------------------------------------------------ toy task
class ToyTask(Task):
    name = "toy"

    def __init__(self, nan_at: int | None = None):
        self.nan_at = nan_at

    def build_model(self):
        return nn.Linear(4, 1)

    def model_config(self):
        return {"in": 4}

    def loss(self, model, batch, step):
        loss = (model(batch["x"]) - batch["y"]).pow(2).mean()
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "key": f"item{i}"}


def toy_trainer(run_dir, task=None, **kw):
    settings = dict(steps=6, batch_size=4, grad_accum=1, num_workers=0, warmup_steps=2, lr_max=0.05, lr_min=0.001,
                    val_every=0, ckpt_every=3, log_every=1, image_every=0)
    cfg = TrainConfig(**{**settings, **kw})
    return Trainer(task or ToyTask(), ToyData(), ToyData(4), cfg, run_dir, {"toy": True}, DistInfo())


# ------------------------------------------------------------------------------ schedule and batches
def test_warmup_then_cosine_to_floor():
    f = WarmupCosine(warmup=10, total=110, floor=0.02)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.51) and f(110) == pytest.approx(0.02)
    after = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_global_batches_same_samples_for_any_world_size():
    one = iter(GlobalBatches(10, 2, rank=0, world=1, seed=7))
    r0 = iter(GlobalBatches(10, 1, rank=0, world=2, seed=7))
    r1 = iter(GlobalBatches(10, 1, rank=1, world=2, seed=7))
    seen = []
    for _ in range(12):  # crosses an epoch boundary (5 batches per epoch)
        b = next(one)
        assert b == next(r0) + next(r1)
        seen += b
    assert sorted(seen[:10]) == list(range(10))  # one epoch covers every item once
    later = iter(GlobalBatches(10, 2, rank=0, world=1, seed=7, start=7))
    fresh = iter(GlobalBatches(10, 2, rank=0, world=1, seed=7))
    for _ in range(7):
        next(fresh)
    assert next(later) == next(fresh)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatches(3, 2, rank=0, world=2, seed=0)


# ------------------------------------------------------------------------------ engine behaviour
def test_toy_run_learns_and_checkpoints_load_weights_only(tmp_path):
    res = toy_trainer(tmp_path / "run", steps=40, ckpt_every=10, keep_checkpoints=2, lr_max=0.2).fit()
    losses = [l for _, l in res.history["train"]]
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5])
    assert [s for s, _ in C.list_checkpoints(res.run_dir)] == [30, 40]  # older ones pruned
    ck = C.load_checkpoint(res.last_checkpoint)
    assert ck["step"] == 40 and ck["task"] == "toy" and len(ck["rng"]) == 1
    assert {"model", "optimizer", "scheduler", "scaler", "config", "history"} <= set(ck)
    assert "optimizer" not in C.load_checkpoint(res.model_path)


def test_nonfinite_loss_stops_with_clear_message(tmp_path):
    trainer = toy_trainer(tmp_path / "run", task=ToyTask(nan_at=4), steps=10)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5 .*Last checkpoint: .*00000003\.pt"):
        trainer.fit()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "00000001.pt"
    C.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half")  # a partial archive, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        C.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, path)
    assert C.load_checkpoint(path)["step"] == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["00000001.pt"]  # no temporary left behind


def test_warm_start_keeps_previous_config(tmp_path):
    first = toy_trainer(tmp_path / "a", steps=4).fit()
    second = toy_trainer(tmp_path / "b", steps=1, lr_max=1e-12, lr_min=1e-13)
    second.warm_start(first.model_path)
    torch.testing.assert_close(second.model.state_dict(), C.load_checkpoint(first.model_path)["model"])
    prev = yaml.safe_load((tmp_path / "b" / "prev_config.yaml").read_text())
    assert prev["toy"] is True and prev["warm_start_step"] == 4 and prev["warm_start_from"].endswith("model.pt")
    with pytest.raises(ValueError, match="use either"):
        second.fit(resume=first.last_checkpoint, init=first.model_path)


def test_resume_refuses_weights_only_file(tmp_path):
    first = toy_trainer(tmp_path / "a", steps=2).fit()
    with pytest.raises(ValueError, match="cannot be resumed"):
        toy_trainer(tmp_path / "b").resume(first.model_path)


# ------------------------------------------------------------------------------ kill -9 and resume
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from respmotion.data.phantom import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, 3, seed=5, shape=(8, 16, 16))
    return root


def _cli(*args):
    return [sys.executable, "-m", "respmotion.cli", *args]


def _train_args(cohort, run_dir, steps):
    # the DVF VAE with dropout: resuming must restore the RNG streams (sampling + dropout) too
    return ["train", "autoencoder", "--kind", "dvf", "--data", str(cohort), "--run-dir", str(run_dir),
            "--steps", str(steps), "--batch-size", "1", "--device", "cpu",
            "model.base_channels=8", "model.norm_groups=8", "model.channel_mults=[1,2]", "model.dropout=0.1",
            "data.field_source=gt_ref", "train.grad_accum=2", "train.num_workers=0", "train.deterministic=true",
            "train.ckpt_every=2", "train.keep_checkpoints=0", "train.val_every=0", "train.image_every=0",
            "train.log_every=1", "train.warmup_steps=2", "train.lr_max=1e-3"]


def test_kill9_then_resume_gives_identical_weights(cohort, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 16
    full = tmp_path / "full"
    subprocess.run(_cli(*_train_args(cohort, full, steps)), check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(*_train_args(cohort, cut, steps)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (cut / "00000002.pt").exists():
        assert proc.poll() is None, "training exited before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (cut / "model.pt").exists(), "run finished before the kill"
    survivors = C.list_checkpoints(cut)
    assert survivors and survivors[-1][0] < steps
    for _, p in survivors:  # whatever the kill interrupted, no checkpoint is half-written
        C.load_checkpoint(p)

    subprocess.run(_cli("train", "autoencoder", "--resume", str(cut)), check=True, env=env, capture_output=True)
    a = C.load_checkpoint(full / C.checkpoint_name(steps))
    b = C.load_checkpoint(cut / C.checkpoint_name(steps))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["history"]["train"] == b["history"]["train"]
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])


def test_held_run_dir_drops_a_killed_checkpoint_writers_temporary_file(tmp_path):
    from respmotion.io.atomic import TMP_PREFIX

    run = tmp_path / "run"
    run.mkdir()
    stale = run / f"{TMP_PREFIX}00000002-abc.pt"  # what kill -9 during a checkpoint write leaves
    stale.write_bytes(b"PK")
    with own_run_dir(run, "toy", resuming=True):
        assert not stale.exists()
    assert not list(run.rglob(f"{TMP_PREFIX}*"))


def test_run_weights_is_model_pt_else_the_newest_step(tmp_path):
    """The weights a run folder stands for: ``model.pt`` once finished, else its newest ``<step>.pt``; a file is
    itself; a folder with neither is refused naming it."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"run: not a model bundle \(no model.pt"):
        C.run_weights(run, kind="model bundle")
    for step in (2, 4):
        C.save_checkpoint({"step": step, "model": {}}, run / C.checkpoint_name(step))
    assert C.run_weights(run) == run / C.checkpoint_name(4)
    C.save_checkpoint({"step": 4, "model": {}}, run / C.MODEL_FILE)
    assert C.run_weights(run) == run / "model.pt"
    assert C.run_weights(run / C.checkpoint_name(2)) == run / C.checkpoint_name(2)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        C.run_weights(tmp_path / "missing")
