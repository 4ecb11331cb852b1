"""Phase-conditioned diffusion UNet on latents (MONAI ``DiffusionModelUNet``).

Input: ``concat(image latent (B, Ci, Z, Y, X), noisy DVF latent (B, Cd, Z, Y, X))`` on channels;
output: the noise (or v) of the DVF latent, ``(B, Cd, Z, Y, X)``.  Conditioning: diffusion time
(sinusoidal embedding) plus the breathing phase as a learned class embedding
(``num_class_embeds``; phase index = percent // 10), added to the time embedding in every
residual block.

Depth 50: MONAI's down-sampling halves every spatial axis at each level but the last, so an
axis must be a multiple of ``m = 2 ** (levels - 1)`` (4 for the default 3 levels; 50 is not).
:func:`pad_to_multiple` pads Z/Y/X at the end up to the next multiple (50 -> 52) with
``pad_mode`` (replicate by default, so the border convolutions see continued anatomy rather
than a step to zero) and the output is cropped back to the input size: nothing of the latent is
dropped, and training uses the same padding, so the loss only covers real voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from .config import UNetConfig


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad the last three axes of ``x`` (B, C, Z, Y, X) at their end up to multiples of ``multiple``.

    Returns the padded tensor and the original ``(Z, Y, X)`` for :func:`crop_to`.
    """
    size = tuple(int(s) for s in x.shape[-3:])
    extra = [(-s) % multiple for s in size]
    if not any(extra):
        return x, size  # type: ignore[return-value]
    pad = (0, extra[2], 0, extra[1], 0, extra[0])  # F.pad order: last axis first
    if mode == "zeros":
        return F.pad(x, pad), size  # type: ignore[return-value]
    return F.pad(x, pad, mode=mode), size  # type: ignore[return-value]


def crop_to(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    return x[..., : size[0], : size[1], : size[2]]


def phase_index(percent: int | torch.Tensor) -> torch.Tensor | int:
    """Breathing phase in percent (0, 10, ..., 90) -> class index 0..9."""
    if isinstance(percent, torch.Tensor):
        return torch.div(percent, 10, rounding_mode="floor").long()
    if percent % 10 or not 0 <= percent < 100:
        raise ValueError(f"phase must be one of 0, 10, ..., 90 percent, got {percent}")
    return percent // 10


class PhaseConditionedUNet(nn.Module):
    """Predicts the noise (or v) of a DVF latent from the noisy latent, the image latent, t, phase."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if len(cfg.channels) != len(cfg.attention_levels):
            raise ValueError(f"unet.channels {cfg.channels} and unet.attention_levels {cfg.attention_levels} differ in length")
        self.cfg = cfg
        self.multiple = 2 ** (len(cfg.channels) - 1)
        self.net = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=cfg.image_channels + cfg.dvf_channels,
            out_channels=cfg.dvf_channels,
            channels=tuple(cfg.channels),
            attention_levels=tuple(cfg.attention_levels),
            num_res_blocks=cfg.num_res_blocks,
            num_head_channels=cfg.num_head_channels,
            norm_num_groups=cfg.norm_num_groups,
            num_class_embeds=cfg.num_phases,
        )

    def forward(
        self, x_t: torch.Tensor, image_latent: torch.Tensor, timesteps: torch.Tensor, phase_idx: torch.Tensor
    ) -> torch.Tensor:
        """``x_t`` (B, Cd, Z, Y, X), ``image_latent`` (B or 1, Ci, Z, Y, X), ``timesteps`` (B,) int,
        ``phase_idx`` (B,) int in 0..num_phases-1 -> (B, Cd, Z, Y, X)."""
        if image_latent.shape[0] != x_t.shape[0]:
            image_latent = image_latent.expand(x_t.shape[0], *image_latent.shape[1:])
        if image_latent.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"image latent {tuple(image_latent.shape)} and DVF latent {tuple(x_t.shape)} differ in size")
        h = torch.cat([image_latent.to(x_t.dtype), x_t], dim=1)
        h, size = pad_to_multiple(h, self.multiple, self.cfg.pad_mode)
        out = self.net(h, timesteps=timesteps, class_labels=phase_idx)
        return crop_to(out, size)
