"""Settings of the breathing-cycle renderer (:func:`respmotion.viz.cycle.render_cycle`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
START_FROM: tuple[str, ...] = ("middle", "first", "last")
STYLES: tuple[str, ...] = ("arrows", "heatmap")


@dataclass
class RenderConfig:
    """How the GIFs look.

    Attributes:
        views: any of ``axial``, ``coronal``, ``sagittal``.
        num_slices: slices per view (clipped to the number of slices along that view's axis).
        start_from: ``middle`` (slices centred on the middle one), ``first`` or ``last``; counted
            in the display orientation (axial: inferior->superior, coronal: anterior->posterior,
            sagittal: right->left), see :mod:`respmotion.viz.orient`.
        fps: GIF frames per second (one frame per phase).
        style: ``arrows`` (quiver of the in-plane motion) or ``heatmap`` (displacement magnitude, mm).
        display_window_hu: CT display window ``(low, high)`` in HU (colours only; not the data's ``hu_window``).
        diff_window_hu: difference maps are shown in ``[-diff_window_hu, +diff_window_hu]`` HU.
        panel_px: every panel is ``panel_px x panel_px`` pixels; a frame is ``(panel_px,
            n_panels * panel_px)`` (height, width): 1 panel for motion/difference GIFs, 3 for the
            real-vs-generated comparison.
        arrow_spacing_mm: distance between arrows; 0 = automatic (about 18 across the view).
        arrow_scale: arrow length / displacement; 0 = automatic (1-2-5 steps, so the longest
            arrow is at most about one arrow spacing).  The scale is written on every frame.
        heatmap_alpha: opacity of the magnitude overlay.
        difference: also write the difference-map GIF (phase k - phase 00).
        mp4: also write an MP4 per GIF when imageio's ffmpeg plugin is installed (skipped with a
            message otherwise).
    """

    views: tuple[str, ...] = VIEWS
    num_slices: int = 1
    start_from: str = "middle"
    fps: float = 2.0
    style: str = "arrows"
    display_window_hu: tuple[float, float] = (-1000.0, 400.0)
    diff_window_hu: float = 500.0
    panel_px: int = 480
    arrow_spacing_mm: float = 0.0
    arrow_scale: float = 0.0
    heatmap_alpha: float = 0.55
    difference: bool = True
    mp4: bool = False

    RENAMED: ClassVar[dict[str, str]] = {"hu_window": "display_window_hu"}  # older saved configs

    def validate(self) -> "RenderConfig":
        """Raise ``ValueError`` naming the first bad setting; returns ``self``."""
        bad = [v for v in self.views if v not in VIEWS]
        if bad or not self.views:
            raise ValueError(f"views must be a non-empty subset of {','.join(VIEWS)}, got {','.join(self.views)!r}")
        if self.start_from not in START_FROM:
            raise ValueError(f"start_from must be one of {', '.join(START_FROM)}, got {self.start_from!r}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if not self.display_window_hu[0] < self.display_window_hu[1]:
            raise ValueError(f"display_window_hu must be (low, high) with low < high, got {self.display_window_hu}")
        if not self.diff_window_hu > 0:
            raise ValueError(f"diff_window_hu must be > 0, got {self.diff_window_hu}")
        if self.panel_px < 64:
            raise ValueError(f"panel_px must be >= 64, got {self.panel_px}")
        if self.arrow_spacing_mm < 0 or self.arrow_scale < 0:
            raise ValueError("arrow_spacing_mm and arrow_scale must be >= 0 (0 = automatic)")
        return self
