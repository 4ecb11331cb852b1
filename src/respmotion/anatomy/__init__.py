"""Anatomy of a CT, below registration, synthesis and evaluation: body and lung masks (HU thresholds).

``from respmotion.anatomy import body_mask, lung_mask``; both take a ``(z, y, x)`` HU array and return a uint8 mask.
"""

from .masks import body_mask, lung_mask

__all__ = ["body_mask", "lung_mask"]
