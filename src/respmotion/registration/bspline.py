"""Cubic B-spline displacement fields: control grid, separable evaluation, derivatives, storage.

A field is ``u(p) = sum_k c_k  b((p_z - q_kz)/s_z) b((p_y - q_ky)/s_y) b((p_x - q_kx)/s_x)`` with ``b`` the
cubic B-spline, control points ``c`` ``(3, Kz, Ky, Kx)`` in **mm** (components z, y, x along the array axes,
pull convention of :mod:`respmotion.core.types`) and control point ``k`` at full-resolution voxel index
``q_k = (k - 1) * stride`` per axis (control point 1 sits on voxel 0; one extra point before the first voxel and
two after the last one give every voxel its 4x4x4 support).

Evaluation is separable: for any set of sample positions along each axis we build a small dense
basis matrix ``B_axis`` ``(n_positions, K_axis)`` and compute ``u = B_z (B_y (c B_x^T))`` with three matrix
products (BLAS; autograd gives the transposed products for the backward pass).  The same code evaluates the
field on the full grid, on a coarse pyramid level, on a strided subset of voxels, and -- with derivative basis
matrices -- its Jacobian and bending energy.  The optimiser's regulariser, evaluated at the control points
themselves, is in :mod:`respmotion.registration.regulariser`.

Storage (:class:`BSplineField`): the control points (float32 by default, float16 on request: measured error
below) and a JSON record with the image geometry and the control grid; :func:`dense_field` is the one function
later stages call to get the dense :class:`~respmotion.core.types.DisplacementField` at load time.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core import warp as W
from ..core.geometry import Geometry
from ..core.types import DisplacementField
from ..io.atomic import atomic_path, read_npz

FORMAT = "respmotion.bspline/1"


# ----------------------------------------------------------------------------- control grid
@dataclass(frozen=True)
class ControlGrid:
    """Control lattice of a B-spline field over an image grid.

    Args:
        image_shape: full-resolution image shape ``(Z, Y, X)``.
        stride: control point spacing in full-resolution voxels ``(z, y, x)`` (may be fractional).
    """

    image_shape: tuple[int, int, int]
    stride: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(n) for n in self.image_shape))
        object.__setattr__(self, "stride", tuple(float(s) for s in self.stride))
        if len(self.image_shape) != 3 or len(self.stride) != 3 or min(self.stride) <= 0:
            raise ValueError(f"bad control grid: image shape {self.image_shape}, stride {self.stride}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of control points per axis ``(Kz, Ky, Kx)``."""
        return tuple(int(np.floor((n - 1) / s + 1e-9)) + 4 for n, s in zip(self.image_shape, self.stride))

    def positions(self, axis: int) -> np.ndarray:
        """Full-resolution voxel index of each control point along ``axis``."""
        return (np.arange(self.shape[axis]) - 1.0) * self.stride[axis]

    def to_dict(self) -> dict[str, Any]:
        return {"image_shape_zyx": list(self.image_shape), "stride_zyx_voxels": list(self.stride),
                "shape_zyx": list(self.shape), "first_point_index": -1.0}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlGrid":
        return cls(tuple(d["image_shape_zyx"]), tuple(d["stride_zyx_voxels"]))


def _bspline_weights(f: np.ndarray, deriv: int) -> np.ndarray:
    """Cubic B-spline weights ``(N, 4)`` of the 4 supporting points for fractional offsets ``f`` (N,)."""
    if deriv == 0:
        return np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], 1) / 6.0
    if deriv == 1:
        return np.stack([-((1 - f) ** 2), 3 * f**2 - 4 * f, -3 * f**2 + 2 * f + 1, f**2], 1) / 2.0
    if deriv == 2:
        return np.stack([1 - f, 3 * f - 2, 1 - 3 * f, f], 1)
    raise ValueError(f"derivative order {deriv} not supported")


def basis_matrix(positions: np.ndarray, stride: float, n_points: int, deriv: int = 0) -> np.ndarray:
    """Dense basis ``(len(positions), n_points)`` for full-resolution voxel positions along one axis.

    ``deriv`` = 1 or 2 gives d/dindex or d2/dindex2 (per full-resolution voxel, not per mm).
    """
    t = np.asarray(positions, dtype=np.float64) / stride + 1.0
    j = np.floor(t).astype(np.int64)
    f = t - j
    w = _bspline_weights(f, deriv) / stride**deriv
    out = np.zeros((len(t), n_points), dtype=np.float64)
    rows = np.arange(len(t))
    for a in range(4):
        col = j - 1 + a
        ok = (col >= 0) & (col < n_points)
        np.add.at(out, (rows[ok], col[ok]), w[ok, a])
    return out


# ----------------------------------------------------------------------------- evaluation (torch)
def evaluate(coef: torch.Tensor, bz: torch.Tensor, by: torch.Tensor, bx: torch.Tensor) -> torch.Tensor:
    """Separable evaluation: ``coef`` ``(B, C, Kz, Ky, Kx)`` -> ``(B, C, Nz, Ny, Nx)`` with ``B_axis`` ``(N, K)``."""
    b, c, kz, ky, kx = coef.shape
    t = torch.matmul(coef, bx.T)  # (B, C, Kz, Ky, Nx)
    n = b * c * kz
    t = torch.bmm(by.expand(n, -1, -1), t.reshape(n, ky, -1))  # (B*C*Kz, Ny, Nx)
    ny, nx = t.shape[-2:]
    # explicit bmm with the basis expanded: matmul(2-D, 3-D) transposes and copies the (large) result
    t = torch.bmm(bz.expand(b * c, -1, -1), t.reshape(b * c, kz, ny * nx))  # (B*C, Nz, Ny*Nx)
    return t.reshape(b, c, bz.shape[0], ny, nx)


def point_weights(grid: ControlGrid, points: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Supporting control points of arbitrary full-resolution voxel positions ``points`` ``(M, 3)`` (z, y, x
    voxel index): flat control point index ``(M, 64)`` (long) and B-spline weight ``(M, 64)``."""
    k = grid.shape
    idx, wts = [], []
    for ax in range(3):
        t = points[:, ax].to(torch.float64) / grid.stride[ax] + 1.0
        j = torch.floor(t)
        f = (t - j)[:, None]
        w = torch.cat([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], 1) / 6.0
        col = j.long()[:, None] - 1 + torch.arange(4, device=points.device)
        ok = (col >= 0) & (col < k[ax])
        idx.append(col.clamp(0, k[ax] - 1))
        wts.append(torch.where(ok, w, torch.zeros_like(w)))
    flat = (idx[0][:, :, None, None] * k[1] + idx[1][:, None, :, None]) * k[2] + idx[2][:, None, None, :]
    w = wts[0][:, :, None, None] * wts[1][:, None, :, None] * wts[2][:, None, None, :]  # (M, 4, 4, 4)
    return flat.reshape(-1, 64), w.reshape(-1, 64).to(dtype)


def evaluate_points(coef: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Field at the positions of :func:`point_weights`: ``coef`` ``(C, Kz, Ky, Kx)`` -> ``(C, M)``.  Gathers
    the 4x4x4 supporting control points of each position: cheap for a few thousand points (the folding repair),
    not for a grid (use :class:`Basis`)."""
    c = coef.reshape(coef.shape[0], -1).index_select(1, flat.reshape(-1)).view(coef.shape[0], *flat.shape)
    return (c * weights.to(coef.dtype)).sum(-1)


class Basis:
    """Basis matrices of one control grid for given per-axis sample positions (cached per device/dtype)."""

    def __init__(self, grid: ControlGrid, positions: Sequence[np.ndarray], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.grid = grid
        self.positions = [np.asarray(p, dtype=np.float64) for p in positions]
        self.device, self.dtype = torch.device(device), dtype
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def matrix(self, axis: int, deriv: int = 0) -> torch.Tensor:
        key = (axis, deriv)
        if key not in self._cache:
            m = basis_matrix(self.positions[axis], self.grid.stride[axis], self.grid.shape[axis], deriv)
            self._cache[key] = torch.as_tensor(m, dtype=self.dtype, device=self.device)
        return self._cache[key]

    def field(self, coef: torch.Tensor, derivs: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
        """Field (or a partial derivative per voxel index, ``derivs`` per axis z, y, x) at the positions."""
        return evaluate(coef, self.matrix(0, derivs[0]), self.matrix(1, derivs[1]), self.matrix(2, derivs[2]))

    @classmethod
    def full(cls, grid: ControlGrid, device: torch.device | str = "cpu", dtype=torch.float32) -> "Basis":
        return cls(grid, [np.arange(n, dtype=np.float64) for n in grid.image_shape], device, dtype)


def jacobian_determinant(basis: Basis, coef_mm: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Analytic det of the Jacobian of ``p -> p + u(p)`` at the basis positions, ``(B, Nz, Ny, Nx)``.

    Same quantity as :func:`respmotion.core.warp.jacobian_determinant` (which uses finite differences).
    """
    coef_vox = W.mm_to_voxels(coef_mm, spacing)
    d = [basis.field(coef_vox, tuple(int(a == j) for a in range(3))) for j in range(3)]  # d u_vox / d idx_j
    return W.det3([[d[col][:, row] + (1.0 if row == col else 0.0) for col in range(3)] for row in range(3)])


def bending_energy(basis: Basis, coef_mm: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean bending energy per pair ``(B,)`` in mm^-2: sum of squared second derivatives (mm/mm^2) of the
    three components (mixed terms counted twice), averaged over the basis positions."""
    total = 0.0
    for a in range(3):
        for b in range(a, 3):
            derivs = [0, 0, 0]
            derivs[a] += 1
            derivs[b] += 1
            d2 = basis.field(coef_mm, tuple(derivs)) / W.step_mm(spacing, (a, b))
            total = total + (1.0 if a == b else 2.0) * (d2**2).sum(1).mean(dim=(1, 2, 3))
    return total


def blend_weight(region: np.ndarray, spacing: Sequence[float], ramp_mm: float) -> np.ndarray:
    """Weight of the inside field of a sliding pair, float32 ``(z, y, x)``: 1 in the binary ``region``, falling
    outside it as ``(1 + cos(pi d / ramp_mm)) / 2`` with the distance ``d`` (mm, ``spacing`` (z, y, x)) to the
    region, 0 from ``ramp_mm`` on (``ramp_mm`` 0: the region itself).  Tissue just outside a threshold lung mask
    still follows the lung (the mask stops short of the pleura; docs/registration.md)."""
    region = np.asarray(region) > 0
    if ramp_mm <= 0 or not region.any():
        return region.astype(np.float32)
    from scipy import ndimage

    # the distance is only needed up to ramp_mm: crop to the region's box grown by that much (same values)
    nz = np.argwhere(region)
    grow = np.ceil(float(ramp_mm) / np.asarray(spacing, dtype=float)).astype(int) + 1
    lo = np.maximum(nz.min(0) - grow, 0)
    hi = np.minimum(nz.max(0) + 1 + grow, region.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    d = ndimage.distance_transform_edt(~region[box], sampling=tuple(float(v) for v in spacing))
    out = np.zeros(region.shape, np.float32)
    out[box] = 0.5 * (1.0 + np.cos(np.pi * np.minimum(d, ramp_mm) / ramp_mm))  # cos(pi) = -1: 0 from ramp_mm on
    return out


# ----------------------------------------------------------------------------- storage
@dataclass
class BSplineField:
    """Stored registration result on the fixed image's grid (pull, mm, components z, y, x).

    ``coef``: control points ``(3, Kz, Ky, Kx)`` in mm, or ``(2, 3, Kz, Ky, Kx)`` for a sliding pair: field 0
    applies inside ``lung`` (the fixed phase's sliding region ``(z, y, x)``, 0/1), field 1 outside, blended over
    ``ramp_mm`` outside the region (:func:`blend_weight`).  ``meta`` (pair, quality record, settings) is saved as
    JSON.
    """

    coef: np.ndarray
    grid: ControlGrid
    geometry: Geometry
    meta: dict[str, Any] = field(default_factory=dict)
    lung: np.ndarray | None = None
    ramp_mm: float = 0.0

    def __post_init__(self) -> None:
        k = tuple(self.grid.shape)
        if self.coef.shape not in ((3, *k), (2, 3, *k)):
            raise ValueError(f"control points shape {self.coef.shape} is neither (3, {k}) nor (2, 3, {k})")
        if tuple(self.geometry.shape) != tuple(self.grid.image_shape):
            raise ValueError(f"geometry shape {self.geometry.shape} != control grid image shape {self.grid.image_shape}")
        if self.sliding and (self.lung is None or tuple(self.lung.shape) != tuple(self.geometry.shape)):
            raise ValueError("a sliding B-spline field needs a lung mask of the fixed image's shape")

    @property
    def sliding(self) -> bool:
        return self.coef.ndim == 5

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "convention": "pull; control points (3,z,y,x) mm along array axes",
                "geometry": self.geometry.to_dict(), "control_grid": self.grid.to_dict(),
                "sliding": self.sliding, "sliding_ramp_mm": float(self.ramp_mm), "dtype": str(self.coef.dtype),
                "meta": self.meta}

    def weight(self) -> np.ndarray | None:
        """The inside field's weight ``(z, y, x)`` float32 (:func:`blend_weight`), or None for one field."""
        return None if self.lung is None else blend_weight(self.lung, self.geometry.spacing, self.ramp_mm)


def dense_tensor(coef: torch.Tensor, grid: ControlGrid, inside_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Dense field ``(B, 3, Z, Y, X)`` mm from control points ``(B, 3, K...)`` or sliding ``(B, 2, 3, K...)``
    (then ``inside_weight`` ``(B, Z, Y, X)`` in [0, 1] blends inside/outside)."""
    basis = Basis.full(grid, coef.device, coef.dtype)
    if coef.ndim == 5:
        return basis.field(coef)
    w = inside_weight.to(coef.dtype)[:, None]
    return w * basis.field(coef[:, 0]) + (1.0 - w) * basis.field(coef[:, 1])


def dense_field(stored: BSplineField | str | os.PathLike, device: str | torch.device = "cpu") -> DisplacementField:
    """Dense pull field ``(3, z, y, x)`` in mm on the fixed image's grid from stored control points (or a path).

    This is the one load-time conversion: ``fixed(p) ~= moving(p + u(p))``.
    """
    if not isinstance(stored, BSplineField):
        stored = load_bspline(stored)
    coef = torch.as_tensor(stored.coef.astype(np.float32), device=device)[None]
    weight = stored.weight()
    lung = None if weight is None else torch.as_tensor(weight, device=device)[None]
    u = dense_tensor(coef, stored.grid, lung)[0]
    return DisplacementField(u.cpu().numpy().astype(np.float32), stored.geometry, dict(stored.meta))


def save_bspline(stored: BSplineField, path: str | os.PathLike) -> Path:
    """Write one ``.npz`` atomically: ``coef``, ``header`` (JSON text) and for sliding pairs ``lung_bits``."""
    path = Path(path)
    arrays = {"coef": np.ascontiguousarray(stored.coef),
              "header": np.frombuffer(json.dumps(stored.header(), default=_json_default).encode(), dtype=np.uint8)}
    if stored.lung is not None:
        arrays["lung_bits"] = np.packbits(stored.lung.astype(bool).ravel())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def load_bspline(path: str | os.PathLike) -> BSplineField:
    """Read a stored B-spline field; a damaged or foreign file raises ``ValueError`` naming it."""
    path = Path(path)
    z = read_npz(path)
    try:
        coef = z["coef"]
        head = json.loads(bytes(z["header"]).decode())
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable B-spline field ({type(exc).__name__}: {exc})") from exc
    bits = z.get("lung_bits")
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        found = head.get("format") if isinstance(head, dict) else type(head).__name__
        raise ValueError(f"{path}: unknown format {found!r} (expected {FORMAT})")
    try:
        geometry = Geometry.from_dict(head["geometry"])
        lung = None
        if bits is not None:
            n = int(np.prod(geometry.shape))
            if bits.size * 8 < n:
                raise ValueError(f"lung mask has {bits.size * 8} bits for {n} voxels")
            lung = np.unpackbits(bits, count=n).reshape(geometry.shape)
        return BSplineField(coef, ControlGrid.from_dict(head["control_grid"]), geometry, head.get("meta", {}), lung,
                            float(head.get("sliding_ramp_mm", 0.0)))  # files written before the ramp: none
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: inconsistent B-spline record ({exc})") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
