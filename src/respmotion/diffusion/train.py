"""``train_diffusion``: the diffusion model on a latent set, run by the shared engine.

Patients: by default the DVF autoencoder's split recorded in the latent set's provenance (so
the diffusion model never trains on the autoencoders' validation/test patients); without one,
a fresh patient-level split with ``data.split_ratios`` / ``data.split_seed``.  Latent
statistics (per-channel mean/std of DVF and image latents) come from the training patients and
are stored inside the model (see :mod:`respmotion.diffusion.model`).  The DVF autoencoder's motion
prior record (path, sha256; :mod:`respmotion.models.prior`) is copied into the checkpoint's
``extra["motion_prior"]`` (the latents are residuals to it) and its grid into ``extra["input_shape"]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import save_config, to_dict
from ..io.atomic import read_json, write_json
from ..training import distributed as D
from ..training.checkpoint import own_run_dir
from ..training.engine import FitResult, TrainConfig, Trainer
from ..training.splits import Split, split_patients
from .config import DiffusionModelConfig, SamplerConfig
from .latents import LatentDataset, channel_stats, image_deviation_stats, read_provenance
from .sampling import LatentNorm
from .task import DiffusionTask

log = logging.getLogger("respmotion")


@dataclass
class DiffusionDataConfig:
    latents: str = ""  # latent set folder (respmotion latents --out)
    split_from_autoencoder: bool = True  # reuse the DVF autoencoder's patient split when recorded
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 42
    stats_items: int = 256  # training items used for the latent statistics


@dataclass
class DiffusionRunConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # default for later sampling, stored
    ema_decay: float = 0.999
    out: str = "runs"  # runs go to <out>/diffusion/<timestamp>/
    run_dir: str = ""


def make_split(cfg: DiffusionRunConfig, prov: dict) -> Split:
    recorded = (prov.get("dvf_autoencoder") or {}).get("split")
    if cfg.data.split_from_autoencoder and recorded:
        return Split.from_dict(recorded)
    patients = sorted({p.parent.parent.name for p in Path(cfg.data.latents).glob("*/*/latents.json")})  # <patient>/<study>/
    return split_patients(patients, cfg.data.split_ratios, cfg.data.split_seed)


def _new_run_dir(cfg: DiffusionRunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    base = Path(cfg.out) / "diffusion" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}_{i}"), i + 1
    return path


def train_diffusion(cfg: DiffusionRunConfig, resume: str | Path | None = None,
                    init: str | Path | None = None) -> FitResult:
    """Train the latent diffusion model; every torchrun rank calls this (see the engine)."""
    if not cfg.data.latents:
        raise ValueError("no latent set given (data.latents / --latents)")
    prov = read_provenance(cfg.data.latents)
    info = D.setup(cfg.train.device)
    try:
        if resume is not None:
            from ..training.checkpoint import latest_checkpoint

            resume = latest_checkpoint(resume)
            run_dir = resume.parent
        else:
            run_dir = D.broadcast_object(_new_run_dir(cfg) if info.is_main else None, info)
        with own_run_dir(run_dir, "diffusion", resume is not None, info.is_main):
            return _train_in(cfg, prov, run_dir, info, resume, init)
    finally:
        D.cleanup()


def _train_in(cfg: DiffusionRunConfig, prov: dict, run_dir: Path, info, resume: Path | None,
              init: str | Path | None) -> FitResult:
    """The body of :func:`train_diffusion` once ``run_dir`` is owned."""
    split = make_split(cfg, prov)
    if resume is not None and (run_dir / "split.json").exists():
        split = Split.from_dict(read_json(run_dir / "split.json"))
    train_set = LatentDataset(cfg.data.latents, split.train, cfg.model.target)
    val_set = LatentDataset(cfg.data.latents, split.val, cfg.model.target) if split.val else None
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.latents}: no '{cfg.model.target}' latents for the training patients "
                         f"{list(split.train)}")
    sample = train_set[0]
    u = cfg.model.unet
    if sample["x"].shape[0] != u.dvf_channels or sample["image"].shape[0] != u.image_channels:
        raise ValueError(f"latents have {sample['x'].shape[0]} DVF / {sample['image'].shape[0]} image channels; "
                         f"model.unet expects {u.dvf_channels} / {u.image_channels}")
    img_norm = LatentNorm(*channel_stats(train_set, "image", cfg.data.stats_items))
    image_dev = image_deviation_stats(train_set) if cfg.model.image_condition != "plain" else None
    dvf_norm = LatentNorm(*channel_stats(train_set, "x", cfg.data.stats_items))
    prior = prov["dvf_autoencoder"].get("motion_prior") or {"mode": "none"}
    extra = {"split": split.to_dict(), "latents": str(Path(cfg.data.latents).resolve()),
             "latent_provenance": {k: prov[k] for k in ("image_autoencoder", "dvf_autoencoder", "fields")},
             "motion_prior": prior}
    if prior.get("shape"):
        extra["input_shape"] = list(prior["shape"])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "split.json", split.to_dict())
        log.info("run folder %s: %d train / %d val latents (%s mode), patients %d | %d | %d", run_dir,
                 len(train_set), len(val_set) if val_set else 0, cfg.model.target, len(split.train),
                 len(split.val), len(split.test))
    D.barrier(info)
    task = DiffusionTask(cfg.model, img_norm, dvf_norm, cfg.ema_decay, cfg.train.steps, extra, cfg.sampler,
                         image_dev)
    trainer = Trainer(task, train_set, val_set, cfg.train, run_dir, to_dict(cfg), info)
    return trainer.fit(resume=resume, init=init)
