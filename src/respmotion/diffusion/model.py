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
from typing import Any

import torch
from torch import nn

from .config import DiffusionModelConfig
from .sampling import LatentNorm
from .unet import PhaseConditionedUNet


class LatentDiffusion(nn.Module):
    """``forward(x_t, image_n, t, phase_idx)`` = online UNet prediction (normalised latents)."""

    def __init__(self, cfg: DiffusionModelConfig, image_norm: LatentNorm | None = None,
                 dvf_norm: LatentNorm | None = None, ema_decay: float = 0.999) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = PhaseConditionedUNet(cfg.unet)
        self.ema = copy.deepcopy(self.unet)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.image_norm = image_norm or LatentNorm.identity(cfg.unet.image_channels)
        self.dvf_norm = dvf_norm or LatentNorm.identity(cfg.unet.dvf_channels)
        self.ema_decay = float(ema_decay)
        self.register_buffer("ema_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("ema_at_step", torch.tensor(-1, dtype=torch.long))

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
        return {"image_norm": self.image_norm.to_dict(), "dvf_norm": self.dvf_norm.to_dict(),
                "ema_decay": self.ema_decay, "ema_updates": int(self.ema_updates)}
