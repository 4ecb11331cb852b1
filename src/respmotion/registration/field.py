"""What :func:`~respmotion.registration.ffd.register` returns: B pairs' control points with the grid they live on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bspline import ControlGrid, dense_tensor


@dataclass(frozen=True)
class FFDField:
    """Cubic B-spline pull fields of B registered pairs on one control grid: ``fixed(p) ~= moving(p + u(p))``,
    ``u`` in mm, components (z, y, x) along the array axes of the fixed image.

    Args:
        coef: control points in mm, ``(B, 3, Kz, Ky, Kx)``; sliding ``(B, 2, 3, Kz, Ky, Kx)`` (inside field,
            outside field).
        grid: the control grid over the fixed images' ``(Z, Y, X)`` voxels (``grid.shape == (Kz, Ky, Kx)``).
        inside_weight: sliding only: the inside field's weight per voxel ``(B, Z, Y, X)`` in [0, 1] (the outside
            field's is 1 - it), as given to ``register``.

    Use::

        field, log = register(fixed, moving, body, spacing, settings, inside_weight=w)
        u = field.dense(0)  # (3, Z, Y, X) mm, pair 0
    """

    coef: torch.Tensor
    grid: ControlGrid
    inside_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k = tuple(self.grid.shape)
        if tuple(self.coef.shape[-4:]) != (3, *k) or self.coef.ndim not in (5, 6):
            raise ValueError(f"control points {tuple(self.coef.shape)} are neither (B, 3, {k}) nor (B, 2, 3, {k})")
        if self.sliding and (self.inside_weight is None or tuple(self.inside_weight.shape)
                             != (self.coef.shape[0], *self.grid.image_shape)):
            raise ValueError(f"sliding control points need the inside field's weight (B, Z, Y, X) = "
                             f"({self.coef.shape[0]}, {self.grid.image_shape}), got "
                             f"{None if self.inside_weight is None else tuple(self.inside_weight.shape)}")

    @property
    def sliding(self) -> bool:
        """Two fields (inside, outside) blended by ``inside_weight``."""
        return self.coef.ndim == 6

    def __len__(self) -> int:
        return int(self.coef.shape[0])

    def dense(self, pair: int) -> torch.Tensor:
        """Pair ``pair``'s field at every voxel of the fixed image: ``(3, Z, Y, X)`` mm (pull)."""
        w = None if self.inside_weight is None else self.inside_weight[pair:pair + 1]
        return dense_tensor(self.coef[pair:pair + 1], self.grid, w)[0]
