"""The phantom's reference anatomy (:class:`Anatomy`): a thoracic CT in HU drawn once in the end-inhale (phase 00)
frame, with its lung mask, nodules and landmarks.

Body with a fat layer, chest-wall muscle, ribs, spine, two lungs with a textured parenchyma, branching vessels and
nodules, heart, liver and a stomach gas bubble, a domed diaphragm.  The drawing grid (the *fine* grid) has the
base grid's y and x samples and half its z spacing, and extends :data:`~.params.EXT_BELOW_MM` below and
:data:`~.params.EXT_ABOVE_MM` above the field of view, so that the motion can pull anatomy in from there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...core import grid
from ...core.geometry import Geometry
from .params import (EXT_ABOVE_MM, EXT_BELOW_MM, FOV_MM, HU_AIR, HU_BLOOD, HU_BONE, HU_FAT, HU_LIVER, HU_LUNG,
                     HU_SOFT, SPINE_R, SPINE_Y, PhantomParams)


class Anatomy:
    """One patient's reference anatomy on the fine grid (LPS mm, ``(z, y, x)``).

    ``image``: HU ``(nzf, ny, nx)`` float32; ``lung``: lung mask, same shape, bool; ``nodules``: ``(centre (z, y,
    x) mm, radius mm)``; ``landmarks_ref``: reference positions (z, y, x) mm with their ``landmark_kind``
    (nodule, vessel_bifurcation, chest_wall, lung_parenchyma, below_diaphragm).  ``fine_z`` (mm), ``fine_dz``
    (mm), ``ys``, ``xs`` (mm): the fine grid's axes.  ``rng`` is advanced by the drawing (texture, vessels,
    nodules, landmarks)."""

    def __init__(self, p: PhantomParams, rng: np.random.Generator, geometry: Geometry, seed: int):
        self.p, self.rng, self.seed = p, rng, int(seed)
        # fine reference grid: z spacing halved, extended beyond the FOV; same y, x samples
        self.fine_dz = float(grid.to_mm(0.5, geometry.spacing[0]))
        z0 = -FOV_MM[0] / 2 - EXT_BELOW_MM
        nzf = int(math.ceil(grid.to_voxels(FOV_MM[0] + EXT_BELOW_MM + EXT_ABOVE_MM, self.fine_dz)))
        self.fine_z = grid.centres_from_edge(nzf, self.fine_dz, z0)
        self.ys = geometry.axis_mm(1)
        self.xs = geometry.axis_mm(2)
        self._draw()

    def _smooth_noise(self, shape: tuple[int, int, int], factor: int) -> np.ndarray:
        """Unit-sd noise of ``shape``, smooth over about ``factor`` voxels (trilinear upsampling)."""
        small = [max(2, s // factor) for s in shape]
        n = torch.from_numpy(self.rng.standard_normal(small).astype(np.float32))[None, None]
        up = F.interpolate(n, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
        return up / (up.std() + 1e-6)

    def _draw(self) -> None:
        p, rng = self.p, self.rng
        Z = self.fine_z[:, None, None]
        Y = self.ys[None, :, None]
        X = self.xs[None, None, :]
        shape = (len(self.fine_z), len(self.ys), len(self.xs))
        img = np.full(shape, HU_AIR, dtype=np.float32)

        body_r = np.sqrt((X / p.body_ax) ** 2 + (Y / p.body_ay) ** 2)  # (1, ny, nx)
        body = np.broadcast_to(body_r <= 1.0, shape)
        fat = body_r > 1.0 - 12.0 / p.body_ay
        img[body] = HU_SOFT
        img[np.broadcast_to(fat & (body_r <= 1.0), shape)] = HU_FAT
        soft_tex = self._smooth_noise(shape, 8) * 12.0
        img += np.where(body, soft_tex, 0.0).astype(np.float32)

        # spine: vertebral body + canal, posterior midline
        sy, srad = SPINE_Y * p.body_ay, SPINE_R
        spine_r = np.sqrt(X**2 + (Y - sy) ** 2)
        img[np.broadcast_to(spine_r < srad, shape)] = HU_BONE
        img[np.broadcast_to(np.sqrt(X**2 + (Y - sy - 24) ** 2) < 8, shape)] = HU_SOFT

        # ribs: bone bands on a shell just outside the cavity, periodic along z
        cav = p.cavity_r(Y, X)  # (1, ny, nx)
        shell = (cav > 1.02) & (cav < 1.10)
        angle = np.arctan2(Y, X)
        rib_phase = np.sin(2 * math.pi * (Z + 6.0 * angle) / 26.0)  # ribs slope
        ribs = shell & (rib_phase > 0.55) & (Y < 0.7 * p.body_ay)
        img[ribs] = HU_BONE

        # lungs: inside the cavity, above the diaphragm, outside the mediastinum
        zd = p.dome(Y, X)
        med_half = 22.0 + 18.0 * np.clip(1.0 - (Y + 0.3 * p.body_ay) ** 2 / (0.5 * p.body_ay) ** 2, 0, 1)
        lungs = (cav < 0.985) & (Z > zd + 1.5) & (np.abs(X) > med_half)
        lungs = np.broadcast_to(lungs, shape)
        self.lung = lungs.copy()
        lung_tex = self._smooth_noise(shape, 2) * 45.0 + self._smooth_noise(shape, 8) * 25.0
        img[lungs] = (HU_LUNG + lung_tex)[lungs]

        # heart: ellipsoid anterior-left, resting on the diaphragm
        hc = (zd.mean() * 0 + p.dome_z + p.dome_height + 28.0, -0.25 * p.body_ay, 18.0)
        heart = ((Z - hc[0]) / 42.0) ** 2 + ((Y - hc[1]) / 45.0) ** 2 + ((X - hc[2]) / 55.0) ** 2 < 1.0
        heart &= Z > zd
        img[heart] = HU_BLOOD + 10.0

        # abdomen below the diaphragm inside the cavity: liver (right), stomach gas (left)
        abd = (Z <= zd) & (cav < 1.0)
        img[abd & (X < 10)] = HU_LIVER
        stomach = (((Z - (p.dome_z - 18)) / 18.0) ** 2 + ((Y + 0.2 * p.body_ay) / 25.0) ** 2
                   + ((X - 55.0) / 30.0) ** 2) < 1.0
        img[stomach & abd] = HU_AIR + 50.0

        # vessels: branching tubes from the hila, only inside the lungs
        self.landmarks_ref: list[np.ndarray] = []
        self.landmark_kind: list[str] = []
        for side in (-1.0, 1.0):
            hilum = np.array([p.dome_z + p.dome_height + 45.0, -0.05 * p.body_ay, side * 34.0])
            for d0 in ([-0.6, 0.1, side], [0.5, -0.2, side], [-0.2, 0.6, 0.6 * side], [-0.3, -0.6, 0.6 * side]):
                self._grow(img, lungs, hilum, np.array(d0), 32.0, 3.5, 5)

        # nodules (the first one in the right lower lobe, the GTV stand-in)
        self.nodules: list[tuple[np.ndarray, float]] = []
        for i in range(2):
            for _ in range(200):
                if i == 0:
                    c = np.array([p.dome_z + p.dome_height + rng.uniform(12, 30), rng.uniform(-0.3, 0.3) * p.body_ay,
                                  -rng.uniform(55, 90)])
                else:
                    c = np.array([rng.uniform(-10, 50), rng.uniform(-0.4, 0.4) * p.body_ay,
                                  rng.choice([-1, 1]) * rng.uniform(50, 95)])
                r = rng.uniform(5.0, 8.0)
                if self.inside_lung(c, margin=r + 3.0):
                    break
            else:
                raise RuntimeError(f"phantom seed {self.seed}: could not place a nodule")
            d = np.sqrt((Z - c[0]) ** 2 + (Y - c[1]) ** 2 + (X - c[2]) ** 2)
            img[d < r] = HU_SOFT - 10.0 + 0.0
            self.nodules.append((c, r))
            self.landmarks_ref.append(c)
            self.landmark_kind.append("nodule")

        # extra landmarks: on ribs/spine (outside lungs) and random lung points near the base
        # in the lateral chest walls (ribs, muscle; thick enough to hold a landmark beyond the sliding margin),
        # 8 a side, outside the cavity by 55-100 % of the wall's depth (up to 18 % of the cavity radius and
        # SKIN_DEPTH_MM under the skin)
        for i in range(16):
            a = rng.uniform(-math.pi * 0.3, math.pi * 0.3) + math.pi * (i % 2)
            rr = 1.0 + rng.uniform(0.55, 1.0) * min(0.18, p.chest_wall_radius(a) - 1.0)
            pt = np.array([rng.uniform(-40, 50), rr * p.body_ay * p.cavity_scale * math.sin(a) - 0.08 * p.body_ay,
                           rr * p.body_ax * p.cavity_scale * math.cos(a)])
            self.landmarks_ref.append(pt)
            self.landmark_kind.append("chest_wall")
        # random lung points and points just below the lung base (sliding / abdomen)
        lung_idx = np.argwhere(lungs[:: 4, :: 4, :: 4])
        for i in rng.choice(len(lung_idx), size=min(300, len(lung_idx)), replace=False):
            iz, iy, ix = lung_idx[i] * 4
            self.landmarks_ref.append(np.array([self.fine_z[iz], self.ys[iy], self.xs[ix]]))
            self.landmark_kind.append("lung_parenchyma")
        for _ in range(40):
            a = rng.uniform(0, 2 * math.pi)
            r = rng.uniform(0.2, 0.95)
            yy = r * math.sin(a) * p.body_ay * p.cavity_scale - 0.08 * p.body_ay
            xx = r * math.cos(a) * p.body_ax * p.cavity_scale
            zz = float(p.dome(np.array(yy), np.array(xx))) - rng.uniform(3, 15)
            self.landmarks_ref.append(np.array([zz, yy, xx]))
            self.landmark_kind.append("below_diaphragm")
        self.image = img

    def inside_lung(self, c: np.ndarray, margin: float = 0.0) -> bool:
        """Whether the point ``c`` (z, y, x) mm and its six neighbours ``margin`` mm away along the axes are all
        in the reference lung mask (nearest fine-grid voxel; False outside the fine grid)."""
        offs = np.array([[0, 0, 0], [margin, 0, 0], [-margin, 0, 0], [0, margin, 0], [0, -margin, 0], [0, 0, margin],
                         [0, 0, -margin]])
        for o in offs:
            q = c + o
            iz = int(round(grid.axis_index(q[0], self.fine_z[0], self.fine_dz)))
            iy = int(round(grid.axis_index(q[1], self.ys[0], self.ys[1] - self.ys[0])))
            ix = int(round(grid.axis_index(q[2], self.xs[0], self.xs[1] - self.xs[0])))
            if not (0 <= iz < len(self.fine_z) and 0 <= iy < len(self.ys) and 0 <= ix < len(self.xs)):
                return False
            if not self.lung[iz, iy, ix]:
                return False
        return True

    def _grow(self, img, lungs, start, direction, length, radius, depth) -> None:
        """Draw one vessel segment and recurse into two thinner children (bifurcation landmarks)."""
        rng = self.rng
        d = direction / np.linalg.norm(direction)
        end = start + d * length
        self._tube(img, lungs, start, end, radius)
        if self.inside_lung(end):
            self.landmarks_ref.append(end)
            self.landmark_kind.append("vessel_bifurcation")
        if depth == 0:
            return
        for _ in range(2):
            nd = d + rng.normal(0, 0.6, 3)
            nd[0] -= 0.15  # the trees spread towards the base
            self._grow(img, lungs, end, nd, length * rng.uniform(0.6, 0.85), max(0.9, radius * 0.75), depth - 1)

    def _tube(self, img, lungs, a, b, radius) -> None:
        """Draw a vessel (HU_BLOOD, soft edge of about one voxel) of ``radius`` mm from ``a`` to ``b`` (mm) into
        ``img``, inside ``lungs`` only and never darker than what is there."""
        dy, dx = self.ys[1] - self.ys[0], self.xs[1] - self.xs[0]
        lo = np.minimum(a, b) - radius - 2
        hi = np.maximum(a, b) + radius + 2
        axes = ((self.fine_z, self.fine_dz), (self.ys, dy), (self.xs, dx))
        (iz0, iz1), (iy0, iy1), (ix0, ix1) = (
            (max(0, int(grid.axis_index(lo[a], c[0], d))), min(len(c), int(grid.axis_index(hi[a], c[0], d)) + 2))
            for a, (c, d) in enumerate(axes))
        if iz0 >= iz1 or iy0 >= iy1 or ix0 >= ix1:
            return
        Z = self.fine_z[iz0:iz1, None, None]
        Y = self.ys[None, iy0:iy1, None]
        X = self.xs[None, None, ix0:ix1]
        ab = b - a
        t = ((Z - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (X - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((Z - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (X - a[2] - t * ab[2]) ** 2)
        prof = np.clip(radius + 0.5 - dist, 0.0, 1.0)  # ~1 voxel soft edge
        sub = img[iz0:iz1, iy0:iy1, ix0:ix1]
        inside = lungs[iz0:iz1, iy0:iy1, ix0:ix1]
        val = sub + prof * (HU_BLOOD - sub)
        sub[inside] = np.maximum(sub, val)[inside]

    # ------------------------------------------------------------------ sampling
    def filtered_stack(self) -> np.ndarray:
        """Reference image and lung occupancy ``(2, nzf, ny, nx)`` float32 on the fine grid, box-filtered over one
        base slice along z (partial-volume averaging of the two fine sub-slices of a base voxel); cached."""
        if not hasattr(self, "_stack"):
            st = np.stack([self.image, self.lung.astype(np.float32)])
            pad = np.concatenate([st[:, :1], st, st[:, -1:]], axis=1)
            self._stack = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
        return self._stack

    def sample(self, pts_z: np.ndarray, pts_y: np.ndarray, pts_x: np.ndarray) -> np.ndarray:
        """Trilinear sample of :meth:`filtered_stack` at mm points (clamped to the fine grid's edge) ->
        ``(2, *pts_z.shape)``: HU and lung occupancy in [0, 1]."""
        fine = self.filtered_stack()
        n = fine.shape[1:]
        # normalised grid_sample coordinates (x, y, z order), float32: 4e-5 mm at this field of view
        axes = [(pts_x, self.xs[0], self.xs[1] - self.xs[0], n[2]), (pts_y, self.ys[0], self.ys[1] - self.ys[0], n[1]),
                (pts_z, self.fine_z[0], self.fine_dz, n[0])]
        g = torch.stack([grid.axis_to_normalized_(torch.as_tensor(np.asarray(p, np.float32)), o, d, m)
                         for p, o, d, m in axes], -1).reshape(1, -1, 1, 1, 3)
        src = torch.from_numpy(np.ascontiguousarray(fine, dtype=np.float32))[None]
        out = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape((fine.shape[0],) + pts_z.shape).numpy()
