"""``train_diffusion``: the diffusion model on a latent set, run by the shared engine.

Patients: by default the DVF autoencoder's split recorded in the latent set's provenance (so
the diffusion model never trains on the autoencoders' validation/test patients); without one,
a fresh patient-level split with ``data.patient_split`` (ratios, seed).  Latent
statistics (per-channel mean/std of DVF and image latents) come from the training patients and
are stored inside the model (see :mod:`respmotion.diffusion.model`).  The DVF autoencoder's motion
prior record (path, sha256; :mod:`respmotion.models.prior`) is copied into the checkpoint's
``extra["motion_prior"]`` (the latents are residuals to it) and its grid into ``extra["input_shape"]``.
The autoencoders' records also give their path relative to the run folder (``relpath``): a run tree
moved or copied elsewhere still loads (:meth:`respmotion.diffusion.pipeline.MotionGenerator.from_checkpoints`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import ClassVar
from pathlib import Path

from ..training.engine import FitResult, TrainConfig
from ..training.run import Run, run_training
from ..training.splits import SPLIT_RENAMED, Split, SplitSettings
from .config import DEFAULT_SAMPLER, DiffusionModelConfig, SamplerConfig
from .latents import LatentDataset, anatomy_stats, channel_stats, image_deviation_stats, read_provenance
from .sampling import LatentNorm
from .task import DiffusionTask


@dataclass
class DiffusionDataConfig:
    latents: str = ""  # latent set folder (respmotion latents --out)
    split_from_autoencoder: bool = True  # reuse the DVF autoencoder's patient split when recorded
    patient_split: SplitSettings = field(default_factory=SplitSettings)
    stats_items: int = 256  # training items used for the latent statistics

    RENAMED: ClassVar[dict[str, str]] = SPLIT_RENAMED


@dataclass
class DiffusionRunConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=lambda: replace(DEFAULT_SAMPLER))  # default for later sampling, stored
    ema_decay: float = 0.999
    val_samples: int = 4  # latents sampled per validation item: energy score, mean error, spread in TensorBoard
    out: str = "runs"  # runs go to <out>/diffusion/<timestamp>/
    run_dir: str = ""


def make_split(cfg: DiffusionRunConfig, prov: dict) -> Split:
    recorded = (prov.get("dvf_autoencoder") or {}).get("split")
    if cfg.data.split_from_autoencoder and recorded:
        return Split.from_dict(recorded)
    patients = sorted({p.parent.parent.name for p in Path(cfg.data.latents).glob("*/*/latents.json")})  # <patient>/<study>/
    return cfg.data.patient_split.cut(patients)


def _beside(record: dict, run_dir: Path) -> dict:
    """An autoencoder record with its path also relative to the bundle's folder (``relpath``), so a moved
    or copied run tree still finds it (:func:`respmotion.io.checkpoint.recorded_file`)."""
    return {**record, "relpath": os.path.relpath(record["path"], Path(run_dir).resolve())}


def train_diffusion(cfg: DiffusionRunConfig, resume: str | Path | None = None,
                    init: str | Path | None = None) -> FitResult:
    """Train the latent diffusion model; every torchrun rank calls this (see the engine)."""
    if not cfg.data.latents:
        raise ValueError("no latent set given (data.latents / --latents)")
    prov = read_provenance(cfg.data.latents)
    return run_training("diffusion", cfg.out, cfg.run_dir, cfg.train.device, resume,
                        lambda run: _train_in(cfg, prov, run, init))


def _train_in(cfg: DiffusionRunConfig, prov: dict, run: Run, init: str | Path | None) -> FitResult:
    """The body of :func:`train_diffusion` once the run folder is owned."""
    split = run.split(make_split(cfg, prov))
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
    by_phase = cfg.model.unet.num_phases if cfg.model.dvf_norm == "phase" else 0
    dvf_norm = LatentNorm(*channel_stats(train_set, "x", cfg.data.stats_items, by_phase))
    anatomy = anatomy_stats(train_set) if cfg.model.anatomy_condition else None
    prior = prov["dvf_autoencoder"].get("motion_prior") or {"mode": "none"}
    extra = {"split": split.to_dict(), "latents": str(Path(cfg.data.latents).resolve()),
             "latent_provenance": {**{k: _beside(prov[k], run.run_dir) for k in ("image_autoencoder", "dvf_autoencoder")},
                                   "fields": prov["fields"]},
             "motion_prior": prior}
    if prior.get("shape"):
        extra["input_shape"] = list(prior["shape"])
    run.start(cfg, split, f"{len(train_set)} train / {len(val_set) if val_set else 0} val latents "
                          f"({cfg.model.target} mode)")
    task = DiffusionTask(cfg.model, img_norm, dvf_norm, cfg.ema_decay, cfg.train.steps, extra, cfg.sampler,
                         image_dev, anatomy, cfg.val_samples)
    return run.fit(task, train_set, val_set, cfg.train, cfg, init)
