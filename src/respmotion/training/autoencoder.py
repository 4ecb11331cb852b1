"""Autoencoder stage: config, the engine task, ``train_autoencoder`` and ``evaluate_autoencoder``.

``kind="image"``: CT volumes of every phase (HU -> [-1, 1]), loss :class:`~respmotion.models.losses.LPELoss`.
``kind="dvf"``: displacement fields of a field source (mm -> mm / 10), VAE with
:class:`~respmotion.models.losses.DVFLoss` + KL.  By default (``data.motion_prior="mean"``) the
VAE learns the residual ``u - u_bar[id]`` to the training patients' mean field of each target
(:mod:`respmotion.models.prior`), saved as ``<run>/motion_prior.npy`` and recorded (path,
sha256) in every checkpoint's ``extra["motion_prior"]``.  Patients are split train/val/test with a fixed
seed; the split is stored in the run folder (``split.json``) and in every checkpoint, and
evaluation uses the stored test patients.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..config import save_config, to_dict
from ..io.atomic import write_json
from ..io.layout import PHASES, list_patients
from ..models.autoencoder import Autoencoder, AutoencoderNetConfig, default_net_config, kl_divergence
from ..models.losses import VIEWS, DVFLoss, LPELoss
from ..models.prior import JSON as PRIOR_JSON
from ..models.prior import NPY as PRIOR_NPY
from ..models.prior import PRIOR_MODES, MotionPrior
from . import distributed as D
from .data import FieldDataset, VolumeDataset, field_source, studies_of
from .checkpoint import own_run_dir
from .engine import FitResult, Task, TrainConfig, Trainer, unwrap
from .splits import Split, split_patients

log = logging.getLogger("respmotion")


# ---------------------------------------------------------------------------- config
@dataclass
class AEDataConfig:
    root: str = ""  # cohort folder (respmotion.io.layout)
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test (patient level)
    split_seed: int = 42
    phases: list[int] = field(default_factory=lambda: list(PHASES))  # image AE: phases used
    field_source: str = "gt_step"  # DVF AE: gt_step | gt_ref (phantom) | reg_ref@DIR | reg_step@DIR
    # DVF AE: "mean" = learn the residual to the per-target mean field of the training patients
    # (respmotion.models.prior; written to <run>/motion_prior.npy), "none" = the full field (research code)
    motion_prior: str = "mean"


@dataclass
class AEModelConfig:
    """Architecture; ``None`` entries take the kind's default (image 1->3 AE, dvf 3->9 VAE)."""

    in_channels: int | None = None
    out_channels: int | None = None
    latent_channels: int | None = None
    variational: bool | None = None
    base_channels: int = 96
    channel_mults: tuple[int, ...] = (1, 2, 4)
    res_units_per_level: int = 1
    downsample_depth: bool = False
    dropout: float = 0.05
    norm_groups: int = 32
    act: str = "swish"
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    dvf_scale_mm: float = 10.0


@dataclass
class ImageLossConfig:
    l1_weight: float = 0.8
    ssim_weight: float = 0.2
    edge_weight: float = 0.0
    views: list[str] = field(default_factory=lambda: list(VIEWS))
    ssim_win: int = 11


@dataclass
class DVFLossConfig:
    l1_weight: float = 1.0  # mean |error| in mm
    mse_weight: float = 0.0  # mean error^2 in mm^2
    smooth_weight: float = 0.0  # MONAI DiffusionLoss of the prediction (mm^2 / voxel^2)
    bending_weight: float = 0.0  # MONAI BendingEnergyLoss of the prediction
    kl_weight: float = 1e-7  # times KL summed over latent elements (research code's weight)
    kl_warmup_steps: int = 0  # KL weight ramps linearly from 0 over these steps


@dataclass
class AutoencoderRunConfig:
    kind: str = "image"  # image | dvf
    data: AEDataConfig = field(default_factory=AEDataConfig)
    model: AEModelConfig = field(default_factory=AEModelConfig)
    image_loss: ImageLossConfig = field(default_factory=ImageLossConfig)
    dvf_loss: DVFLossConfig = field(default_factory=DVFLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs"  # runs go to <out>/autoencoder_<kind>/<timestamp>/
    run_dir: str = ""  # explicit run folder instead (resume uses the checkpoint's folder)
    latent_scale_items: int = 16  # training items encoded to estimate the latent scale


def net_config(cfg: AutoencoderRunConfig) -> AutoencoderNetConfig:
    """The architecture of ``cfg``: the kind's defaults with the explicit settings on top."""
    m = dataclasses.asdict(cfg.model)
    overrides = {k: v for k, v in m.items() if v is not None}
    overrides["channel_mults"] = tuple(overrides["channel_mults"])
    return default_net_config(cfg.kind, **overrides)


def resolve(cfg: AutoencoderRunConfig) -> AutoencoderRunConfig:
    """Fill kind-dependent ``None`` model settings so the saved config states them."""
    net = net_config(cfg)
    for k in ("in_channels", "out_channels", "latent_channels", "variational"):
        setattr(cfg.model, k, getattr(net, k))
    return cfg


# ---------------------------------------------------------------------------- task
def _unit(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


class AutoencoderTask(Task):
    """Engine task of the image AE / DVF VAE (loss in network units; DVF error in mm)."""

    def __init__(self, cfg: AutoencoderRunConfig, split: Split, prior: MotionPrior | None = None) -> None:
        self.cfg, self.split, self.prior = cfg, split, prior
        self.net = net_config(cfg)
        self.name = f"autoencoder_{cfg.kind}"
        il, dl = cfg.image_loss, cfg.dvf_loss
        if cfg.kind == "image":
            self.loss_fn: nn.Module = LPELoss(il.l1_weight, il.ssim_weight, il.edge_weight, il.views, il.ssim_win)
        else:
            self.loss_fn = DVFLoss(self.net.dvf_scale_mm, dl.l1_weight, dl.mse_weight, dl.smooth_weight,
                                   dl.bending_weight, dl.kl_weight)

    def build_model(self) -> nn.Module:
        return Autoencoder(self.net)

    def model_config(self) -> dict[str, Any]:
        return self.net.to_dict()

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x = unwrap(model).normalize(batch["x"])
        out = model(x)
        recon = out.recon.float()
        if self.cfg.kind == "image":
            terms = self.loss_fn(recon, x)
            if "ssim" in terms:  # the loss term is 1 - SSIM: logged under that name, not as an SSIM
                terms["one_minus_ssim"] = terms.pop("ssim")
            return terms
        kl = kl_divergence(out.mu.float(), out.logvar.float()) if out.logvar is not None else None
        warm = self.cfg.dvf_loss.kl_warmup_steps
        return self.loss_fn(recon, x, kl, min(1.0, step / warm) if warm > 0 else 1.0)

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = model.normalize(batch["x"][:1])
        y = model(x).recon.float()
        if self.cfg.kind == "dvf":  # displacement magnitude
            x, y = x.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
        z, h = x.shape[2] // 2, x.shape[3] // 2
        out = {}
        for view, sl in (("axial", (slice(None), slice(None), z)), ("coronal", (slice(None), slice(None), slice(None), h))):
            pair = torch.cat([x[0][sl[1:]], y[0][sl[1:]]], dim=-1)  # input | reconstruction
            out[f"recon/{view}"] = _unit(pair)
        return out

    def extra(self, model: nn.Module) -> dict[str, Any]:
        out = {"kind": self.cfg.kind, "split": self.split.to_dict(), "latent_scale": float(model.latent_scale)}
        if self.cfg.kind == "dvf":
            out["motion_prior"] = self.prior.record() if self.prior is not None else {"mode": "none"}
        return out

    @torch.no_grad()
    def on_train_end(self, model: nn.Module, train_set: Dataset, device: torch.device) -> None:
        """Set ``latent_scale = 1 / std`` of the latent means of up to ``latent_scale_items`` items."""
        n = min(len(train_set), self.cfg.latent_scale_items)
        idx = np.linspace(0, len(train_set) - 1, n).round().astype(int) if n else []
        zs = [model.encode(model.normalize(train_set[int(i)]["x"][None].to(device))).float().flatten() for i in idx]
        if zs:
            std = float(torch.cat(zs).std())
            model.latent_scale.fill_(1.0 / std if std > 0 else 1.0)
            log.info("latent std %.4f -> latent_scale %.4f", std, float(model.latent_scale))


# ---------------------------------------------------------------------------- data
def make_split(cfg: AutoencoderRunConfig) -> Split:
    patients = list_patients(cfg.data.root)
    if not patients:
        raise ValueError(f"{cfg.data.root}: no studies to train on (no complete study with a study.json)")
    return split_patients(patients, cfg.data.split_ratios, cfg.data.split_seed)


def make_dataset(cfg: AutoencoderRunConfig, patients: tuple[str, ...] | list[str], root: str | None = None,
                 prior: MotionPrior | None = None) -> Dataset:
    """Items of ``patients``; DVF items are residuals to ``prior`` when one is given (else full fields)."""
    studies = studies_of(root or cfg.data.root, patients)
    if cfg.kind == "image":
        return VolumeDataset(studies, cfg.data.phases)
    return FieldDataset(studies, field_source(cfg.data.field_source), prior)


def build_prior(cfg: AutoencoderRunConfig, split: Split) -> MotionPrior:
    """Per-field-id mean of the training patients' fields (the DVF AE's own training targets)."""
    ds = make_dataset(cfg, split.train)
    meta = {"patients": list(split.train), "field_source": cfg.data.field_source, "data": str(Path(cfg.data.root).resolve())}
    return MotionPrior.from_fields((ds.raw(i) for i in range(len(ds))), meta)


def _prior_for_run(cfg: AutoencoderRunConfig, split: Split, run_dir: Path, info) -> MotionPrior | None:
    """Compute (rank 0) and save the prior in ``run_dir``, or reuse the one a resumed run wrote."""
    if cfg.kind != "dvf" or cfg.data.motion_prior == "none":
        return None
    if cfg.data.motion_prior not in PRIOR_MODES:
        raise ValueError(f"data.motion_prior must be one of {PRIOR_MODES}, got {cfg.data.motion_prior!r}")
    if info.is_main and not (run_dir / PRIOR_JSON).exists():  # the .json is written last
        run_dir.mkdir(parents=True, exist_ok=True)
        build_prior(cfg, split).save(run_dir)
    D.barrier(info)
    prior = MotionPrior.load(run_dir / PRIOR_NPY)
    if sorted(prior.meta.get("patients") or []) != sorted(split.train):
        raise ValueError(f"{run_dir / PRIOR_NPY}: computed from patients {prior.meta.get('patients')}, "
                         f"not this run's training patients {list(split.train)}")
    return prior


def _check_resumable(path: Path, cfg: AutoencoderRunConfig) -> None:
    """A one-line error naming ``path`` when it is unreadable, of another model kind, or holds weights
    that do not fit the run's model (checked before anything in the run folder is written)."""
    from ..io.torchfile import load_state
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    task = str(ckpt.get("task", ""))
    if task != f"autoencoder_{cfg.kind}":
        raise ValueError(f"{path}: a checkpoint of task {task!r}, cannot resume a {cfg.kind!r} autoencoder run")
    load_state(Autoencoder(net_config(cfg)), ckpt.get("model"), path)


def _new_run_dir(cfg: AutoencoderRunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    base = Path(cfg.out) / f"autoencoder_{cfg.kind}" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}_{i}"), i + 1
    return path


# ---------------------------------------------------------------------------- train
def train_autoencoder(
    cfg: AutoencoderRunConfig, resume: str | Path | None = None, init: str | Path | None = None
) -> FitResult:
    """Train an autoencoder; ``resume`` = a run folder or checkpoint to continue exactly,
    ``init`` = a checkpoint whose weights start a new run (its config kept as ``prev_config.yaml``).

    Run under ``torchrun`` for DDP; every rank calls this function.
    """
    if cfg.kind not in ("image", "dvf"):
        raise ValueError(f"kind must be image or dvf, got {cfg.kind!r}")
    if not cfg.data.root:
        raise ValueError("no dataset folder given (data.root / --data)")
    cfg = resolve(cfg)
    info = D.setup(cfg.train.device)
    try:
        if resume is not None:
            from .checkpoint import latest_checkpoint

            resume = latest_checkpoint(resume)
            _check_resumable(resume, cfg)  # before anything is logged or written
            run_dir = resume.parent
        else:
            run_dir = D.broadcast_object(_new_run_dir(cfg) if info.is_main else None, info)
        with own_run_dir(run_dir, f"autoencoder_{cfg.kind}", resume is not None, info.is_main):
            return _train_in(cfg, run_dir, info, resume, init)
    finally:
        D.cleanup()


def _train_in(cfg: AutoencoderRunConfig, run_dir: Path, info, resume: Path | None, init: str | Path | None
              ) -> FitResult:
    """The body of :func:`train_autoencoder` once ``run_dir`` is owned."""
    split = make_split(cfg)
    if resume is not None and (run_dir / "split.json").exists():
        from ..io.atomic import read_json

        split = Split.from_dict(read_json(run_dir / "split.json"))
    if not split.train:
        raise ValueError(f"{cfg.data.root}: no training patients")
    prior = _prior_for_run(cfg, split, run_dir, info)
    train_set = make_dataset(cfg, split.train, prior=prior)
    val_set = make_dataset(cfg, split.val, prior=prior) if split.val else None
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.root}: no training items for kind {cfg.kind!r} "
                         f"(field source {cfg.data.field_source!r})" if cfg.kind == "dvf" else
                         f"{cfg.data.root}: no CT volumes of phases {cfg.data.phases} for the training patients")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "split.json", split.to_dict())
        log.info("run folder %s: %d train / %d val items, patients %s | %s | %s", run_dir, len(train_set),
                 len(val_set) if val_set else 0, len(split.train), len(split.val), len(split.test))
    D.barrier(info)
    trainer = Trainer(AutoencoderTask(cfg, split, prior), train_set, val_set, cfg.train, run_dir, to_dict(cfg), info)
    return trainer.fit(resume=resume, init=init)

