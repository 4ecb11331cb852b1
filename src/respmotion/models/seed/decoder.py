"""The research code's convolutional decoder (no skips)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Up, conv_block, level_pads
from .config import AutoencoderArgs

# The research decoder computes its level pads for this image size (its defaults), whatever the
# input: 256 in-plane, 50 slices.
PAD_WIDTH, PAD_DEPTH = 256, 50


class SeedDecoder(nn.Module):
    """Mirror of :class:`~respmotion.models.seed.encoder.SeedEncoder`: 1x1x1 conv from
    ``latent_channels``, a ``keep_z`` conv block, one :class:`Up` per level (deepest first) and a
    1x1x1 conv to ``out_channels``.  ``(B, latent, Z', Y', X')`` -> ``(B, out, Z, Y, X)``."""

    def __init__(self, args: AutoencoderArgs):
        super().__init__()
        mult = [1] + list(args.channel_multipliers)
        ch = [args.base_channels * m for m in mult]
        pads = level_pads(args.keep_z, PAD_WIDTH, PAD_DEPTH)
        self.start = nn.Sequential(nn.Conv3d(args.latent_channels, ch[-1], kernel_size=1),
                                   conv_block(args.layer_type, ch[-1], ch[-1], True, args.norm))
        self.decs = nn.ModuleList(
            [Up(ch[i + 1], ch[i], args.keep_z[i], args.norm, args.layer_type, *pads[i])
             for i in range(len(mult) - 1)][::-1])
        self.out = nn.Conv3d(ch[0], args.out_channels, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.start(z)
        for dec in self.decs:
            x = dec(x)
        return self.out(x)
