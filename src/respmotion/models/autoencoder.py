"""Anisotropic 3D autoencoders for CT volumes and displacement fields, built from MONAI blocks.

Shapes (default configs, input ``(B, C, Z, Y, X)``; depth is never downsampled, 8x in-plane):

* image autoencoder: ``(B, 1, 50, 256, 256)`` CT -> latent ``(B, 3, 50, 32, 32)``
* DVF VAE:           ``(B, 3, 50, 256, 256)`` field -> latent ``(B, 9, 50, 32, 32)``

In general ``(B, C_in, Z, Y, X) -> (B, latent_channels, Z, Y / 2**L, X / 2**L)`` with ``L`` =
``len(channel_mults)``; ``Y`` and ``X`` must be divisible by ``2**L``.

Why not :class:`monai.networks.nets.AutoencoderKL`: in MONAI 1.6.1 its ``AEKLDownsample`` is
hard-wired to ``strides=2`` and its decoder upsamples with ``scale_factor=2.0`` in every spatial
dimension, so it cannot keep the 50-slice depth while shrinking 8x in-plane (and with
``channels=(96, 192, 384)`` it downsamples only ``len(channels) - 1`` = 2 times).  We therefore
assemble the same kind of network from MONAI blocks: :class:`~monai.networks.blocks.ResidualUnit`
with strides ``(1, 2, 2)`` to downsample and :class:`~monai.networks.blocks.UpSample` with
``scale_factor=(1, 2, 2)`` to upsample.  Each level downsamples once (as the research code's
``Downform`` blocks do), so three levels give 8x.

Network units (the model carries them, see :meth:`Autoencoder.normalize`):

* CT: Hounsfield units clipped to ``hu_window`` (default: the window of
  :mod:`respmotion.data.intensity`, ``[-1000, 1000]``) and mapped linearly to ``[-1, 1]`` by its
  functions.  (The research code used ``[-1024, 3071]``; the narrower window keeps
  lung/soft-tissue contrast, and bone above 1000 HU saturates.)
* DVF: millimetres divided by ``dvf_scale_mm`` (default 10 mm), components ``(z, y, x)``,
  pull convention (see :mod:`respmotion.core.types`).

Latents for diffusion: :meth:`Autoencoder.encode_latent` returns the (mean) latent multiplied by
``latent_scale`` (set after training to ``1 / std`` of training latents, as in latent diffusion),
:meth:`Autoencoder.decode_latent` inverts it and returns physical units (HU or mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers.factories import Act

from ..core import warp as W
from ..data.intensity import HU_WINDOW, HUWindow, check_hu_window, denormalize_hu, normalize_hu
from ..io.torchfile import load_state, load_weights_only

KINDS = ("image", "dvf")
#: the DVF decoder's default number of levels left coarse: 3, chosen for the default 50x256x256 model grid
#: (8 voxels in-plane = 11.2 mm, the registration's B-spline control spacing; docs/synthesis.md).  The
#: setting counts voxels, so smaller grids set their own (the demo and the CI chain test: 0; 3 levels on
#: the demo's 64 voxels in-plane would be a 45 mm grid).  Checkpoints written before the option load as 0 (full resolution).
COARSE_LEVELS_DVF = 3


#: what ``None`` means for the kind-dependent settings: image 1 -> 3 latent channels (AE), DVF 3 -> 9 (VAE)
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": dict(in_channels=1, out_channels=1, latent_channels=3, variational=False, coarse_levels=0),
    "dvf": dict(in_channels=3, out_channels=3, latent_channels=9, variational=True, coarse_levels=COARSE_LEVELS_DVF),
}


@dataclass
class AutoencoderNetConfig:
    """Architecture and units of one autoencoder (stored in every checkpoint as a plain dict; the
    ``model`` section of :class:`respmotion.training.autoencoder.AutoencoderRunConfig`).

    ``None`` channel/variational settings take the kind's default (:data:`KIND_DEFAULTS`;
    :meth:`resolved`).  ``channel_mults`` give the channels of each level as ``base_channels * mult``;
    every level halves ``Y`` and ``X`` (and ``Z`` too only when ``downsample_depth``).

    ``coarse_levels`` = k: the decoder stops upsampling k levels early and its output
    ``(B, C_out, Z / s_z**k, Y / 2**k, X / 2**k)`` is brought to the full grid by trilinear
    interpolation (:func:`respmotion.core.warp.upsample_field`), a cost that fits a smooth field
    (DVF default :data:`COARSE_LEVELS_DVF`, or every level when there are fewer, chosen in
    docs/synthesis.md; image 0).  A stored
    config without the key (checkpoints written before the option) means 0: full resolution.
    """

    kind: str = "image"
    in_channels: int | None = None
    out_channels: int | None = None
    latent_channels: int | None = None
    base_channels: int = 96
    channel_mults: tuple[int, ...] = (1, 2, 4)
    res_units_per_level: int = 1
    downsample_depth: bool = False
    variational: bool | None = None
    dropout: float = 0.05
    norm_groups: int = 32
    act: str = "swish"
    hu_window: HUWindow = HU_WINDOW  # image: CT clipped to this (low, high) HU, mapped to [-1, 1]
    dvf_scale_mm: float = 10.0
    coarse_levels: int | None = None

    def resolved(self, kind: str | None = None) -> "AutoencoderNetConfig":
        """A copy for ``kind`` (default: its own) with every ``None`` setting the kind's default (the
        default ``coarse_levels`` at most the number of levels)."""
        kind = self.kind if kind is None else kind
        if kind not in KINDS:
            raise ValueError(f"autoencoder kind must be one of {KINDS}, got {kind!r}")
        g, c = self.norm_groups, self.base_channels
        if g < 1 or c < 1 or (c % g and g % c):  # a multiple of c: each level takes gcd(its channels, g) groups
            raise ValueError(f"model.norm_groups={g} does not divide model.base_channels={c}: GroupNorm splits a "
                             f"level's channels into equal groups; choose a divisor of {c} (or a multiple of it)")
        filled = {k: v for k, v in KIND_DEFAULTS[kind].items() if getattr(self, k) is None}
        if "coarse_levels" in filled:
            filled["coarse_levels"] = min(filled["coarse_levels"], len(self.channel_mults))
        return replace(self, kind=kind, channel_mults=tuple(self.channel_mults), **filled)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["channel_mults"] = list(self.channel_mults)
        d["hu_window"] = list(self.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoencoderNetConfig":
        d = dict(d)
        if "hu_min" in d or "hu_max" in d:  # written before the one hu_window setting
            d["hu_window"] = (d.pop("hu_min", HU_WINDOW[0]), d.pop("hu_max", HU_WINDOW[1]))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown autoencoder setting '{unknown[0]}'")
        d.setdefault("coarse_levels", 0)  # written before the option: a full-resolution decoder
        d["hu_window"] = check_hu_window(d.get("hu_window", HU_WINDOW))
        if "channel_mults" in d:
            d["channel_mults"] = tuple(int(m) for m in d["channel_mults"])
        return cls(**d)


def default_net_config(kind: str, **overrides: Any) -> AutoencoderNetConfig:
    """Defaults of the research code: image 1->3 latent channels (AE), DVF 3->9 latent channels (VAE)."""
    return AutoencoderNetConfig(kind=kind, **overrides).resolved()


class AutoencoderOutput(NamedTuple):
    """``recon`` ``(B, C, Z, Y, X)`` network units; ``mu`` latent mean; ``logvar`` (VAE) or None."""

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor | None


def _groups(channels: int, wanted: int) -> int:
    return math.gcd(channels, wanted)


def _norm(channels: int, wanted: int) -> tuple:
    return ("group", {"num_groups": _groups(channels, wanted)})


class _Encoder(nn.Module):
    """``(B, C_in, Z, Y, X) -> (B, C_out, Z', Y / 2**L, X / 2**L)`` features to latent."""

    def __init__(self, cfg: AutoencoderNetConfig, out_channels: int, strides: tuple[int, int, int]) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [
            Convolution(3, cfg.in_channels, chans[0], kernel_size=3, conv_only=True)  # stem at full size
        ]
        prev = chans[0]
        for c in chans:
            # the first convolution of the unit is strided: the level's work runs at the reduced size
            layers.append(
                ResidualUnit(3, prev, c, strides=strides, subunits=2, act=cfg.act, norm=_norm(c, cfg.norm_groups),
                             dropout=cfg.dropout or None)
            )
            for _ in range(cfg.res_units_per_level - 1):
                layers.append(ResidualUnit(3, c, c, subunits=2, act=cfg.act, norm=_norm(c, cfg.norm_groups),
                                           dropout=cfg.dropout or None))
            prev = c
        layers += [nn.GroupNorm(_groups(prev, cfg.norm_groups), prev), Act[cfg.act](),
                   Convolution(3, prev, out_channels, kernel_size=3, conv_only=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Decoder(nn.Module):
    """``(B, latent, Z', Y', X') -> (B, C_out, Z, Y' * 2**(L - k), X' * 2**(L - k))``, k = ``coarse_levels``."""

    def __init__(self, cfg: AutoencoderNetConfig, strides: tuple[int, int, int]) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [Convolution(3, cfg.latent_channels, chans[-1], kernel_size=3, conv_only=True)]
        for i in reversed(range(len(chans))):
            c = chans[i]
            for _ in range(cfg.res_units_per_level):
                layers.append(ResidualUnit(3, c, c, subunits=2, act=cfg.act, norm=_norm(c, cfg.norm_groups),
                                           dropout=cfg.dropout or None))
            nxt = chans[i - 1] if i > 0 else chans[0]
            if i >= cfg.coarse_levels:
                # transposed convolution with kernel = stride = (1, 2, 2): cheap at the full size
                layers.append(UpSample(3, c, nxt, scale_factor=strides, mode="deconv"))
            elif nxt != c:  # a level left coarse: only its channel change
                layers.append(Convolution(3, c, nxt, kernel_size=1, conv_only=True))
        head_c = chans[0]
        layers += [nn.GroupNorm(_groups(head_c, cfg.norm_groups), head_c), Act[cfg.act](),
                   Convolution(3, head_c, cfg.out_channels, kernel_size=3, conv_only=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """3D (variational) autoencoder with anisotropic down/upsampling; see the module docstring.

    ``forward(x)`` takes network units and returns :class:`AutoencoderOutput`.  In training mode a
    variational model samples ``z = mu + sigma * eps``; in eval mode it decodes ``mu`` (so
    evaluation and encoding are deterministic).
    """

    def __init__(self, cfg: AutoencoderNetConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()  # the kind's defaults for unset channels (raises on an unknown kind)
        if not cfg.channel_mults:
            raise ValueError("channel_mults must name at least one level")
        if not 0 <= cfg.coarse_levels <= len(cfg.channel_mults):
            raise ValueError(f"coarse_levels must be in 0..{len(cfg.channel_mults)} (the levels), got {cfg.coarse_levels}")
        self.cfg = cfg
        self.strides = (2 if cfg.downsample_depth else 1, 2, 2)
        enc_out = cfg.latent_channels * (2 if cfg.variational else 1)
        self.encoder = _Encoder(cfg, enc_out, self.strides)
        self.decoder = _Decoder(cfg, self.strides)
        # 1 / std of training latents (set by the training task); persistent so it travels with weights
        self.register_buffer("latent_scale", torch.tensor(1.0))

    # ------------------------------------------------------------------ shapes
    @property
    def factor(self) -> tuple[int, int, int]:
        """Downsampling factor per axis ``(z, y, x)``."""
        n = len(self.cfg.channel_mults)
        return (self.strides[0] ** n, 2**n, 2**n)

    def latent_shape(self, shape_zyx: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """Latent shape ``(C, Z', Y', X')`` of a volume ``(Z, Y, X)``; raises if not divisible."""
        f = self.factor
        bad = [n for n, k in zip(shape_zyx, f) if n % k]
        if bad:
            raise ValueError(f"volume shape {tuple(shape_zyx)} must be divisible by {f} (z, y, x) for this autoencoder")
        return (self.cfg.latent_channels, *(n // k for n, k in zip(shape_zyx, f)))

    # ------------------------------------------------------------------ units
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical units (HU, or mm for a DVF) -> network units (see module docstring)."""
        c = self.cfg
        if c.kind == "image":
            return normalize_hu(x, c.hu_window)
        return x / c.dvf_scale_mm

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Network units -> HU (within the window) or mm."""
        c = self.cfg
        if c.kind == "image":
            return denormalize_hu(y, c.hu_window)
        return y * c.dvf_scale_mm

    # ------------------------------------------------------------------ codec
    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network-unit input -> latent ``(mu, logvar)`` (``logvar`` None for a plain AE)."""
        self.latent_shape(tuple(x.shape[2:]))
        h = self.encoder(x)
        if not self.cfg.variational:
            return h, None
        mu, logvar = torch.chunk(h, 2, dim=1)
        return mu, torch.clamp(logvar, -30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Network-unit input ``(B, C, Z, Y, X)`` -> latent mean ``(B, latent, Z', Y', X')`` (unscaled)."""
        return self.encode_dist(x)[0]

    @property
    def output_factor(self) -> tuple[int, int, int]:
        """Upsampling ``(z, y, x)`` from the decoder's own output to the full grid (1s at full resolution)."""
        k = self.cfg.coarse_levels
        return (self.strides[0] ** k, self.strides[1] ** k, self.strides[2] ** k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent ``(B, latent, Z', Y', X')`` -> reconstruction ``(B, C_out, Z, Y, X)`` in network
        units on the full grid (a coarse decoder's output trilinearly upsampled, see ``coarse_levels``).

        Training compares this full-grid output with the full-resolution target: the loss then scores
        the interpolated field that synthesis uses, and the coarse values are free to be whatever
        interpolates best, which a downsampled target would not allow."""
        return W.upsample_field(self.decoder(z), self.output_factor)

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        mu, logvar = self.encode_dist(x)
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return AutoencoderOutput(self.decode(z), mu, logvar)

    # ------------------------------------------------------------------ diffusion interface
    @torch.no_grad()
    def encode_latent(self, x_physical: torch.Tensor) -> torch.Tensor:
        """HU (image) or mm (DVF) ``(B, C, Z, Y, X)`` -> scaled latent for diffusion (mean, times latent_scale)."""
        return self.encode(self.normalize(x_physical)) * self.latent_scale

    def decode_latent(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> HU or mm ``(B, C, Z, Y, X)`` (differentiable; wrap in no_grad for inference)."""
        return self.denormalize(self.decode(z_scaled / self.latent_scale))


def build_autoencoder(cfg: AutoencoderNetConfig) -> Autoencoder:
    return Autoencoder(cfg)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent elements, mean over the batch (a scalar)."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def load_autoencoder(path: str, map_location: str | torch.device = "cpu") -> Autoencoder:
    """Load a trained autoencoder from a training checkpoint (``<run>/<step>.pt`` or ``model.pt``).

    Reads the ``model_config`` and ``model`` entries (see :mod:`respmotion.io.checkpoint`);
    the returned model is in eval mode and carries its units and ``latent_scale``.
    """
    ckpt = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a respmotion autoencoder checkpoint (no 'model'/'model_config' entries)")
    task = str(ckpt.get("task", "autoencoder"))
    if not task.startswith("autoencoder"):
        raise ValueError(f"{path}: a checkpoint of task {task!r}, not an autoencoder")
    model = Autoencoder(AutoencoderNetConfig.from_dict(ckpt["model_config"]))
    load_state(model, ckpt["model"], path)  # weights that do not fit: one line naming the file
    return model.eval().to(map_location)
