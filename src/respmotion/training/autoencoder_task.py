"""The autoencoders as a :class:`~respmotion.training.task.Task` of the shared engine
(:mod:`respmotion.training.engine`).

``kind="image"``: CT in network units (HU -> [-1, 1]), loss :class:`~respmotion.models.losses.LPELoss`
(its 1 - SSIM term logged as ``one_minus_ssim``).  ``kind="dvf"``: fields in network units
(mm / ``dvf_scale_mm``), VAE with :class:`~respmotion.models.losses.DVFLoss` + KL (weight ramped
over ``kl_warmup_steps``).  After training, ``latent_scale`` is set to ``1 / std`` of training
latents.  The run (config, data, split, prior) is :mod:`respmotion.training.autoencoder`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..models.autoencoder import Autoencoder, kl_divergence
from ..models.losses import VIEWS, DVFLoss, LPELoss
from ..models.prior import MotionPrior
from .task import Task, unwrap
from .splits import Split

log = logging.getLogger("respmotion")


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


def _unit(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


class AutoencoderTask(Task):
    """Engine task of the image AE / DVF VAE (loss in network units; DVF error in mm).

    ``cfg``: the run config, a :class:`respmotion.training.autoencoder.AutoencoderRunConfig` (kind, model,
    image_loss, dvf_loss, latent_scale_items; not imported here: that module imports this one); ``split`` and
    ``prior`` (the DVF VAE's motion prior, or None) are recorded in every checkpoint's ``extra``.
    """

    def __init__(self, cfg: Any, split: Split, prior: MotionPrior | None = None) -> None:
        self.cfg, self.split, self.prior = cfg, split, prior
        self.net = cfg.model.resolved(cfg.kind)
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
