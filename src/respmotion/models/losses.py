"""Reconstruction losses of the autoencoders (no pretrained weights needed).

* :class:`LPELoss` (image): ``l1_weight * L1 + ssim_weight * (1 - SSIM) + edge_weight * edge``
  on images in network units ``[-1, 1]`` (data range 2).  SSIM is MONAI's
  :class:`~monai.losses.SSIMLoss` on 2D slices of the chosen views (axial = ``(y, x)`` slices
  along ``z``, coronal = ``(z, x)`` along ``y``, sagittal = ``(z, y)`` along ``x``), averaged over
  views.  The edge term is the L1 difference of central-difference gradients (MONAI's
  ``spatial_gradient``) along ``z, y, x``.
  The research code's "LPE" weights sum to one with the perceptual term getting
  ``1 - l1 - edge``; its template sets ``l1 = 1``, i.e. plain L1.  Our default keeps a
  small SSIM term (0.8 L1 + 0.2 SSIM) so that structure, not only intensity, is rewarded.
* :class:`DVFLoss` (displacement fields): the error is measured in **millimetres**
  (network units times ``dvf_scale_mm``): ``l1_weight * mean|e| + mse_weight * mean(e**2)``
  (``e`` = per-component error in mm) plus optional smoothness of the prediction
  (MONAI :class:`~monai.losses.DiffusionLoss`, squared mm per voxel, and
  :class:`~monai.losses.BendingEnergyLoss`) and, for the VAE, ``kl_weight`` times the KL
  divergence summed over latent elements (mean over the batch; the research code's 1e-7).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.losses import BendingEnergyLoss, DiffusionLoss, SSIMLoss
from monai.losses.deform import spatial_gradient

VIEWS = ("axial", "coronal", "sagittal")


def slices(x: torch.Tensor, view: str) -> torch.Tensor:
    """2D slices of ``(B, C, Z, Y, X)`` stacked in the batch: axial ``(B*Z, C, Y, X)``,
    coronal ``(B*Y, C, Z, X)``, sagittal ``(B*X, C, Z, Y)``."""
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, Z, Y, X), got shape {tuple(x.shape)}")
    b, c, z, y, w = x.shape
    if view == "axial":
        return x.permute(0, 2, 1, 3, 4).reshape(b * z, c, y, w)
    if view == "coronal":
        return x.permute(0, 3, 1, 2, 4).reshape(b * y, c, z, w)
    if view == "sagittal":
        return x.permute(0, 4, 1, 2, 3).reshape(b * w, c, z, y)
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


def _odd_at_most(n: int, limit: int) -> int:
    k = min(n, limit)
    return k if k % 2 else k - 1


class LPELoss(nn.Module):
    """Image loss L1 + slice-SSIM + edge (see module docstring); inputs in ``[-1, 1]``."""

    def __init__(
        self,
        l1_weight: float = 0.8,
        ssim_weight: float = 0.2,
        edge_weight: float = 0.0,
        views: Sequence[str] = VIEWS,
        win_size: int = 11,
        data_range: float = 2.0,
    ) -> None:
        super().__init__()
        bad = [v for v in views if v not in VIEWS]
        if bad:
            raise ValueError(f"unknown slice view {bad[0]!r} (use {', '.join(VIEWS)})")
        if ssim_weight > 0 and not views:
            raise ValueError("ssim_weight > 0 needs at least one slice view")
        self.l1_weight, self.ssim_weight, self.edge_weight = l1_weight, ssim_weight, edge_weight
        self.views = tuple(views)
        self.win_size = win_size
        self.data_range = data_range

    def ssim_term(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over views of ``1 - SSIM`` of 2D slices (window shrunk to fit thin slices)."""
        terms = []
        for view in self.views:
            p, t = slices(pred, view), slices(target, view)
            win = _odd_at_most(min(p.shape[-2:]), self.win_size)
            terms.append(SSIMLoss(spatial_dims=2, data_range=self.data_range, win_size=win)(p.float(), t.float()))
        return torch.stack(terms).mean()

    @staticmethod
    def edge_term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diffs = [(spatial_gradient(pred, d) - spatial_gradient(target, d)).abs().mean() for d in (2, 3, 4)]
        return torch.stack(diffs).mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{"loss": total, "l1": ..., "ssim": ..., "edge": ...}`` (terms that are on)."""
        out: dict[str, torch.Tensor] = {}
        total = pred.new_zeros(())
        if self.l1_weight:
            out["l1"] = (pred - target).abs().mean()
            total = total + self.l1_weight * out["l1"]
        if self.ssim_weight:
            out["ssim"] = self.ssim_term(pred, target)
            total = total + self.ssim_weight * out["ssim"]
        if self.edge_weight:
            out["edge"] = self.edge_term(pred, target)
            total = total + self.edge_weight * out["edge"]
        out["loss"] = total
        return out


class DVFLoss(nn.Module):
    """Displacement-field loss with the error in mm (see module docstring).

    ``pred`` / ``target`` are ``(B, 3, Z, Y, X)`` in network units (mm / ``dvf_scale_mm``).
    """

    def __init__(
        self,
        dvf_scale_mm: float = 10.0,
        l1_weight: float = 1.0,
        mse_weight: float = 0.0,
        smooth_weight: float = 0.0,
        bending_weight: float = 0.0,
        kl_weight: float = 1e-7,
    ) -> None:
        super().__init__()
        self.scale = dvf_scale_mm
        self.l1_weight, self.mse_weight = l1_weight, mse_weight
        self.smooth_weight, self.bending_weight, self.kl_weight = smooth_weight, bending_weight, kl_weight
        self.smooth = DiffusionLoss()
        self.bending = BendingEnergyLoss()

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, kl: torch.Tensor | None = None, kl_factor: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """``kl``: KL summed over latent elements (batch mean); ``kl_factor`` ramps its weight (0..1)."""
        err_mm = (pred - target) * self.scale
        out: dict[str, torch.Tensor] = {"l1_mm": err_mm.abs().mean()}
        total = self.l1_weight * out["l1_mm"]
        if self.mse_weight:
            out["mse_mm2"] = err_mm.pow(2).mean()
            total = total + self.mse_weight * out["mse_mm2"]
        if self.smooth_weight:
            out["smooth"] = self.smooth(pred * self.scale)
            total = total + self.smooth_weight * out["smooth"]
        if self.bending_weight:
            out["bending"] = self.bending(pred * self.scale)
            total = total + self.bending_weight * out["bending"]
        if kl is not None:
            out["kl"] = kl
            total = total + self.kl_weight * kl_factor * kl
        out["loss"] = total
        return out
