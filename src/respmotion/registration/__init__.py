"""Registration of breathing phases: training targets as compact cubic B-spline fields (pull, mm).

Public API (what later stages call):

* :func:`~.bspline.dense_field` ``(stored or path) -> DisplacementField`` -- the one load-time conversion of a
  stored pair (``<out>/<patient>/<study>/<name>.npz``) to a dense ``(3, z, y, x)`` mm pull field on the fixed
  phase's grid: ``fixed(p) ~= moving(p + u(p))``.  ``ref_XX``: fixed = phase XX, moving = reference (00);
  ``step_XX``: fixed = phase XX+10, moving = XX (same naming as the phantom's ``gt/``).
  :func:`~.pipeline.load_pair_field` ``(out, patient, study, name)`` does the path for you.
* :func:`~.pipeline.run_registration` ``(RegisterConfig)`` -- the ``respmotion register`` stage (sharded,
  resumable, atomic per pair, quality record per pair in ``<name>.json`` and in the npz header).
* :func:`~.ffd.register` -- the batched optimiser on tensors (masks come from :mod:`respmotion.anatomy`).

Use::

    from respmotion.registration import FFDSettings, dense_field, register
    s = FFDSettings()
    # the inside field's weight: the sliding region (ffd.sliding_region) with its ramp (bspline.blend_weight)
    lung = blend_weight(sliding_region(hu, body, geometry, s), spacing_zyx_mm, s.sliding_ramp_mm)
    coef, log = register(fixed, moving, body, spacing_zyx_mm, s, lung=lung)  # (B, Z, Y, X) tensors
    u = dense_field("<out>/<patient>/<study>/ref_50.npz")  # DisplacementField (3, z, y, x) mm, pull

:class:`~.ffd.FFDSettings` holds the optimiser settings (defaults: the measured best); the measurements behind
the engine and its defaults are in ``docs/registration.md``.
"""

from .bspline import BSplineField, ControlGrid, blend_weight, dense_field, load_bspline, save_bspline
from .config import RegisterConfig
from .ffd import FFDSettings, register, sliding_region
from .pipeline import load_pair_field, run_registration

__all__ = ["BSplineField", "ControlGrid", "blend_weight", "dense_field", "load_bspline", "save_bspline",
           "RegisterConfig", "FFDSettings", "register", "sliding_region", "load_pair_field", "run_registration"]
