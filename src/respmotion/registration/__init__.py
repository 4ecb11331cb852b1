"""Registration of breathing phases: training targets as compact cubic B-spline fields (pull, mm).

Public API (what later stages call):

* :func:`~.bspline.dense_field` ``(stored or path) -> DisplacementField`` -- the one load-time conversion of a
  stored pair (``<out>/<patient>/<study>/<name>.npz``) to a dense ``(3, z, y, x)`` mm pull field on the fixed
  phase's grid: ``fixed(p) ~= moving(p + u(p))``.  ``ref_XX``: fixed = phase XX, moving = reference (00);
  ``step_XX``: fixed = phase XX+10, moving = XX (same naming as the phantom's ``gt/``).
  :func:`~.pipeline.load_pair_field` ``(out, patient, study, name)`` does the path for you.
* :func:`~.pipeline.run_registration` ``(RegisterConfig)`` -- the ``respmotion register`` stage (sharded,
  resumable, atomic per pair, quality record per pair in ``<name>.json`` and in the npz header).
* :func:`~.ffd.register` -- the batched optimiser on tensors; :func:`~.masks.body_mask`, :func:`~.masks.lung_mask`.

Engine choice (evidence).  Our own compact torch FFD instead of hf-deepali / MONAI / airlab: the B-spline is
evaluated with three small dense basis-matrix products (BLAS, any stride, any subset of voxels, exact knot
formulas for bending energy and Jacobian), pairs of a study are one batch, and the finest level samples a strided
voxel subset with a moving offset (full-resolution images at a fraction of the grid-sampling cost; SPEC section 7
says the finest level dominates).  Measured on the phantom (seed 0, 50x256x256, 3 x 1.4 x 1.4 mm, pair 00->50,
excursion ~16 mm, lung error of the pull field against the exact field on lung voxels of the fixed phase):

====================================================  ======================  =============
setting                                               lung error mean / p95   folding %
====================================================  ======================  =============
no registration                                       9.75 / 15.05            0
levels (1,4,4)/(1,2,2)/full, no regulariser           5.63 / 17.0             1.41
levels 4/2/1 (z too), bending 1e3, 100/60/40 steps    3.56 / 5.86             0
levels 4/2/1, bending 100, 200/100/50, lr 1/.5/.2     1.97 / 5.21             0
  same, bending 10                                    1.37 / 4.39             0
  same, bending 1, 200/150/100, lr 1/.5/.25           1.14 / 3.81             0.0016
  + sliding (inside/outside lung fields), bending 100 1.17 / 3.15             0.0008
  + sliding, bending 1 (the default)                  **0.32 / 0.96**         0.0045
  + sliding, bending 1, images blurred 1 voxel        0.28 / 1.12             0.0025
====================================================  ======================  =============

One smooth field leaves ~2 mm of superior-inferior motion unrecovered all over the lung (the regulariser drags
the lung toward the static chest wall); z must be downsampled too at the coarse levels (capture range of a 16 mm
excursion on 3 mm slices).  Separate fields inside and outside the fixed phase's lung mask (our own HU-threshold
lung mask, Dice 0.95 against the phantom's) cut the error 3.5x, so sliding is on by default.  Those runs took
50-160 s per pair on a CPU shared with other jobs (load 6-10 on 2 cores; torch with 1 thread): the 10 s target is
not demonstrated there, see ``bench/registration.py`` for same-run comparisons.
"""

from .bspline import BSplineField, ControlGrid, dense_field, load_bspline, save_bspline
from .config import RegisterConfig
from .ffd import FFDSettings, register
from .masks import body_mask, lung_mask
from .pipeline import load_pair_field, run_registration

__all__ = ["BSplineField", "ControlGrid", "dense_field", "load_bspline", "save_bspline", "RegisterConfig",
           "FFDSettings", "register", "body_mask", "lung_mask", "load_pair_field", "run_registration"]
