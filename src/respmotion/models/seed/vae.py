"""The research code's variational autoencoder: its DVF autoencoder."""

from __future__ import annotations

import torch
from torch import nn

from .config import AutoencoderArgs
from .decoder import SeedDecoder
from .encoder import SeedEncoder


class SeedVariationalAutoencoder(nn.Module):
    """Encoder, ``quant_conv`` (latent -> mean and log-variance), ``post_quant_conv`` and decoder.

    ``decode`` maps a DVF latent ``(B, latent_channels, 50, 32, 32)`` to the scaled airlab
    displacement ``(B, 3, 50, 256, 256)`` (divide by ``dvf_scale_factor``; see
    :mod:`respmotion.synthesis.seed`).  ``encode`` returns the posterior mean and log-variance
    (no sampling: inference only).
    """

    def __init__(self, args: AutoencoderArgs):
        super().__init__()
        c = args.latent_channels
        self.encoder = SeedEncoder(args)
        self.quant_conv = nn.Conv3d(c, 2 * c, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(c, c, kernel_size=1)
        self.decoder = SeedDecoder(args)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
