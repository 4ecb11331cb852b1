"""Anatomy of a CT, below registration, synthesis and evaluation: body, lung and sliding-region masks (HU thresholds).

``from respmotion.anatomy import body_mask, lung_mask, sliding_region``; each takes a ``(z, y, x)`` HU array and
returns a uint8 mask on the same grid.
"""

from .masks import BODY_THRESHOLD_HU, LUNG_THRESHOLD_HU, body_mask, lung_mask
from .sliding import sliding_mask, sliding_region

__all__ = ["BODY_THRESHOLD_HU", "LUNG_THRESHOLD_HU", "body_mask", "lung_mask", "sliding_mask", "sliding_region"]
