"""The research code's convolutional encoder (no skips)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Down, conv_block
from .config import AutoencoderArgs


class SeedEncoder(nn.Module):
    """1x1x1 input conv, one :class:`Down` per channel multiplier, a ``keep_z`` conv block and a
    1x1x1 conv to ``latent_channels``.

    ``(B, in_channels, Z, Y, X)`` -> ``(B, latent_channels, Z', Y / 2**L, X / 2**L)`` with
    ``L = len(channel_multipliers)`` and Z halved at each level without ``keep_z``.  The final
    conv block always convolves in-plane only (the research code leaves ``keep_z`` at its default
    there).
    """

    def __init__(self, args: AutoencoderArgs):
        super().__init__()
        mult = [1] + list(args.channel_multipliers)
        ch = [args.base_channels * m for m in mult]
        self.input = nn.Conv3d(args.in_channels, ch[0], kernel_size=1)
        self.encs = nn.ModuleList(
            [Down(ch[i], ch[i + 1], args.keep_z[i], args.norm, args.layer_type) for i in range(len(mult) - 1)])
        self.out = nn.Sequential(conv_block(args.layer_type, ch[-1], ch[-1], True, args.norm),
                                 nn.Conv3d(ch[-1], args.latent_channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        for enc in self.encs:
            x = enc(x)
        return self.out(x)
