"""Volume and displacement-field types.

* :class:`Volume`: ``array`` of shape ``(z, y, x)`` (CT in Hounsfield units, masks as uint8).
* :class:`DisplacementField`: ``array`` of shape ``(3, z, y, x)``, components ``(z, y, x)`` in
  millimetres along the array axes, **pull / backward** convention::

      warped(p) = moving(p + u(p))

  ``u`` is defined on the grid of the *fixed* (target) image and points to where each fixed
  voxel's content comes from in the moving image.  Images are pulled with ``u``; points move
  with the inverse (see :func:`respmotion.core.warp.move_points`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import Geometry


@dataclass
class Volume:
    """A 3D scalar volume (array ``(z, y, x)``) on a :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a volume needs a 3D array (z, y, x), got shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} != geometry shape {self.geometry.shape}")


@dataclass
class DisplacementField:
    """A dense displacement field, array ``(3, z, y, x)`` in mm, pull convention (see module doc)."""

    array: np.ndarray
    geometry: Geometry
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 4 or self.array.shape[0] != 3:
            raise ValueError(f"a displacement field needs shape (3, z, y, x), got {self.array.shape}")
        if tuple(self.array.shape[1:]) != self.geometry.shape:
            raise ValueError(f"field shape {self.array.shape[1:]} != geometry shape {self.geometry.shape}")

    def magnitude(self) -> np.ndarray:
        """Displacement length in mm, shape ``(z, y, x)``."""
        return np.sqrt((self.array.astype(np.float64) ** 2).sum(0)).astype(np.float32)

