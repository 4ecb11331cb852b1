"""The research code's (deterministic) autoencoder: its image autoencoder."""

from __future__ import annotations

import torch
from torch import nn

from .config import AutoencoderArgs
from .decoder import SeedDecoder
from .encoder import SeedEncoder


class SeedAutoencoder(nn.Module):
    """``encoder`` + ``decoder``; ``encode`` maps a normalised CT ``(B, 1, 50, 256, 256)`` to its
    latent ``(B, latent_channels, 50, 32, 32)`` with the published arguments."""

    def __init__(self, args: AutoencoderArgs):
        super().__init__()
        self.encoder = SeedEncoder(args)
        self.decoder = SeedDecoder(args)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
