"""Where the fixed image has too little texture to place the control points: the per-knot factor on the bending
weight (``FFDSettings.bending_texture``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.filters import gaussian_blur
from .bspline import ControlGrid


def texture_poverty(fixed: torch.Tensor, body: torch.Tensor, grid: ControlGrid, spacing,
                    air_hu: float | None = None) -> torch.Tensor:
    """Lack of texture per interior knot ``(B, 1, Kz-2, Ky-2, Kx-2)`` in [0, 1]: ``relu(1 - g / g_body)``;
    a level's bending factor per knot is ``1 + strength * this``.

    ``g`` is the gradient magnitude (intensity per mm; ``spacing`` mm (z, y, x)) of ``fixed`` ``(B, 1, Z, Y, X)``
    blurred with a Gaussian of half a control spacing and read at the knot's voxel; ``g_body`` its median over the
    knots inside ``body`` ``(B, 1, Z, Y, X)``.  Knots in texture-poor tissue (abdomen, chest wall, air) get up to
    ``1 + strength`` times the bending weight: the image cannot place them, so their neighbours should.  With
    ``air_hu``, knots where ``fixed`` (HU) blurred the same way is below it get 0 (air: lung parenchyma and the air
    outside the body keep the one weight)."""
    sigma = [0.5 * v for v in grid.stride]
    idx = [torch.as_tensor(np.rint(grid.positions(ax)[1:-1]).astype(np.int64), device=fixed.device).clamp(
        0, fixed.shape[2 + ax] - 1) for ax in range(3)]
    at = lambda x: x[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]  # noqa: E731
    out = []
    for b in range(fixed.shape[0]):  # one pair and one axis at a time: a native CT's transients stay ~4 images
        f = fixed[b:b + 1]
        g2 = None
        for ax in range(3):
            d = torch.gradient(f, spacing=float(spacing[ax]), dim=2 + ax)[0].square_()
            g2 = d if g2 is None else g2.add_(d)
            del d
        gk = at(gaussian_blur(g2.sqrt_(), sigma))
        del g2
        inside = at(body[b:b + 1]) > 0
        ref = (gk[inside].median() if bool(inside.any()) else gk.median()).clamp_min(1e-6)
        poor = F.relu(1.0 - gk / ref)
        if air_hu is not None:
            poor = poor * (at(gaussian_blur(f, sigma)) >= float(air_hu))
        out.append(poor)
    return torch.cat(out)
