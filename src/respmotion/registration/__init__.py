"""Registration of breathing phases: training targets as compact cubic B-spline fields (pull, mm).

Public API (what later stages call):

* :func:`~.bspline.dense_field` ``(stored or path) -> DisplacementField`` -- the one load-time conversion of a
  stored pair (``<out>/<patient>/<study>/<name>.npz``) to a dense ``(3, z, y, x)`` mm pull field on the fixed
  phase's grid: ``fixed(p) ~= moving(p + u(p))``.  ``ref_XX``: fixed = phase XX, moving = reference (00);
  ``step_XX``: fixed = phase XX+10, moving = XX (same naming as the phantom's ``gt/``).
  :func:`~.pipeline.load_pair_field` ``(out, patient, study, name)`` does the path for you.
* :func:`~.pipeline.run_registration` ``(RegisterConfig)`` -- the ``respmotion register`` stage (sharded,
  resumable, atomic per pair, quality record per pair in ``<name>.json`` and in the npz header).
* :func:`~.ffd.register` -- the batched optimiser on tensors, returning an :class:`~.field.FFDField` (masks come
  from :mod:`respmotion.anatomy`).

Use::

    from respmotion.anatomy import sliding_region
    from respmotion.registration import FFDSettings, blend_weight, dense_field, register
    s = FFDSettings()
    region = sliding_region(hu, body, geometry, s.sliding_region)  # (z, y, x) uint8 of the fixed image
    w = blend_weight(region, spacing_zyx_mm, s.sliding_ramp_mm)  # the inside field's weight in [0, 1]
    field, log = register(fixed, moving, body, spacing_zyx_mm, s, inside_weight=w)  # (B, Z, Y, X) tensors
    u0 = field.dense(0)  # (3, Z, Y, X) mm, pull, pair 0
    u = dense_field("<out>/<patient>/<study>/ref_50.npz")  # DisplacementField (3, z, y, x) mm, pull

Modules: :mod:`~.config` (settings), :mod:`~.ffd` (the optimiser), :mod:`~.level` (one pyramid level),
:mod:`~.similarity` (weighted NCC), :mod:`~.regulariser` (bending and Jacobian penalty at the knots),
:mod:`~.texture` (bending weights), :mod:`~.folding` (folding repair), :mod:`~.bspline` (the B-spline field and
its storage), :mod:`~.field` (``register``'s result), :mod:`~.pipeline`, :mod:`~.pairs`, :mod:`~.quality` (the
stage).  How to run, tune and measure it: ``docs/registration.md``.
"""

from .bspline import BSplineField, ControlGrid, blend_weight, dense_field, load_bspline, save_bspline
from .config import FFDSettings, RegisterConfig
from .ffd import register
from .field import FFDField
from .pipeline import load_pair_field, run_registration

__all__ = ["BSplineField", "ControlGrid", "blend_weight", "dense_field", "load_bspline", "save_bspline",
           "RegisterConfig", "FFDSettings", "FFDField", "register", "load_pair_field", "run_registration"]
