"""Building blocks of the research code's networks (convolutions, down/up steps, level pads).

Attribute names are the research code's, so that ``state_dict`` keys match its published
checkpoints; :mod:`respmotion.models.seed` documents the mapping.  Inference only: the research
code's dropout (``Dropout3d``, parameter-free and the identity in eval mode) is left out.

Shapes: ``(B, C, Z, Y, X)``.  ``keep_z`` blocks convolve in-plane only (kernel ``(1, 3, 3)``,
padding ``(0, 1, 1)``) and pool/upsample by ``(1, 2, 2)``; otherwise kernels are ``3**3`` and
steps ``2**3``.  Every activation is ELU (the only one the research networks instantiate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "group", "identity")
LAYER_TYPES = ("simple", "double", "double_res")


def make_norm(norm: str, channels: int) -> nn.Module:
    """The research code's normalisations; GroupNorm has ``max(1, channels // 8)`` groups."""
    kind = norm.lower()
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels, affine=True)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _kernel(keep_z: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(kernel, padding) of a 3-wide convolution."""
    return ((1, 3, 3), (0, 1, 1)) if keep_z else ((3, 3, 3), (1, 1, 1))


def _step(keep_z: bool) -> tuple[int, int, int]:
    """Pooling / transposed-convolution kernel and stride."""
    return (1, 2, 2) if keep_z else (2, 2, 2)


class SimpleConv(nn.Module):
    """conv -> norm -> ELU (``layer_type="simple"``); keys ``layer.0``, ``layer.1``."""

    def __init__(self, in_channels: int, out_channels: int, keep_z: bool, norm: str):
        super().__init__()
        k, p = _kernel(keep_z)
        self.layer = nn.Sequential(nn.Conv3d(in_channels, out_channels, k, 1, p), make_norm(norm, out_channels), nn.ELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class DoubleConv(nn.Module):
    """(conv -> norm -> ELU) twice (``layer_type="double"``); keys ``layer.0/1/3/4``."""

    def __init__(self, in_channels: int, out_channels: int, keep_z: bool, norm: str):
        super().__init__()
        k, p = _kernel(keep_z)
        self.layer = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, k, 1, p), make_norm(norm, out_channels), nn.ELU(),
            nn.Conv3d(out_channels, out_channels, k, 1, p), make_norm(norm, out_channels), nn.ELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ResDoubleConv(nn.Module):
    """``ELU(norm2(conv2(ELU(norm1(conv1(x))))) + residual(x))`` (``layer_type="double_res"``).

    ``residual`` is the identity when the channel count is kept, else a bias-free convolution
    with the block's kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, keep_z: bool, norm: str):
        super().__init__()
        k, p = _kernel(keep_z)
        self.conv1 = nn.Conv3d(in_channels, out_channels, k, 1, p)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, k, 1, p)
        self.norm2 = make_norm(norm, out_channels)
        self.residual = (nn.Identity() if in_channels == out_channels
                         else nn.Conv3d(in_channels, out_channels, k, 1, p, bias=False))
        self.activation = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.norm1(self.conv1(x)))
        return self.activation(self.norm2(self.conv2(y)) + self.residual(x))


def conv_block(layer_type: str, in_channels: int, out_channels: int, keep_z: bool, norm: str) -> nn.Module:
    """The block named by the research ``layer_type``."""
    kinds = {"simple": SimpleConv, "double": DoubleConv, "double_res": ResDoubleConv}
    if layer_type not in kinds:
        raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
    return kinds[layer_type](in_channels, out_channels, keep_z, norm)


class Down(nn.Module):
    """Max-pool by 2 (in-plane only if ``keep_z``), then a conv block; key prefix ``downform``."""

    def __init__(self, in_channels: int, out_channels: int, keep_z: bool, norm: str, layer_type: str):
        super().__init__()
        s = _step(keep_z)
        self.downform = nn.Sequential(nn.MaxPool3d(s, s), conv_block(layer_type, in_channels, out_channels, keep_z, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downform(x)


def _pad_back(x: torch.Tensor, pad_xy: int, pad_z: int) -> torch.Tensor:
    """Zero-pad the high end of X and Y by ``pad_xy`` and of Z by ``pad_z`` (undoes a floored pool)."""
    return F.pad(x, [0, pad_xy, 0, pad_xy, 0, pad_z]) if (pad_xy or pad_z) else x


class Up(nn.Module):
    """Transposed convolution by 2, conv block, then the level's back padding (decoders)."""

    def __init__(self, in_channels: int, out_channels: int, keep_z: bool, norm: str, layer_type: str,
                 pad_xy: int, pad_z: int):
        super().__init__()
        s = _step(keep_z)
        self.pad_xy, self.pad_z = pad_xy, pad_z
        self.upform = nn.Sequential(nn.ConvTranspose3d(in_channels, out_channels, s, s),
                                    conv_block(layer_type, out_channels, out_channels, keep_z, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pad_back(self.upform(x), self.pad_xy, self.pad_z)


class UpCat(nn.Module):
    """Transposed convolution by 2 and back padding, concatenated after the skip ``[skip, up]``,
    then a conv block (UNet decoder)."""

    def __init__(self, in_channels: int, out_channels: int, keep_z: bool, norm: str, layer_type: str,
                 pad_xy: int, pad_z: int):
        super().__init__()
        s = _step(keep_z)
        self.pad_xy, self.pad_z = pad_xy, pad_z
        self.conv = conv_block(layer_type, in_channels, out_channels, keep_z, norm)
        self.upform = nn.ConvTranspose3d(in_channels, out_channels, s, s)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = _pad_back(self.upform(x), self.pad_xy, self.pad_z)
        return self.conv(torch.cat((skip, up), dim=1))


def level_pads(keep_z: list[bool], width: int, depth: int) -> list[tuple[int, int]]:
    """``(pad_xy, pad_z)`` per level: the remainder that level's pooling floors away.

    Computed, as in the research code, from the configured input size (``width`` in-plane,
    ``depth`` slices), not from the tensor at run time: level ``i`` sees ``width`` halved ``i``
    times and ``depth`` halved once per earlier level without ``keep_z``.
    """
    pads = []
    xy, z = int(width), int(depth)
    for keep in keep_z:
        pad_z = 0 if keep else z % 2
        pads.append((xy % 2, pad_z))
        xy //= 2
        if not keep:
            z //= 2
    return pads
