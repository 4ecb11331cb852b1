"""Quality vs cost of the synthesis networks: the evidence for their default sizes (docs/synthesis.md).

``timing``: seconds per call at the model grid (50x256x256, latent 50x32x32) on the threads given,
and parameter counts, for the DVF decoder with 0 / 1 / 2 levels left coarse
(:class:`respmotion.models.autoencoder.AutoencoderNetConfig` ``coarse_levels``; batch 1 = one phase)
and for diffusion UNets of several widths (batch 9 = one cycle's phases per network evaluation).
Untrained weights (cost does not depend on them).

``quality``: on a finished demo (``respmotion demo --out DIR``: phantom cohort at 16x64x64, its
train / val / held-out split) train, with the demo's own run configs,

* the DVF VAE with each ``coarse_levels`` (and optionally another base width) and report its reconstruction error in the lungs (mm,
  full field: the motion prior added back) on the held-out patients (test split) and, for
  comparison, on the first four training patients;
* the diffusion model with UNets of several widths on the demo's latents and report the demo's
  held-out evaluation (lung DVF error of the generated cycle vs the exact motion, phases 10..90);
* optionally (``--chain K[:BASE]``) the whole chain with that DVF VAE: latents,
  diffusion with the demo's UNet, held-out evaluation.

``sampler``: on a trained bundle (the demo's by default) the generated field of DPM-Solver++(2M)
with N steps (and DDIM with N steps) against DDIM with 200 steps (``delta_t`` 5, the research
sampler) from the same model and noise: ``mean |u_N - u_200| / mean |u_200|`` over the lungs of
phase 00 and phases 10..90, per held-out patient and overall.

    python -m bench.model_cost timing [--threads 2]
    python -m bench.model_cost quality --demo DIR --out DIR [--coarse 0,1,2,2:4] [--unet 8x16x16,16x32x32] [--chain 2]
    python -m bench.model_cost sampler --demo DIR [--steps 5,10,15,20] [--bundle PATH]

Every command prints JSON (with :func:`bench.common.environment`: threads, load average).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from bench.common import environment

LATENT = (50, 32, 32)
#: UNet widths timed: 64-128-256 channels, 3/4 and 1/2 of them, and 1/2 with one res block per level
UNET_CANDIDATES: dict[str, dict[str, Any]] = {
    "64-128-256": dict(channels=(64, 128, 256), num_res_blocks=2),
    "48-96-192": dict(channels=(48, 96, 192), norm_num_groups=16, num_res_blocks=2),
    "32-64-128": dict(channels=(32, 64, 128), num_res_blocks=2),
    "32-64-128-rb1": dict(channels=(32, 64, 128), num_res_blocks=1),
}


def _params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timing(threads: int = 2, coarse: Sequence[str] = ("0", "1", "2"), repeats: int = 2,
           unets: Sequence[str] = tuple(UNET_CANDIDATES)) -> dict[str, Any]:
    """Decoder seconds per phase and UNet seconds per batch-9 evaluation at the model grid (best of ``repeats``).

    ``coarse``: DVF decoders as ``"K"`` or ``"K:BASE"`` (coarse levels, base channels; default base 96)."""
    import torch

    from respmotion.diffusion.config import UNetConfig
    from respmotion.diffusion.unet import PhaseConditionedUNet
    from respmotion.models.autoencoder import Autoencoder, default_net_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out: dict[str, Any] = {"threads": threads, "latent_zyx": list(LATENT), "decoder": {}, "unet": {}}
    with torch.no_grad():
        for spec in coarse:
            k, _, base = spec.partition(":")
            ae = Autoencoder(default_net_config("dvf", coarse_levels=int(k), base_channels=int(base or 96))).eval()
            z = torch.randn(1, ae.cfg.latent_channels, *LATENT)
            ae.decode(z)  # warm-up (allocator, kernels)
            out["decoder"][spec] = {"params": _params(ae.decoder), "seconds_per_phase": round(
                _best_of(lambda: ae.decode(z), repeats), 2)}
            print("decoder", spec, out["decoder"][spec], file=sys.stderr, flush=True)
        for name in unets:
            cfg = UNetConfig(**UNET_CANDIDATES[name])
            net = PhaseConditionedUNet(cfg).eval()
            x = torch.randn(9, cfg.dvf_channels, *LATENT)
            img = torch.randn(1, cfg.image_channels, *LATENT)
            t = torch.full((9,), 500, dtype=torch.long)
            ph = torch.arange(1, 10)
            net(x, img, t, ph)
            out["unet"][name] = {"params": _params(net), "seconds_per_eval_batch9": round(
                _best_of(lambda: net(x, img, t, ph), repeats), 2)}
            print("unet", name, out["unet"][name], file=sys.stderr, flush=True)
    out["env"] = environment("cpu")
    return out


# ---------------------------------------------------------------------------- quality
def _demo_paths(demo: Path) -> dict[str, Path]:
    from respmotion.io.checkpoint import latest_checkpoint

    runs = demo / "runs"
    return {"data": demo / "data", "latents": demo / "latents",
            "image": latest_checkpoint(runs / "autoencoder_image"), "dvf": latest_checkpoint(runs / "autoencoder_dvf"),
            "diffusion": latest_checkpoint(runs / "diffusion")}


def _lung_recon_error(dvf_ckpt: Path, studies) -> float:
    """Mean over studies and phases 10..90 of the DVF VAE's lung reconstruction error (mm, full field)."""
    import numpy as np
    import torch

    from respmotion.anatomy.features import lung_features
    from respmotion.io.atomic import read_npy
    from respmotion.io.checkpoint import load_checkpoint
    from respmotion.io.layout import PHASES
    from respmotion.models.autoencoder import load_autoencoder
    from respmotion.models.prior import prior_from_record

    model = load_autoencoder(str(dvf_ckpt))
    prior = prior_from_record(load_checkpoint(dvf_ckpt)["extra"].get("motion_prior"), dvf_ckpt.parent)
    errs = []
    with torch.no_grad():
        for sd in studies:
            ref = sd.load_phase(0)
            features = lung_features(ref.array, ref.geometry.spacing) if prior is not None and prior.needs_features \
                else None
            for k in PHASES[1:]:
                fid = f"ref_{k:02d}"
                u = torch.from_numpy(sd.load_gt("ref", k).array.astype(np.float32))[None]
                coded = u if prior is None else torch.from_numpy(prior.residual(fid, u[0].numpy(), features))[None]
                recon = model.denormalize(model(model.normalize(coded)).recon)
                pred = recon if prior is None else prior.restore([fid], recon, features)
                lung = torch.from_numpy(read_npy(sd.mask_path("lung", k)) > 0)
                errs.append(float((pred - u)[0].norm(dim=0)[lung].mean()))
    return float(np.mean(errs))


def _evaluate_bundle(bundle: Path, test, train, out: Path, shape) -> dict[str, Any]:
    from respmotion.evaluation.synthesis_eval import run_evaluation
    from respmotion.synthesis.ldm import load_bundle

    report = run_evaluation(test, load_bundle(bundle, shape=tuple(shape)), train, out, samples=1, seed=0)
    return report["headline"]


def quality(demo: str, out: str, coarse: Sequence[str] = ("0", "1", "2"),
            unets: Sequence[tuple[int, ...]] = ((8, 16, 16), (16, 32, 32), (32, 64, 64)),
            chain: Sequence[str] = (), seed: int = 0) -> dict[str, Any]:
    """See the module docstring; ``coarse`` entries are ``"K"`` or ``"K:BASE"`` (coarse levels, and the DVF
    VAE's base channels when not the demo's); the demo's own DVF VAE and UNet are reused, not retrained.
    ``seed`` > 0: the diffusion runs (UNets and chains) train with that training seed instead of the
    demo's (run-to-run spread; the demo's own diffusion model is then retrained too)."""
    import torch

    from respmotion.config import from_dict, load_config
    from respmotion.demo import DemoConfig
    from respmotion.diffusion.latents import build_latent_set, read_provenance
    from respmotion.diffusion.pipeline import load_diffusion
    from respmotion.diffusion.train import DiffusionRunConfig, train_diffusion
    from respmotion.io.checkpoint import load_checkpoint
    from respmotion.models.autoencoder import AutoencoderNetConfig
    from respmotion.training.autoencoder import AutoencoderRunConfig, train_autoencoder
    from respmotion.training.splits import Split

    torch.set_num_threads(2)
    demo_dir, out_dir = Path(demo), Path(out)
    paths = _demo_paths(demo_dir)
    demo_cfg = load_config(DemoConfig, demo_dir / "demo_config.yaml")
    split = Split.from_dict(json.loads((demo_dir / "runs" / "autoencoder_dvf" / "split.json").read_text()))
    test, train = split.studies(paths["data"], "test"), split.studies(paths["data"], "train")
    res: dict[str, Any] = {"demo": str(demo_dir), "held_out": [s.key for s in test], "dvf_vae": {}, "unet": {},
                           "chain": {}}
    demo_dvf = load_checkpoint(paths["dvf"])
    dvf_cfg = from_dict(AutoencoderRunConfig, demo_dvf["config"])
    demo_levels = AutoencoderNetConfig.from_dict(demo_dvf["model_config"]).resolved().coarse_levels
    dvf_ckpts: dict[str, Path] = {}
    for spec in coarse:
        t0 = time.perf_counter()
        k, _, base = spec.partition(":")
        base_ch = int(base) if base else dvf_cfg.model.base_channels
        if int(k) == demo_levels and base_ch == dvf_cfg.model.base_channels:  # the demo's own DVF VAE
            dvf_ckpts[spec] = paths["dvf"]
        else:
            model = replace(dvf_cfg.model, coarse_levels=int(k), base_channels=base_ch)
            fit = train_autoencoder(replace(dvf_cfg, model=model, run_dir=str(out_dir / f"dvf_coarse{k}_base{base_ch}")))
            dvf_ckpts[spec] = Path(fit.model_path or fit.last_checkpoint)
        res["dvf_vae"][spec] = {"base_channels": base_ch,
                                "lung_error_mm_held_out": round(_lung_recon_error(dvf_ckpts[spec], test), 3),
                                "lung_error_mm_train": round(_lung_recon_error(dvf_ckpts[spec], train[:4]), 3),
                                "seconds": round(time.perf_counter() - t0, 1)}
    diff_cfg = from_dict(DiffusionRunConfig, load_checkpoint(paths["diffusion"])["config"])
    if seed:
        diff_cfg = replace(diff_cfg, train=replace(diff_cfg.train, seed=seed))
    res["diffusion_seed"] = diff_cfg.train.seed
    for ch in unets:
        t0 = time.perf_counter()
        name = "-".join(map(str, ch))
        if tuple(ch) == tuple(diff_cfg.model.unet.channels) and not seed:
            bundle = paths["diffusion"]
        else:
            unet = replace(diff_cfg.model.unet, channels=tuple(ch))
            cfg = replace(diff_cfg, model=replace(diff_cfg.model, unet=unet), run_dir=str(out_dir / f"diffusion_{name}_seed{diff_cfg.train.seed}"))
            fit = train_diffusion(cfg)
            bundle = Path(fit.model_path or fit.last_checkpoint)
        params = _params(load_diffusion(bundle)[0].unet)
        res["unet"][name] = {"params": params, **_evaluate_bundle(bundle, test, train, out_dir / f"eval_{name}",
                                                                  demo_cfg.shape),
                             "seconds": round(time.perf_counter() - t0, 1)}
    for k in chain:
        t0 = time.perf_counter()
        tag = k.replace(":", "_base")
        lat = out_dir / f"latents_coarse{tag}"
        if dvf_ckpts[k] == paths["dvf"]:
            lat = paths["latents"]  # the demo's own latent set
        elif not lat.exists():
            build_latent_set(paths["data"], lat, str(paths["image"]), str(dvf_ckpts[k]),
                             fields=tuple(read_provenance(paths["latents"])["fields"]))
        cfg = replace(diff_cfg, data=replace(diff_cfg.data, latents=str(lat)), run_dir=str(out_dir / f"diffusion_coarse{tag}_seed{diff_cfg.train.seed}"))
        fit = train_diffusion(cfg)
        bundle = Path(fit.model_path or fit.last_checkpoint)
        res["chain"][k] = {**_evaluate_bundle(bundle, test, train, out_dir / f"eval_coarse{tag}", demo_cfg.shape),
                                "seconds": round(time.perf_counter() - t0, 1)}
    res["env"] = environment("cpu")
    return res


# ---------------------------------------------------------------------------- sampler
def field_difference(fields, reference, lung) -> float:
    """``mean |u - u_ref| / mean |u_ref|`` over the ``lung`` voxels (bool ``(Z, Y, X)``) of every phase given.

    ``fields``, ``reference``: ``(P, 3, Z, Y, X)`` mm (torch); vector lengths per voxel.
    """
    diff = (fields - reference).norm(dim=1)[:, lung].mean()
    ref = reference.norm(dim=1)[:, lung].mean()
    return float(diff / ref)


def sampler_check(demo: str = "", bundle: str = "", steps: Sequence[int] = (5, 10, 15, 20), reference: int = 200,
                  seed: int = 0) -> dict[str, Any]:
    """DPM-Solver++(2M) and DDIM with N steps vs DDIM with ``reference`` steps, same model and noise,
    on the held-out patients of the demo's split (phase 00 CT in, lungs of phase 00)."""
    import numpy as np
    import torch

    from respmotion.diffusion.config import SamplerConfig
    from respmotion.diffusion.pipeline import MotionGenerator
    from respmotion.io.atomic import read_npy
    from respmotion.io.checkpoint import latest_checkpoint
    from respmotion.training.splits import Split

    torch.set_num_threads(2)
    demo_dir = Path(demo)
    path = latest_checkpoint(Path(bundle) if bundle else demo_dir / "runs" / "diffusion")
    gen = MotionGenerator.from_checkpoints(path)
    split = Split.from_dict(json.loads((demo_dir / "runs" / "autoencoder_dvf" / "split.json").read_text()))
    test = split.studies(demo_dir / "data", "test")
    T = gen.schedule.T
    samplers = {f"ddim{reference}": SamplerConfig(name="ddim", steps=reference)}
    for n in steps:
        samplers[f"dpmpp2m{n}"] = SamplerConfig(name="dpmpp2m", steps=n)
        samplers[f"ddim{n}"] = SamplerConfig(name="ddim", steps=n)
    per: dict[str, dict[str, float]] = {}
    secs: dict[str, float] = {}
    for sd in test:
        ct = sd.load_phase(0)
        lung = torch.from_numpy(read_npy(sd.mask_path("lung", 0)) > 0)
        out = {}
        for name, s in samplers.items():
            t0 = time.perf_counter()
            out[name] = gen.cycle(torch.as_tensor(ct.array), ct.geometry.spacing, s, seed).fields[0, 1:]
            secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0
        ref = out[f"ddim{reference}"]
        per[sd.key] = {name: round(field_difference(f, ref, lung), 4) for name, f in out.items() if f is not ref}
        per[sd.key]["mean_abs_u_ref_mm"] = round(float(ref.norm(dim=1)[:, lung].mean()), 3)
    names = [n for n in samplers if n != f"ddim{reference}"]
    return {"bundle": str(path), "timesteps": T, "reference": f"ddim {reference} steps (delta_t {T // reference})",
            "seed": seed, "held_out": [s.key for s in test], "per_study": per,
            "mean_rel_diff": {n: round(float(np.mean([per[k][n] for k in per])), 4) for n in names},
            "seconds": {n: round(v / len(test), 2) for n, v in secs.items()}, "env": environment("cpu")}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--coarse", default="0,1,2")
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--unets", default=",".join(UNET_CANDIDATES), help="names of UNET_CANDIDATES (comma-separated)")
    q = sub.add_parser("quality")
    q.add_argument("--demo", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--coarse", default="0,1,2")
    q.add_argument("--unet", default="8x16x16,16x32x32,32x64x64")
    q.add_argument("--chain", default="")
    q.add_argument("--seed", type=int, default=0, help="diffusion training seed (0: the demo's)")
    s = sub.add_parser("sampler")
    s.add_argument("--demo", required=True)
    s.add_argument("--bundle", default="")
    s.add_argument("--steps", default="5,10,15,20")
    s.add_argument("--reference-ddim", type=int, default=200)
    a = p.parse_args(argv)
    if a.cmd == "timing":
        res = timing(a.threads, tuple(c for c in a.coarse.split(",") if c), a.repeats,
                     tuple(u for u in a.unets.split(",") if u))
    elif a.cmd == "quality":
        unets = tuple(tuple(int(c) for c in u.split("x")) for u in a.unet.split(",") if u)
        res = quality(a.demo, a.out, tuple(c for c in a.coarse.split(",") if c), unets,
                      tuple(c for c in a.chain.split(",") if c), a.seed)
    else:
        res = sampler_check(a.demo, a.bundle, _ints(a.steps), a.reference_ddim)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
