"""Sampler options on a model bundle: every combination of --sampler/--steps/--delta-t either runs
(summary.json records the sampler, its steps and the seed) or fails with one line and exit code 2."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from respmotion.cli import main
from respmotion.core import Geometry, Volume
from respmotion.diffusion.config import SAMPLER_ALIASES, SAMPLER_CHOICES, SamplerConfig, choose_sampler
from respmotion.io.volumes import save_volume

T = 20  # the tiny bundle's schedule: few network evaluations even for ddpm
SHAPE = (8, 16, 16)
BUNDLE_SAMPLER = SamplerConfig(name="dpmpp2m", steps=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained bundle on disk (image AE, DVF VAE, diffusion UNet; T = 20) and a CT at its grid."""
    from respmotion.config import to_dict
    from respmotion.diffusion.config import DiffusionModelConfig, ScheduleConfig, UNetConfig
    from respmotion.diffusion.model import LatentDiffusion
    from respmotion.models.autoencoder import Autoencoder, default_net_config
    from respmotion.io.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    prov = {}
    for kind in ("image", "dvf"):
        net = default_net_config(kind, base_channels=4, channel_mults=(1, 2), norm_groups=2, dropout=0.0)
        path = save_checkpoint({"task": f"autoencoder_{kind}", "model_config": net.to_dict(),
                                "model": Autoencoder(net).state_dict(), "extra": {}}, d / f"ae_{kind}.pt")
        prov[f"{kind}_autoencoder"] = {"path": str(path)}
    cfg = DiffusionModelConfig(unet=UNetConfig(channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                               num_head_channels=8, norm_num_groups=4),
                               schedule=ScheduleConfig(num_train_timesteps=T), image_condition="plain",
                               anatomy_condition=False)  # its CT is a pattern, not a chest
    model = LatentDiffusion(cfg)
    bundle = save_checkpoint({"task": "diffusion", "model_config": {**to_dict(cfg), "ema_decay": 0.99},
                              "model": model.state_dict(),
                              "extra": {"latent_provenance": prov, "sampler": to_dict(BUNDLE_SAMPLER),
                                        "input_shape": list(SHAPE)}}, d / "model.pt")
    g = Geometry(SHAPE, (3.0, 2.0, 2.0))
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    ct = save_volume(Volume((-800 + 400 * np.sin(yy / 3) * np.cos(xx / 4) + 10 * zz).astype(np.float32), g),
                     d / "ct.nii.gz")
    return {"bundle": bundle, "ct": ct}


def expected(sampler: str | None, steps: int | None, delta_t: int | None) -> tuple[str, int] | None:
    """(sampler, steps) the options must give on the tiny bundle (default dpmpp2m, 5 steps), None = refused."""
    name = SAMPLER_ALIASES.get(sampler, sampler) if sampler else BUNDLE_SAMPLER.name
    if delta_t and (T % delta_t or (steps and steps != T // delta_t)):
        return None
    if name == "ddpm":
        return None if (steps and steps != T) or (delta_t and delta_t != 1) else ("ddpm", T)
    if steps and steps > T:
        return None
    if delta_t:
        return name, T // delta_t
    if steps:
        return name, steps
    own = {"dpmpp2m": BUNDLE_SAMPLER.steps, "ddim": T // 5}[name]  # another sampler starts from its own defaults
    return name, own if name != BUNDLE_SAMPLER.name else BUNDLE_SAMPLER.steps


COMBOS = list(itertools.product((None, *SAMPLER_CHOICES), (None, 4, 20, 25), (None, 1, 3, 5)))


def test_choose_sampler_matches_the_rules_for_every_combination():
    for sampler, steps, delta_t in COMBOS:
        want = expected(sampler, steps, delta_t)
        if want is None:
            with pytest.raises(ValueError) as err:
                choose_sampler(BUNDLE_SAMPLER, T, sampler, steps, delta_t)
            assert "\n" not in str(err.value)
        else:
            got = choose_sampler(BUNDLE_SAMPLER, T, sampler, steps, delta_t)
            assert (got.name, got.num_steps(T)) == want, (sampler, steps, delta_t)


@pytest.mark.parametrize("sampler", [None, *SAMPLER_CHOICES])
def test_every_option_combination_runs_or_fails_in_one_line(tiny, tmp_path, capsys, sampler):
    for steps, delta_t in itertools.product((None, 4, 20, 25), (None, 1, 3, 5)):
        out = tmp_path / f"o_{steps}_{delta_t}"
        argv = ["synthesize", str(tiny["ct"]), "--model", str(tiny["bundle"]), "--out", str(out), "--no-render",
                "--seed", "3"]
        argv += ["--sampler", sampler] if sampler else []
        argv += ["--steps", str(steps)] if steps else []
        argv += ["--delta-t", str(delta_t)] if delta_t else []
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        want = expected(sampler, steps, delta_t)
        if want is None:
            assert rc == 2 and len(err) == 1 and str(tiny["bundle"]) in err[0], (argv, err)
        else:
            assert rc == 0, (argv, err)
            s = json.loads((out / "summary.json").read_text())
            assert (s["motion"]["sampler"], s["motion"]["steps"], s["seed"]) == (*want, 3)


def test_sampler_options_with_fixed_motion_are_refused(tmp_path, capsys):
    study = tmp_path / "ph"
    assert main(["phantom", "--out", str(study), "--patients", "1", "--shape", "8,32,32"]) == 0
    capsys.readouterr()
    rc = main(["synthesize", str(study / "phantom_000" / "study_0"), "--model", "gt", "--out", str(tmp_path / "o"),
               "--sampler", "ddim"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--model gt" in err[0]
