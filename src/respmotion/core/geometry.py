"""The one geometry type: every voxel <-> world <-> normalised mapping lives here.

Conventions (also in CONVENTIONS.md; nothing else in the package converts coordinates):

* Arrays are indexed ``[z, y, x]`` (slowest to fastest).  ``shape`` and ``spacing`` are in that
  order; ``spacing`` is in millimetres.
* World coordinates are DICOM/ITK patient coordinates, **LPS**, in millimetres, ordered
  ``(x, y, z)``.  ``origin`` is the world position of the centre of voxel ``[0, 0, 0]``.
* ``direction`` is ITK's row-major 3x3 matrix: column ``j`` is the world (LPS) unit vector of the
  ITK index axis ``j`` where ITK index ``(i, j, k)`` = array ``[k, j, i]`` (i.e. column 0 is the
  direction of array axis x, column 2 of array axis z).
* Vectors "in axis frame" (displacement fields) have components ``(z, y, x)`` in millimetres
  along the three array axes.  :meth:`Geometry.axes_to_world` rotates them into LPS.
* Normalised coordinates are those of ``torch.nn.functional.grid_sample`` with
  ``align_corners=True``: index 0 -> -1, index n-1 -> +1, last dim ordered (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _triple(values: Sequence[float], name: str, cast=float) -> tuple:
    vals = tuple(cast(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name} needs 3 values, got {len(vals)}: {values!r}")
    return vals


@dataclass(frozen=True)
class Geometry:
    """Sampling grid of a 3D volume in patient space.

    Args:
        shape: number of voxels ``(nz, ny, nx)``.
        spacing: voxel size in mm ``(sz, sy, sx)``.
        origin: LPS world position in mm ``(x, y, z)`` of the centre of voxel ``[0, 0, 0]``.
        direction: ITK row-major 3x3 direction matrix (9 numbers), see module docstring.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=_IDENTITY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _triple(self.shape, "shape", int))
        object.__setattr__(self, "spacing", _triple(self.spacing, "spacing"))
        object.__setattr__(self, "origin", _triple(self.origin, "origin"))
        d = tuple(float(v) for v in np.asarray(self.direction, dtype=float).ravel())
        if len(d) != 9:
            raise ValueError(f"direction needs 9 values, got {len(d)}")
        object.__setattr__(self, "direction", d)
        if min(self.shape) < 1:
            raise ValueError(f"shape must be positive, got {self.shape}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    # ----------------------------------------------------------------- matrices
    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 ITK direction matrix (columns = LPS directions of index axes i, j, k = x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_xyz(self) -> np.ndarray:
        return np.asarray(self.spacing[::-1], dtype=np.float64)

    def index_to_world_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping ITK index ``(i, j, k, 1)`` to LPS ``(x, y, z, 1)``."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing_xyz)
        m[:3, 3] = self.origin
        return m

    # ----------------------------------------------------------------- points
    def index_to_world(self, index_zyx: np.ndarray) -> np.ndarray:
        """Continuous array index ``[..., (z, y, x)]`` -> LPS mm ``[..., (x, y, z)]``."""
        idx = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        m = self.index_to_world_matrix()
        return idx @ m[:3, :3].T + m[:3, 3]

    def world_to_index(self, world_xyz: np.ndarray) -> np.ndarray:
        """LPS mm ``[..., (x, y, z)]`` -> continuous array index ``[..., (z, y, x)]``."""
        p = np.asarray(world_xyz, dtype=np.float64) - np.asarray(self.origin)
        m = self.index_to_world_matrix()[:3, :3]
        ijk = np.linalg.solve(m, p.reshape(-1, 3).T).T.reshape(p.shape)
        return np.ascontiguousarray(ijk[..., ::-1])

    # ----------------------------------------------------------------- vectors
    def axes_to_world(self, vec_zyx: np.ndarray, axis: int = -1) -> np.ndarray:
        """Vectors in mm along array axes ``(z, y, x)`` -> LPS world vectors ``(x, y, z)``.

        ``axis`` is the component axis of ``vec_zyx`` (e.g. 0 for a ``(3, z, y, x)`` field);
        the result keeps its components on the same axis.
        """
        v = np.moveaxis(np.asarray(vec_zyx, dtype=np.float64), axis, -1)[..., ::-1]
        w = v @ self.direction_matrix.T
        return np.ascontiguousarray(np.moveaxis(w, -1, axis))

    def world_to_axes(self, vec_xyz: np.ndarray, axis: int = -1) -> np.ndarray:
        """Inverse of :meth:`axes_to_world` (direction matrices are orthonormal)."""
        v = np.moveaxis(np.asarray(vec_xyz, dtype=np.float64), axis, -1)
        w = (v @ self.direction_matrix)[..., ::-1]
        return np.ascontiguousarray(np.moveaxis(w, -1, axis))

    # ----------------------------------------------------------------- normalised
    def index_to_normalized(self, index_zyx: np.ndarray) -> np.ndarray:
        """Array index ``(z, y, x)`` -> grid_sample coordinates ``(x, y, z)`` (align_corners=True)."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        n = np.maximum(np.asarray(self.shape, dtype=np.float64) - 1.0, 1.0)
        return (2.0 * idx / n - 1.0)[..., ::-1]

    # ----------------------------------------------------------------- derived grids
    def resized(self, shape: Sequence[int]) -> "Geometry":
        """Same field of view (voxel edges kept) sampled with ``shape`` voxels."""
        shape = _triple(shape, "shape", int)
        old_n = np.asarray(self.shape, dtype=np.float64)
        new_n = np.asarray(shape, dtype=np.float64)
        scale = old_n / new_n
        spacing = np.asarray(self.spacing) * scale
        # centre of new voxel 0 sits at old index (0.5 * scale - 0.5)
        first_idx = 0.5 * scale - 0.5
        origin = self.index_to_world(first_idx)
        return Geometry(shape, tuple(spacing), tuple(origin), self.direction)

    def with_shape_and_spacing(self, shape: Sequence[int], spacing: Sequence[float]) -> "Geometry":
        """Grid centred on the same physical centre with a new shape/spacing."""
        centre = self.index_to_world((np.asarray(self.shape) - 1) / 2.0)
        g = Geometry(shape, spacing, (0.0, 0.0, 0.0), self.direction)
        offset = centre - g.index_to_world((np.asarray(g.shape) - 1) / 2.0)
        return Geometry(shape, spacing, tuple(offset), self.direction)

    def same_as(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "shape_zyx": list(self.shape),
            "spacing_zyx_mm": list(self.spacing),
            "origin_lps_xyz_mm": list(self.origin),
            "direction_itk": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        try:
            return cls(
                tuple(d["shape_zyx"]),
                tuple(d["spacing_zyx_mm"]),
                tuple(d.get("origin_lps_xyz_mm", (0.0, 0.0, 0.0))),
                tuple(d.get("direction_itk", _IDENTITY)),
            )
        except KeyError as exc:
            raise ValueError(f"geometry record lacks key {exc}") from exc
