"""Core types and conventions (the only place coordinate conventions live).

See :mod:`respmotion.core.geometry` (voxel/world/normalised mappings) and
:mod:`respmotion.core.types` (volume and displacement field: ``(3, z, y, x)`` mm, pull).
This package imports no pipeline stage.
"""

from .geometry import Geometry
from .types import DisplacementField, Volume

__all__ = ["Geometry", "Volume", "DisplacementField"]
