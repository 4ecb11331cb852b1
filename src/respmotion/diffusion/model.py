"""The trained object: phase-conditioned UNet + its EMA copy + latent normalisation, one module.

Keeping the EMA weights and the latent statistics inside one ``nn.Module`` means a training
checkpoint's ``model`` state holds everything sampling needs, and the shared engine's resume
restores the EMA exactly (``ema_updates`` is a buffer).  The EMA copy never receives gradients;
the optimizer skips it (its parameters have ``requires_grad=False`` and no ``.grad``).

EMA rule: ``ema <- d * ema + (1 - d) * online`` with ``d = min(decay, (1 + n) / (10 + n))`` after
``n`` updates (the usual warm-up, so short runs are not dominated by the random init).  The
task calls :meth:`update_ema` once per optimizer step, before the first micro-batch of the next
step, and once more at the end of training.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from ..anatomy.features import FEATURE_LIMIT, LUNG_FEATURES
from .config import DiffusionModelConfig
from .sampling import LatentNorm
from .unet import PhaseConditionedUNet


class ImageCondition(nn.Module):
    """Image latent ``(..., Ci, Z, Y, X)`` -> what the UNet sees, ``(..., Ci * m, Z, Y, X)``.

    * ``plain`` (m = 1): per-channel standardisation ``(z - mean_c) / std_c`` (research code).
    * ``deviation`` (m = 1): ``(z - zbar) / sd_c``, ``zbar`` the voxel-wise mean image latent of the
      training patients, ``sd_c`` the across-patient std per channel: what distinguishes this patient.
    * ``both`` (m = 2, default): the two concatenated on channels.

    Why: on the phantom the across-patient part of the image latent was 0.6 % of its variance
    (8x32x32 chain: 0.0056 of 1.0 after per-channel standardisation), so under ``plain`` the UNet
    saw nearly the same conditioning for every patient and learned the population motion only
    (see :mod:`respmotion.diffusion.pipeline` for the measured errors).
    """

    def __init__(self, mode: str, plain: LatentNorm, mean: torch.Tensor, std: torch.Tensor) -> None:
        """``mean`` ``(Ci, Z, Y, X)`` (``(Ci, 1, 1, 1)`` broadcasts: an untrained placeholder) and
        ``std`` ``(Ci,)``; both ``(0,)`` in ``plain`` mode."""
        super().__init__()
        self.mode = mode
        self.plain = plain
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))  # (Ci, Z, Y, X) or (0,)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))  # (Ci,) or (0,)

    @property
    def multiplier(self) -> int:
        return 2 if self.mode == "both" else 1

    def _deviation(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean.ndim != 4:
            raise ValueError("image condition 'deviation' needs the training patients' mean image latent")
        if tuple(self.mean.shape[-3:]) != (1, 1, 1) and tuple(z.shape[-3:]) != tuple(self.mean.shape[-3:]):
            raise ValueError(f"image latent {tuple(z.shape)} differs in size from the training latents "
                             f"{tuple(self.mean.shape)} the deviation condition was computed on")
        std = self.std.to(z.device, z.dtype).view(-1, 1, 1, 1)
        return (z - self.mean.to(z.device, z.dtype)) / std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "plain":
            return self.plain.normalize(z)
        if self.mode == "deviation":
            return self._deviation(z)
        return torch.cat([self.plain.normalize(z), self._deviation(z)], dim=-4)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "plain": self.plain.to_dict(), "deviation_std": self.std.tolist()}


class AnatomyCondition(nn.Module):
    """Scalar lung anatomy ``(B, F)`` (:data:`respmotion.anatomy.features.LUNG_FEATURES`, ml and mm) ->
    ``(B, F, Z, Y, X)`` constant channels ``(f - mean) / std``, mean and std over the training patients.

    Why: the breathing amplitude is the largest patient-to-patient difference in motion and a CT shows it
    through a few numbers (how much gas the lungs hold, how low they reach); as channels of their own the
    UNet can scale its output by them from tens of training patients (docs/diffusion.md).  Standardised values
    are clipped to +-:data:`~respmotion.anatomy.features.FEATURE_LIMIT` so a CT far outside the training
    patients' range (another scanner, another body) cannot drive the network into untrained extrapolation."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape or torch.any(std <= 0):
            raise ValueError(f"anatomy statistics must be (F,) vectors with std > 0, got {tuple(mean.shape)}, "
                             f"{tuple(std.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def forward(self, features: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        f = torch.as_tensor(features, dtype=torch.float32, device=self.mean.device)
        if f.ndim != 2 or f.shape[1] != self.channels:
            raise ValueError(f"anatomy features must be (B, {self.channels}), got {tuple(f.shape)}")
        f = ((f - self.mean) / self.std).clamp(-FEATURE_LIMIT, FEATURE_LIMIT)
        return f[:, :, None, None, None].expand(*f.shape, *spatial)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(LUNG_FEATURES), "mean": self.mean.tolist(), "std": self.std.tolist()}


class LatentDiffusion(nn.Module):
    """``forward(x_t, cond, t, phase_idx)`` = online UNet prediction (normalised latents);
    ``cond = self.condition(image_latent, features)`` (see :class:`ImageCondition`, :class:`AnatomyCondition`)."""

    def __init__(self, cfg: DiffusionModelConfig, image_norm: LatentNorm | None = None,
                 dvf_norm: LatentNorm | None = None, ema_decay: float = 0.999,
                 image_mean: torch.Tensor | None = None, image_std: torch.Tensor | None = None,
                 anatomy_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``image_mean`` ``(Ci, Z, Y, X)`` / ``image_std`` ``(Ci,)``: the deviation statistics
        (required unless ``cfg.image_condition == "plain"``; zeros of the right shape when loading).
        ``anatomy_stats``: mean and std ``(F,)`` of the training patients' lung features (with
        ``cfg.anatomy_condition``; placeholders 0 / 1 when loading)."""
        super().__init__()
        self.cfg = cfg
        ci = cfg.unet.image_channels
        if cfg.image_condition != "plain" and (image_mean is None or image_std is None):
            image_mean, image_std = torch.zeros(ci, 1, 1, 1), torch.ones(ci)
        self.image_norm = image_norm or LatentNorm.identity(ci)
        self.image_condition = ImageCondition(cfg.image_condition, self.image_norm,
                                              image_mean if image_mean is not None else torch.zeros(0),
                                              image_std if image_std is not None else torch.zeros(0))
        self.anatomy: AnatomyCondition | None = None
        if cfg.anatomy_condition:
            nf = len(LUNG_FEATURES)
            self.anatomy = AnatomyCondition(*(anatomy_stats or (torch.zeros(nf), torch.ones(nf))))
        extra = self.anatomy.channels if self.anatomy is not None else 0
        unet_cfg = dataclasses.replace(cfg.unet, image_channels=ci * self.image_condition.multiplier + extra)
        self.unet = PhaseConditionedUNet(unet_cfg)
        self.ema = copy.deepcopy(self.unet)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        phases = cfg.unet.num_phases if cfg.dvf_norm == "phase" else 0
        self.dvf_norm = dvf_norm or LatentNorm.identity(cfg.unet.dvf_channels, phases)
        if self.dvf_norm.per_phase != (cfg.dvf_norm == "phase"):
            raise ValueError(f"dvf_norm={cfg.dvf_norm!r} needs {'(P, C)' if phases else '(C,)'} latent statistics, got "
                             f"{tuple(self.dvf_norm.mean.shape)}")
        self.ema_decay = float(ema_decay)
        self.register_buffer("ema_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("ema_at_step", torch.tensor(-1, dtype=torch.long))

    def condition(self, image_latent: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """What the UNet is conditioned on: image latents ``(B, Ci, Z, Y, X)`` (scaled, as the image
        autoencoder encodes them) and, for a model with :attr:`anatomy`, the CT's lung features ``(B, F)``
        (:func:`respmotion.anatomy.features.lung_features`) -> ``(B, Ci * m [+ F], Z, Y, X)``."""
        cond = self.image_condition(image_latent)
        if self.anatomy is None:
            return cond
        if features is None:
            raise ValueError("this diffusion model is conditioned on the CT's lung anatomy: give its lung features")
        return torch.cat([cond, self.anatomy(features, cond.shape[-3:]).to(cond.dtype)], dim=-4)

    def forward(self, x_t: torch.Tensor, image_n: torch.Tensor, t: torch.Tensor, phase_idx: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, image_n, t, phase_idx)

    @torch.no_grad()
    def update_ema(self, step: int) -> bool:
        """Blend the online weights into the EMA once for optimizer step ``step`` (idempotent)."""
        if int(self.ema_at_step) >= step:
            return False
        n = int(self.ema_updates)
        d = min(self.ema_decay, (1.0 + n) / (10.0 + n))
        for pe, po in zip(self.ema.parameters(), self.unet.parameters()):
            pe.lerp_(po.detach().to(pe.dtype), 1.0 - d)
        for be, bo in zip(self.ema.buffers(), self.unet.buffers()):
            be.copy_(bo)
        self.ema_updates += 1
        self.ema_at_step.fill_(step)
        return True

    def sampling_net(self, use_ema: bool = True) -> PhaseConditionedUNet:
        return self.ema if use_ema else self.unet

    def describe(self) -> dict[str, Any]:
        return {"image_norm": self.image_norm.to_dict(), "image_condition": self.image_condition.to_dict(),
                "anatomy_condition": self.anatomy.to_dict() if self.anatomy is not None else None,
                "dvf_norm": self.dvf_norm.to_dict(),
                "ema_decay": self.ema_decay, "ema_updates": int(self.ema_updates)}
