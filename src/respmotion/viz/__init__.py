"""respmotion.viz: breathing-cycle GIFs (DVF arrows/heatmaps, difference maps, real vs generated,
contour outlines).  Entry point: :func:`render_cycle`; display convention: :mod:`.orient`."""

from .config import RenderConfig
from .cycle import phases_from_fields, render_cycle, warp_masks

__all__ = ["RenderConfig", "render_cycle", "phases_from_fields", "warp_masks"]
