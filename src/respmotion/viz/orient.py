"""Display orientation: every slice the renderer shows goes through this module.

Display convention (radiological, written down here and tested in ``tests/test_render.py``):

* **axial**: looking from the feet; patient's **right on the image left**, **anterior at the top**.
* **coronal**: looking from the front; patient's **right on the image left**, **superior at the top**.
* **sagittal**: looking from the patient's left; **anterior on the image left**, **superior at the top**.
* Pixels keep their physical aspect ratio: images are drawn with an extent in mm, so a coronal
  view of a volume with 3 mm slices and 1.4 mm pixels is as tall as it is in the body.

How: a volume ``(z, y, x)`` on any axis-aligned geometry is first turned into the *canonical
display array* ``C[s, p, l]`` whose axes run inferior->superior, anterior->posterior and
right->left (the LPS directions), by transposing and flipping array axes according to the
geometry's direction (:meth:`~respmotion.core.geometry.Geometry.nearest_world_axes`: each array axis is
matched to the world axis it is closest to, so an oblique volume is shown along its nearest axes).  Displacement fields get the same
transpose/flip, with the components permuted and negated to match.  Views then slice ``C``:

===========  ===========  ==========================  ==================
view         slice axis   rows (top -> bottom)        columns (left -> right)
===========  ===========  ==========================  ==================
axial        s            anterior -> posterior       right -> left
coronal      p            superior -> inferior        right -> left
sagittal     l            superior -> inferior        anterior -> posterior
===========  ===========  ==========================  ==================

Slice numbers reported by the renderer are indices along the slice axis of ``C`` (equal to the
array index for the usual LPS-aligned CT, whose array axes already run that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.geometry import Geometry


@dataclass(frozen=True)
class ViewSpec:
    """Which canonical axes a view uses (axes of ``C``: 0 = S, 1 = P, 2 = L)."""

    name: str
    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool  # True: row 0 is the highest index along row_axis (superior at the top)
    labels: tuple[str, str, str, str]  # orientation letters (left, right, top, bottom)


VIEW_SPECS: dict[str, ViewSpec] = {
    "axial": ViewSpec("axial", 0, 1, 2, False, ("R", "L", "A", "P")),
    "coronal": ViewSpec("coronal", 1, 0, 2, True, ("R", "L", "S", "I")),
    "sagittal": ViewSpec("sagittal", 2, 0, 1, True, ("A", "P", "S", "I")),
}


@dataclass(frozen=True)
class Canonical:
    """Transpose + flips taking a ``(z, y, x)`` array of ``geometry`` to the display array ``C``.

    ``perm[c]`` is the source array axis shown as canonical axis ``c``; ``flip[c]`` says whether
    that axis runs against the canonical (LPS) direction and is reversed.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]  # mm along canonical axes (S, P, L)
    max_obliquity_deg: float

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> "Canonical":
        perm = [-1, -1, -1]
        flip = [False, False, False]
        worst = 0.0
        for a, (w, sign, tilt) in enumerate(geometry.nearest_world_axes()):  # array axis a: 0 = z, 1 = y, 2 = x
            c = 2 - w  # world axis 0 = x (L), 1 = y (P), 2 = z (S) is canonical axis 2, 1, 0
            if perm[c] != -1:
                raise ValueError(f"direction matrix {geometry.direction} maps two array axes onto one world axis")
            perm[c] = a
            flip[c] = sign < 0
            worst = max(worst, tilt)
        spacing = tuple(float(geometry.spacing[perm[c]]) for c in range(3))
        return cls(tuple(perm), tuple(flip), spacing, worst)  # type: ignore[arg-type]

    def volume(self, array: np.ndarray) -> np.ndarray:
        """``(z, y, x)`` array -> canonical ``(S, P, L)`` array (a view, no copy)."""
        out = np.transpose(array, self.perm)
        for c in range(3):
            if self.flip[c]:
                out = np.flip(out, axis=c)
        return out

    def field(self, array: np.ndarray) -> np.ndarray:
        """``(3, z, y, x)`` field (mm along array axes) -> ``(3, S, P, L)`` components along ``C``'s axes."""
        comps = []
        for c in range(3):
            comp = self.volume(array[self.perm[c]])
            comps.append(-comp if self.flip[c] else comp)
        return np.stack(comps)


def slice_count(shape_c: tuple[int, ...], view: str) -> int:
    """Number of slices of a canonical array of shape ``shape_c`` along ``view``'s slice axis."""
    return int(shape_c[VIEW_SPECS[view].slice_axis])


def view_slice(array_c: np.ndarray, view: str, index: int) -> np.ndarray:
    """2D display image (rows top -> bottom, columns left -> right) of canonical ``(S, P, L)`` data."""
    spec = VIEW_SPECS[view]
    img = np.take(array_c, index, axis=spec.slice_axis)
    # remaining axes keep their order: axial (P, L), coronal (S, L), sagittal (S, P)
    if spec.flip_rows:
        img = img[::-1, :]
    return np.ascontiguousarray(img)


def view_vectors(field_c: np.ndarray, view: str, index: int) -> np.ndarray:
    """In-plane display components ``(2, rows, cols)`` in mm: ``[0]`` towards the image right,
    ``[1]`` towards the image bottom, of a canonical field ``(3, S, P, L)``."""
    spec = VIEW_SPECS[view]
    right = view_slice(field_c[spec.col_axis], view, index)
    down = view_slice(field_c[spec.row_axis], view, index)
    if spec.flip_rows:
        down = -down
    return np.stack([right, down])


def view_spacing(canon: Canonical, view: str) -> tuple[float, float]:
    """Pixel size ``(row mm, column mm)`` of ``view``."""
    spec = VIEW_SPECS[view]
    return canon.spacing[spec.row_axis], canon.spacing[spec.col_axis]


def choose_slices(n: int, num: int, start_from: str) -> list[int]:
    """``num`` consecutive slice indices out of ``n`` (the research code's ``--start_from``).

    ``middle``: centred on ``n // 2`` (5 slices -> middle-2 .. middle+2); ``first``: ``0..num-1``;
    ``last``: the last ``num``.  ``num`` is clipped to ``n``.
    """
    num = max(1, min(int(num), n))
    if start_from == "middle":
        start = min(max(n // 2 - num // 2, 0), n - num)
    elif start_from == "first":
        start = 0
    elif start_from == "last":
        start = n - num
    else:
        raise ValueError(f"start_from must be middle, first or last, got {start_from!r}")
    return list(range(start, start + num))
