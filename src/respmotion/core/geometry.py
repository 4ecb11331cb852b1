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
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # 4x4: LPS mm <-> RAS mm (its own inverse)


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
        """Spacing in mm in ITK order ``(x, y, z)``."""
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

    # ----------------------------------------------------------------- axes
    def nearest_world_axes(self) -> tuple[tuple[int, int, float], ...]:
        """For array axes ``(z, y, x)``: ``(world axis, sign, obliquity in degrees)`` of the LPS axis each runs
        closest to (world axis 0 = x (L), 1 = y (P), 2 = z (S); sign -1 when the array index runs against it)."""
        d = self.direction_matrix  # columns: LPS direction of ITK index axes i, j, k = array x, y, z
        out = []
        for a in range(3):
            vec = d[:, 2 - a]
            w = int(np.argmax(np.abs(vec)))
            tilt = float(np.degrees(np.arccos(min(1.0, abs(vec[w]) / np.linalg.norm(vec)))))
            out.append((w, -1 if vec[w] < 0 else 1, tilt))
        return tuple(out)

    def superior_sign(self) -> float:
        """+1 if array index z increases towards superior (LPS +z), -1 if towards inferior; ``ValueError`` when
        the array z axis is not the superior-inferior axis (LPS z component of its direction below 0.9)."""
        dz = self.direction_matrix[2, 2]  # LPS z component of the array z axis
        if abs(dz) < 0.9:
            raise ValueError("the array z axis is not the superior-inferior axis; lung base is undefined")
        return float(np.sign(dz))

    def superior_mm(self, slices: np.ndarray) -> np.ndarray:
        """Offsets of ``slices`` array-z steps -> mm along LPS +z (superior), for a grid whose z axis is the
        superior-inferior axis (see :meth:`superior_sign`)."""
        return slices * self.spacing[0] * self.superior_sign()

    def axis_mm(self, axis: int) -> np.ndarray:
        """LPS coordinate (mm) of the voxel centres along array axis ``axis`` (0 = z, 1 = y, 2 = x), for a grid
        with the identity direction (array z, y, x along LPS z, y, x): ``origin + spacing * i``."""
        if not np.array_equal(self.direction_matrix, np.eye(3)):
            raise ValueError("axis_mm needs the identity direction (array axes along LPS axes)")
        return self.origin[2 - axis] + self.spacing[axis] * np.arange(self.shape[axis])

    # ----------------------------------------------------------------- derived grids
    @classmethod
    def centred(cls, shape: Sequence[int], fov_mm: Sequence[float]) -> "Geometry":
        """Grid of ``shape`` voxels ``(z, y, x)`` whose field of view (voxel edges) is the box ``fov_mm``
        ``(z, y, x)`` centred on the LPS origin, identity direction: spacing ``fov / n``."""
        shape = _triple(shape, "shape", int)
        spacing = tuple(f / n for f, n in zip(_triple(fov_mm, "fov_mm"), shape))
        fov_xyz, spacing_xyz = _triple(fov_mm, "fov_mm")[::-1], spacing[::-1]
        return cls(shape, spacing, tuple(-f / 2 + s / 2 for f, s in zip(fov_xyz, spacing_xyz)))

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

    def same_as(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def image_orientation(self) -> tuple[float, ...]:
        """DICOM ImageOrientationPatient of the slices: LPS unit vectors of array x (row) then array y (column)."""
        d = self.direction_matrix
        return (*(float(v) for v in d[:, 0]), *(float(v) for v in d[:, 1]))

    # ----------------------------------------------------------------- other libraries' records
    def ras_affine(self) -> np.ndarray:
        """4x4 NIfTI affine: ITK index ``(i, j, k, 1)`` -> RAS mm (NIfTI's world frame)."""
        return LPS_TO_RAS @ self.index_to_world_matrix()

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int], ras: bool = False) -> "Geometry":
        """Inverse of :meth:`index_to_world_matrix` (``ras=True``: of :meth:`ras_affine`) for a grid of ``shape``
        ``(z, y, x)``: spacing from the column lengths, direction from the normalised columns."""
        lps = LPS_TO_RAS @ affine if ras else np.asarray(affine, dtype=np.float64)
        m = lps[:3, :3]
        spacing_xyz = np.linalg.norm(m, axis=0)
        direction = m / spacing_xyz
        return cls(tuple(shape), tuple(spacing_xyz[::-1]), tuple(lps[:3, 3]), tuple(direction.ravel()))

    @classmethod
    def from_itk(cls, size_xyz: Sequence[int], spacing_xyz: Sequence[float], origin: Sequence[float],
                 direction: Sequence[float]) -> "Geometry":
        """From ITK/SimpleITK's size, spacing (both ``(x, y, z)``), origin and direction."""
        return cls(tuple(size_xyz[::-1]), tuple(spacing_xyz[::-1]), tuple(origin), tuple(direction))

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


# --------------------------------------------------------------------- DICOM slices
def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """LPS normal of the slices of a DICOM ImageOrientationPatient (6 numbers: row then column direction):
    row x column, the direction along which slices are sorted and array z increases."""
    o = np.asarray(orientation, dtype=np.float64)
    return np.cross(o[:3], o[3:])


def direction_from_orientation(orientation: Sequence[float]) -> tuple[float, ...]:
    """ITK direction (9 numbers) of a DICOM series: columns row, column and :func:`slice_normal`."""
    o = np.asarray(orientation, dtype=np.float64)
    return tuple(np.stack([o[:3], o[3:], slice_normal(o)], axis=1).ravel())


# --------------------------------------------------------------------- pyramid levels
def level_positions(full_n: int, level_n: int) -> np.ndarray:
    """Full-resolution voxel index of each voxel of a pyramid level with ``level_n`` voxels along one axis (same
    field of view, voxel edges kept: the mapping of :meth:`Geometry.resized`)."""
    scale = full_n / level_n
    return (np.arange(level_n) + 0.5) * scale - 0.5


def level_to_normalized(full_n: int, level_n: int) -> tuple[float, float]:
    """``(a, b)`` such that ``a * p + b`` is the ``grid_sample`` coordinate (``align_corners=True``, -1 .. +1 over
    the level's voxel centres) on a level of ``level_n`` voxels of the full-resolution index ``p`` (one axis)."""
    r = level_n / full_n
    return 2.0 * r / max(level_n - 1, 1), 2.0 * (0.5 * level_n / full_n - 0.5) / max(level_n - 1, 1) - 1.0


def normalized_to_index(g, n: int, align_corners: bool = False):
    """``grid_sample`` coordinates ``g`` along an axis of ``n`` voxels -> continuous voxel index (numpy or torch):
    ``((g + 1) n - 1) / 2`` with ``align_corners=False`` (-1 and +1 are the outer voxel edges), ``(g + 1)(n - 1) / 2``
    with ``align_corners=True`` (-1 and +1 are the centres of voxels 0 and n-1)."""
    if align_corners:
        return (g + 1.0) * (n - 1) / 2.0
    return ((g + 1.0) * n - 1.0) / 2.0
