"""Draw one GIF frame (one or more panels side by side) with matplotlib's Agg canvas.

A frame is an RGB ``uint8`` array of exactly ``(panel_px, n_panels * panel_px, 3)``.  Images are
drawn with an extent in millimetres so the physical aspect ratio is kept (see
:mod:`respmotion.viz.orient` for the orientation convention).

Arrows show tissue motion since the reference phase: the arrow at a grid point ``p`` of the
current phase has its head at ``p`` and its tail at ``p + s * u(p)``, where ``u`` is the pull field
(``phase_k(p) = phase_00(p + u(p))``) and ``s`` the arrow scale.  With ``s = 1`` the tail is
exactly where that tissue was at phase 00.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..core import grid

DPI = 100
BACKGROUND = "#111111"
TEXT = "#f0f0f0"
ARROW_COLOR = "#ffd21f"
CONTOUR_COLORS = ("#ff2020", "#20ff40", "#2890ff", "#ff20ff", "#20ffff", "#ff9a20")
_IMAGE_RECT = (0.04, 0.10, 0.74, 0.79)  # within a panel: left, bottom, width, height
_CBAR_RECT = (0.82, 0.17, 0.035, 0.64)


@dataclass
class Panel:
    """One image panel.

    Attributes:
        image: 2D display slice (rows top -> bottom), HU for ``kind="ct"``, HU difference for ``"diff"``.
        spacing: pixel size ``(row mm, column mm)``.
        labels: orientation letters (left, right, top, bottom).
        title: text above the panel.
        kind: ``"ct"`` (grey window) or ``"diff"`` (diverging colour map with an HU colour bar).
        vectors: optional pull-field components ``(2, rows, cols)`` mm (right, down) for arrows.
        magnitude: optional ``|u|`` (rows, cols) mm for the heatmap.
        contours: 2D boolean masks, one per structure, outlined in :data:`CONTOUR_COLORS` order.
    """

    image: np.ndarray
    spacing: tuple[float, float]
    labels: tuple[str, str, str, str]
    title: str = ""
    kind: str = "ct"
    vectors: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    contours: list[np.ndarray] = field(default_factory=list)


@dataclass
class Scales:
    """Display scales shared by all frames of one GIF (so colours and arrows are comparable), built by
    :mod:`respmotion.viz.cycle` from a :class:`respmotion.viz.config.RenderConfig` (where the windows' defaults are)
    and the size of the motion."""

    display_window_hu: tuple[float, float]
    diff_window_hu: float
    magnitude_max_mm: float
    arrow_step: tuple[int, int]  # voxels between arrows (rows, cols)
    arrow_scale: float
    arrow_key_mm: float
    heatmap_alpha: float


def nice_floor(x: float) -> float:
    """Largest number of the 1-2-5 series (..., 0.5, 1, 2, 5, 10, ...) that is <= ``x``."""
    if not x > 0:
        raise ValueError(f"nice_floor needs a positive number, got {x}")
    e = np.floor(np.log10(x))
    for m in (5.0, 2.0, 1.0):
        if m * 10**e <= x * (1 + 1e-9):
            return float(m * 10**e)
    return float(10 ** (e - 1) * 5)


def _extent(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) in mm with y growing downwards."""
    height, width = grid.to_mm(shape, spacing)
    return (0.0, float(width), float(height), 0.0)


def _centres(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in mm from the panel's top-left corner: columns (x), rows (y)."""
    ys = grid.centres_from_edge(shape[0], spacing[0])
    xs = grid.centres_from_edge(shape[1], spacing[1])
    return xs, ys


def _draw_arrows(ax, panel: Panel, scales: Scales, key_xy: tuple[float, float]) -> None:
    vec = panel.vectors
    assert vec is not None
    rs, cs = scales.arrow_step
    r0, c0 = rs // 2, cs // 2
    xs, ys = _centres(panel.image.shape, panel.spacing)
    sub = vec[:, r0::rs, c0::cs]
    gx, gy = np.meshgrid(xs[c0::cs], ys[r0::rs])
    length = np.hypot(sub[0], sub[1])
    keep = length > 0.05  # mm; zero-length arrows would be drawn as dots
    # head at p (where the tissue is now), tail at p + s*u (where it was at phase 00)
    q = ax.quiver(
        gx[keep], gy[keep], -sub[0][keep], -sub[1][keep],
        angles="xy", scale_units="xy", scale=1.0 / scales.arrow_scale, pivot="tip",
        color=ARROW_COLOR, width=0.004, headwidth=3.5, headlength=4.0, minlength=0.0,
    )
    # key: an arrow of arrow_key_mm displacement, drawn at the same scale (bottom right of the panel)
    ax.quiverkey(q, key_xy[0], key_xy[1], scales.arrow_key_mm, f"{scales.arrow_key_mm:g} mm", labelpos="E",
                 coordinates="figure", color=ARROW_COLOR, labelcolor=TEXT, fontproperties={"size": 7})


def _draw_panel(fig: Figure, left: float, width: float, panel: Panel, scales: Scales) -> None:
    x0, y0, w, h = _IMAGE_RECT
    ax = fig.add_axes((left + x0 * width, y0, w * width, h))
    ax.set_facecolor(BACKGROUND)
    ext = _extent(panel.image.shape, panel.spacing)
    if panel.kind == "ct":
        lo, hi = scales.display_window_hu
        ax.imshow(panel.image, cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        mappable, label = None, ""
    elif panel.kind == "diff":
        d = scales.diff_window_hu
        mappable = ax.imshow(panel.image, cmap="RdBu_r", vmin=-d, vmax=d, extent=ext, interpolation="nearest")
        label = "HU"
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    if panel.magnitude is not None:
        mag = np.ma.masked_less(panel.magnitude, 0.02 * scales.magnitude_max_mm)
        mappable = ax.imshow(mag, cmap="turbo", vmin=0.0, vmax=scales.magnitude_max_mm, extent=ext,
                             alpha=scales.heatmap_alpha, interpolation="nearest")
        label = "|u| (mm)"
    if panel.vectors is not None:
        _draw_arrows(ax, panel, scales, (left + 0.80 * width, 0.07))
    xs, ys = _centres(panel.image.shape, panel.spacing)
    for i, mask in enumerate(panel.contours):
        if mask.any() and not mask.all():
            ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[CONTOUR_COLORS[i % len(CONTOUR_COLORS)]],
                       linewidths=1.5)
    ax.set_xlim(ext[0], ext[1])
    ax.set_ylim(ext[2], ext[3])
    ax.set_aspect("equal")
    ax.set_axis_off()  # no ticks or spines (also skips drawing the axis machinery)
    lft, rgt, top, bot = panel.labels
    W, H = ext[1], ext[2]
    style = {"color": TEXT, "fontsize": 8, "fontweight": "bold"}
    ax.text(-0.01 * W, H / 2, lft, ha="right", va="center", **style)
    ax.text(1.01 * W, H / 2, rgt, ha="left", va="center", **style)
    ax.text(W / 2, -0.01 * H, top, ha="center", va="bottom", **style)
    ax.text(W / 2, 1.01 * H, bot, ha="center", va="top", **style)
    if panel.title:
        fig.text(left + 0.5 * width, 0.935, panel.title, ha="center", va="center", color=TEXT, fontsize=9)
    if mappable is not None:
        cx, cy, cw, ch = _CBAR_RECT
        cax = fig.add_axes((left + cx * width, cy, cw * width, ch))
        cb = fig.colorbar(mappable, cax=cax)
        cb.set_label(label, color=TEXT, fontsize=8)
        cb.ax.tick_params(colors=TEXT, labelsize=7)
        cb.outline.set_edgecolor(TEXT)


def render_frame(panels: list[Panel], scales: Scales, panel_px: int, title: str = "", note: str = "") -> np.ndarray:
    """Draw ``panels`` side by side; returns RGB ``uint8`` of shape ``(panel_px, len(panels) * panel_px, 3)``.

    ``title`` goes top left, ``note`` (up to two lines, ``\\n``-separated) bottom left.
    """
    n = len(panels)
    fig = Figure(figsize=(n * panel_px / DPI, panel_px / DPI), dpi=DPI, facecolor=BACKGROUND)
    canvas = FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        _draw_panel(fig, i / n, 1.0 / n, panel, scales)
    if title:
        fig.text(0.01, 0.985, title, ha="left", va="top", color=TEXT, fontsize=10, fontweight="bold")
    if note:
        fig.text(0.01, 0.008, note, ha="left", va="bottom", color=TEXT, fontsize=7, linespacing=1.3)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    expected = (panel_px, n * panel_px, 3)
    if rgb.shape != expected:
        raise RuntimeError(f"frame rendered as {rgb.shape}, expected {expected}")
    return rgb
