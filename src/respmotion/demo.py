"""The end-to-end demo: every stage of the pipeline on a small synthetic cohort, on a laptop CPU.

phantom cohort -> B-spline registration (phase k to 00) -> image autoencoder and DVF VAE
(trained on the exact motion or the registration fields, see below) -> latent set -> phase-conditioned latent diffusion ->
synthesis of a held-out patient from its end-inhale CT -> GIFs -> evaluation against the
phantom's exact motion, the zero field and the population-mean field.

Small shapes and short schedules (config below) keep it within minutes on 2 CPU cores; the
same commands run at full size (50x256x256) with the default configs.

Training targets (``train_fields``): the DVF models learn the phantom's exact motion (``gt``,
default) or the registration fields (``registration``, what a real cohort gives); ``gt`` because at the
demo's coarse grid the registration errs by more than the population-mean field does.  Registration
runs in every demo: with ``gt`` on the held-out patients only (their error against the exact motion is
reported in ``demo_summary.json``, ``registration_error_mm``), with ``registration`` on all.  Measured
figures and the reasons for the settings below: ``docs/demo.md``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import load_config, save_config
from .registration.config import FFDSettings
from .runtime import use_threads

log = logging.getLogger("respmotion")


@dataclass
class DemoConfig:
    out: str = "out/demo"
    patients: int = 48  # 38 train / 5 val / 5 held out (docs/demo.md: why not fewer)
    seed: int = 0
    shape: tuple[int, int, int] = (16, 64, 64)
    threads: int = 2  # torch threads (0: every CPU this process may use)
    device: str = "cpu"
    # the trained bundle's networks in synthesis and evaluation (runtime.resolve_precision): auto = bf16 where the CPU
    # has it (a third faster here; held-out scores within 0.003 mm of fp32, docs/synthesis.md), else fp32
    precision: str = "auto"
    # registration settings for the demo's coarse grid (the defaults suit 50x256x256): control points every
    # 1 x 3 x 3 voxels (9.4 x 16.9 x 16.9 mm, near the default's 9 x 11.2 x 11.2 mm), two levels (a third would
    # be 4 slices deep).  Lung error vs the exact motion on the held-out pair 1.58 mm (the default levels,
    # stride and 30/20/15 iterations: 5.45 mm), ~5 s a study.
    ffd: FFDSettings = field(default_factory=lambda: FFDSettings(
        stride=(1.0, 3.0, 3.0), levels=((2, 2, 2), (1, 1, 1)), iterations=(60, 40), lr_mm=(2.0, 1.0),
        subsample=((1, 1, 1), (1, 1, 1))))
    ae_steps: int = 100
    dvf_steps: int = 600  # its reconstruction error is the floor of the generated motion (docs/demo.md)
    diffusion_steps: int = 500
    train_fields: str = "gt"  # gt: phantom's exact motion; registration: the registration stage's fields
    motion_prior: str = "regressed"  # DVF VAE codes (u - prior regressed on the CT's lung features) / phase scale (models.prior)
    image_condition: str = "both"  # diffusion conditioning on the image latent (see diffusion.model.ImageCondition)
    ae_channels: int = 8
    dvf_coarse_levels: int = 0  # full-resolution DVF decoder (1 level coarser lost to the population mean here: docs/demo.md)
    unet_channels: tuple[int, int, int] = (16, 32, 32)
    sampler: str = "dpmpp2m"
    sampling_steps: int = 20
    samples: int = 2  # cycles synthesized for the example patient
    eval_samples: int = 8  # cycles per held-out patient in the evaluation (K-sample mean, energy score, spread)
    anatomy_condition: bool = True  # diffusion also conditioned on the CT's lung features (docs/diffusion.md)
    extra: dict = field(default_factory=dict)  # free-form notes kept with the resolved config


def _train_config(steps: int, lr: float, batch: int, device: str):
    """The engine settings of the demo's short runs (fp32, one validation and checkpoint at the end)."""
    from .training.engine import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch, grad_accum=1, lr_max=lr, lr_min=lr / 20,
                       warmup_steps=min(20, steps // 10), num_workers=0, val_every=steps, ckpt_every=steps,
                       image_every=0, log_every=50, device=device, precision="fp32")


def _autoencoder_config(cfg: DemoConfig, kind: str, steps: int, data: Path, fields: str, run_dir: Path):
    """The run config of the demo's image autoencoder or DVF VAE (small network, split seed = demo seed)."""
    from .models.autoencoder import AutoencoderNetConfig
    from .training.autoencoder import AEDataConfig, AutoencoderRunConfig
    from .training.splits import SplitSettings

    return AutoencoderRunConfig(
        kind=kind, data=AEDataConfig(root=str(data), field_source=fields, patient_split=SplitSettings(seed=cfg.seed),
                                     motion_prior=cfg.motion_prior),
        model=AutoencoderNetConfig(base_channels=cfg.ae_channels, norm_groups=8, dropout=0.0,
                                   coarse_levels=cfg.dvf_coarse_levels if kind == "dvf" else None),
        run_dir=str(run_dir), train=_train_config(steps, 3e-3, 2, cfg.device))


def _diffusion_config(cfg: DemoConfig, latents: Path, run_dir: Path):
    """The run config of the demo's diffusion model (small UNet, no attention, the demo's sampler)."""
    from .diffusion.config import DiffusionModelConfig, SamplerConfig, UNetConfig
    from .diffusion.train import DiffusionDataConfig, DiffusionRunConfig

    unet = UNetConfig(channels=tuple(cfg.unet_channels), attention_levels=(False,) * len(cfg.unet_channels),
                      norm_num_groups=8, num_head_channels=8, num_res_blocks=1)
    return DiffusionRunConfig(
        model=DiffusionModelConfig(unet=unet, image_condition=cfg.image_condition,
                                   anatomy_condition=cfg.anatomy_condition),
        data=DiffusionDataConfig(latents=str(latents)), ema_decay=0.99,
        sampler=SamplerConfig(name=cfg.sampler, steps=cfg.sampling_steps), run_dir=str(run_dir),
        train=_train_config(cfg.diffusion_steps, 2e-3, 8, cfg.device))


def _registration_error(studies, reg: Path) -> dict:
    """Mean lung DVF error (mm) of the registration fields against the phantom's exact motion,
    per phase and averaged over phases 10..90, on ``studies``."""
    import numpy as np

    from .io.atomic import read_npy
    from .training.data import RegistrationFields

    src = RegistrationFields(str(reg), "ref")
    per: dict[str, list[float]] = {}
    for s in studies:
        for fid in src.field_ids(s):
            k = int(fid.split("_")[1])
            lung = read_npy(s.mask_path("lung", k)) > 0
            err = np.linalg.norm(src.load(s, fid).array - s.load_gt("ref", k).array, axis=0)[lung].mean()
            per.setdefault(f"{k:02d}", []).append(float(err))
    means = {k: float(np.mean(v)) for k, v in sorted(per.items())}
    return {"per_phase": means, "mean": float(np.mean(list(means.values()))) if means else float("nan")}


def _generator_table(report: dict) -> dict[str, dict[str, float]]:
    """Per-phase rows of the printed summary (mm, mean over the held-out patients): the model's single sample,
    K-sample mean, energy score and spread, its motion prior without the network, the population-mean field and
    no motion."""
    gen = report.get("generator") or {}
    dvf = report.get("dvf_error_per_phase") or {}
    rows = {"model, one sample": gen.get("single_sample_error") or dvf.get("model"),
            "model, mean of K samples": gen.get("mean_error"), "model, energy score": gen.get("energy_score"),
            "model, spread of samples": gen.get("spread"), "model's prior, no network": dvf.get("model_prior"),
            "population-mean field": dvf.get("population_mean"), "no motion": dvf.get("zero")}
    return {name: {k: round(float(v), 3) for k, v in sorted(row.items(), key=lambda kv: int(kv[0])) if k != "00"}
            for name, row in rows.items() if row}


STAGE_OUTPUTS = ("data", "registration", "runs", "latents", "synthesis", "evaluation", "demo_summary.json")


def prepare_out(out: Path) -> None:
    """A demo starts from nothing: the outputs of an earlier demo in ``out`` (it holds
    ``demo_config.yaml``) are removed, so no stage mixes old models with new ones; any other
    non-empty folder is refused rather than touched."""
    import shutil

    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "demo_config.yaml").is_file():
        raise ValueError(f"{out}: not empty and not the output of an earlier demo; choose another --out")
    log.info("removing the earlier demo's outputs in %s", out)
    for name in STAGE_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns a summary with the output paths and headline numbers."""
    from .data.phantom import write_cohort
    from .diffusion.latents import build_latent_set
    from .diffusion.train import train_diffusion
    from .evaluation.synthesis_eval import run_evaluation
    from .registration.config import RegisterConfig
    from .registration.pipeline import run_registration
    from .synthesis.ldm import load_bundle
    from .synthesis.pipeline import SynthesisOptions
    from .synthesis.run import SynthesizeConfig, run_synthesis
    from .training.autoencoder import train_autoencoder
    from .training.splits import SPLIT_RATIOS, Split, split_cohort
    from .runtime import resolve_precision

    if cfg.patients < 3:
        raise ValueError(f"the demo needs at least 3 patients (train, validation, held-out), got {cfg.patients}")
    if cfg.train_fields not in ("gt", "registration"):
        raise ValueError(f"train_fields must be gt or registration, got {cfg.train_fields!r}")
    resolve_precision(cfg.precision, cfg.device)  # refused now, not after the training
    use_threads(cfg.threads)
    out = Path(cfg.out)
    prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    times: dict[str, float] = {}

    def stage(name: str):
        log.info("== demo: %s", name)
        times[name] = time.perf_counter()

    def done(name: str):
        times[name] = round(time.perf_counter() - times[name], 1)
        log.info("   %s took %.1f s", name, times[name])

    data, reg = out / "data", out / "registration"
    stage("phantom")
    write_cohort(data, cfg.patients, cfg.seed, cfg.shape, progress=True)
    done("phantom")

    # the autoencoder runs split the patients like this (same ids, ratios and seed); with train_fields=gt
    # only the held-out patients' registrations are used (their error is reported), so only they are registered
    held_out = split_cohort(data, SPLIT_RATIOS, cfg.seed).test
    stage("registration")
    rcfg = load_config(RegisterConfig, None, {"data": str(data), "out": str(reg), "pairs": "ref",
                                              "device": cfg.device, "threads": cfg.threads})
    rcfg.ffd = cfg.ffd
    if cfg.train_fields == "gt":
        rcfg.patients = tuple(held_out)
    run_registration(rcfg)
    done("registration")
    fields = "gt_ref" if cfg.train_fields == "gt" else f"reg_ref@{reg}"

    runs = out / "runs"
    ae_paths = {}
    for kind, steps in (("image", cfg.ae_steps), ("dvf", cfg.dvf_steps)):
        stage(f"autoencoder_{kind}")
        res = train_autoencoder(_autoencoder_config(cfg, kind, steps, data, fields, runs / f"autoencoder_{kind}"))
        ae_paths[kind] = str(res.model_path or res.last_checkpoint)
        done(f"autoencoder_{kind}")

    stage("latents")
    lat = out / "latents"
    build_latent_set(data, lat, ae_paths["image"], ae_paths["dvf"], fields=(fields,), device=cfg.device)
    done("latents")

    stage("diffusion")
    dres = train_diffusion(_diffusion_config(cfg, lat, runs / "diffusion"))
    bundle = str(dres.model_path or dres.last_checkpoint)
    done("diffusion")

    split = Split.from_dict(json.loads((runs / "autoencoder_dvf" / "split.json").read_text()))
    if tuple(split.test) != tuple(held_out):
        raise RuntimeError(f"{runs / 'autoencoder_dvf' / 'split.json'}: held-out patients {split.test} differ from "
                           f"the demo's {held_out}")
    test, train = split.studies(data, "test"), split.studies(data, "train")

    stage("synthesis")
    syn = out / "synthesis"
    scfg = SynthesizeConfig(ct=str(test[0].path), out=str(syn), model=bundle, device=cfg.device,
                            precision=cfg.precision, heatmap=False,
                            fps=2.0, options=SynthesisOptions(samples=cfg.samples, seed=cfg.seed))
    summary = run_synthesis(scfg)
    save_config(scfg, syn / "config.yaml")
    done("synthesis")

    stage("evaluation")
    model = load_bundle(bundle, device=cfg.device, shape=tuple(cfg.shape), precision=cfg.precision)
    ev = out / "evaluation"
    report = run_evaluation(test, model, train, ev, samples=cfg.eval_samples, seed=cfg.seed,
                            title="respmotion demo (held-out phantom)")
    done("evaluation")

    result = {
        "outputs": {"data": str(data), "registration": str(reg), "runs": str(runs), "latents": str(lat),
                    "synthesis": str(syn), "gifs": summary.get("gifs", []), "evaluation": str(ev),
                    "report": str(ev / "report.json"), "summary_png": str(ev / "summary.png"),
                    "summary_html": str(ev / "summary.html")},
        "held_out": [s.key for s in test],
        "train_fields": fields,
        "headline": report["headline"],
        "generator_per_phase": _generator_table(report),
        "registration_error_mm": _registration_error(test, reg),
        "seconds": times,
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
