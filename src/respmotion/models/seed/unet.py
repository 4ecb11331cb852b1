"""The research code's phase- and time-conditioned latent diffusion UNet."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Down, UpCat, level_pads
from .config import UNetArgs

NUM_PHASES = 9  # embeddings for the transitions 0->10 % ... 80->90 %


class SeedUNet(nn.Module):
    """UNet with concatenated skips predicting the noise of the DVF latent channels.

    ``forward(x, t, phase)``: ``x`` ``(B, in_channels, Z, W, W)`` (image latent then noisy DVF
    latent), ``t`` ``(B,)`` or ``(1,)`` float diffusion time in ``(0, 1]`` (the research code
    feeds ``t / T`` for integer ``t`` in ``1..T``), ``phase`` ``(B,)`` int64 transition index
    ``0..8``; returns ``(B, out_channels, Z, W, W)``.

    Level ``i`` (``base_channels * 2**i`` channels) has a time embedding (Linear(1, C) + ReLU)
    and a phase embedding, both added to the decoder features before that level's up-block (the
    deepest up-block gets none; the last pair is added before the 1x1x1 output conv).  The
    bottleneck uses the *last* ``keep_z`` entry, the decoder level ``i`` uses ``keep_z[i]``.
    """

    def __init__(self, args: UNetArgs):
        super().__init__()
        n, b = args.n_layers, args.base_channels
        pads = level_pads(args.keep_z, args.image_width, args.image_depth)
        self.t_embs = nn.ModuleList([nn.Sequential(nn.Linear(1, b * 2**i), nn.ReLU(True)) for i in range(n)][::-1])
        self.phase_embs = nn.ModuleList([nn.Embedding(NUM_PHASES, b * 2**i) for i in range(n)][::-1])
        self.input = nn.Conv3d(args.in_channels, b, kernel_size=1)
        self.encs = nn.ModuleList(
            [Down(b * 2**i, b * 2 ** (i + 1), args.keep_z[i], args.norm, args.layer_type) for i in range(n - 1)])
        self.bottleneck = Down(b * 2 ** (n - 1), b * 2**n, args.keep_z[-1], args.norm, args.layer_type)
        self.decs = nn.ModuleList(
            [UpCat(b * 2 ** (i + 1), b * 2**i, args.keep_z[i], args.norm, args.layer_type, *pads[i])
             for i in range(n)][::-1])
        self.out = nn.Conv3d(b, args.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).float()
        t_emb = [emb(t)[:, :, None, None, None] for emb in self.t_embs]
        p_emb = [emb(phase).reshape(phase.shape[0], -1, 1, 1, 1) for emb in self.phase_embs]
        x = self.input(x)
        skips = [x]
        for enc in self.encs:
            x = enc(x)
            skips.append(x)
        skips = skips[::-1]
        up = self.decs[0](self.bottleneck(x), skips[0])
        for i in range(1, len(self.decs)):
            up = self.decs[i](up + t_emb[i - 1] + p_emb[i - 1], skips[i])
        return self.out(up + t_emb[-1] + p_emb[-1])
