"""DDP: ``torchrun --standalone --nproc_per_node=2`` on CPU (gloo) follows the same loss trajectory as one
process with the same global batch (2 x batch 1 vs 1 x batch 2, with gradient accumulation)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from respmotion.config import load_config
from respmotion.training.autoencoder import AutoencoderRunConfig, train_autoencoder
from respmotion.io.checkpoint import checkpoint_name, load_checkpoint

STEPS = 6
OVERRIDES = {"model.base_channels": 8, "model.norm_groups": 8, "model.channel_mults": [1, 2], "model.dropout": 0.0,
             "image_loss.views": ["axial"], "train.grad_accum": 2, "train.num_workers": 0,
             "train.ckpt_every": STEPS, "train.val_every": 0, "train.image_every": 0, "train.log_every": 1,
             "train.warmup_steps": 2, "train.lr_max": 1e-3, "train.grad_clip": 0.0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from respmotion.data.phantom import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, 3, seed=11, shape=(8, 16, 16))
    return root


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() and shutil.which(str(exe)) else [sys.executable, "-m", "torch.distributed.run"]


def test_two_process_ddp_matches_one_process(cohort, tmp_path):
    ddp_dir = tmp_path / "ddp"
    overrides = [f"{k}={v}".replace(" ", "") for k, v in OVERRIDES.items()]
    cmd = torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "respmotion.cli", "train", "autoencoder",
                        "--kind", "image", "--data", str(cohort), "--run-dir", str(ddp_dir), "--steps", str(STEPS),
                        "--batch-size", "1", "--device", "cpu", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_checkpoint(ddp_dir / checkpoint_name(STEPS))
    assert len(ddp["rng"]) == 2  # both ranks' RNG states are kept

    flags = {"kind": "image", "data.root": str(cohort), "run_dir": str(tmp_path / "single"), "train.steps": STEPS,
             "train.batch_size": 2, "train.device": "cpu"}
    cfg = load_config(AutoencoderRunConfig, None, flags, overrides)
    single = train_autoencoder(cfg)

    a = [loss for _, loss in ddp["history"]["train"]]
    b = [loss for _, loss in single.history["train"]]
    print("ddp   ", [round(v, 6) for v in a], "\nsingle", [round(v, 6) for v in b])
    assert len(a) == len(b) == STEPS
    assert a[-1] < a[0]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6)
    # (weights are not compared element-wise: Adam normalises updates, so parameters whose gradients
    # are ~0 move by +-lr on float rounding differences between the two reductions)
