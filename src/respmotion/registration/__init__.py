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
lung mask, Dice 0.95 against the phantom's) cut the error 3.5x, so sliding is on by default.

Speed and folding (issue 11; same phantom, pairs ref_50, step_20, step_70 batched, 1 torch thread, CPU time per
pair, machine shared with other jobs; ``acc`` = lung error mean / p95 of ref_50, mm):

========================================================================  ===========  ============  ========
setting                                                                   s / pair     acc (ref_50)  folding
========================================================================  ===========  ============  ========
previous defaults, iterations 200/150/100, subsample full/full/(1,2,2)    50-160 wall  0.32 / 0.96   0.0045 %
same settings, hot loop of :mod:`.ffd` (profile: ffd module doc)          19.6         0.30 / 0.86   0.039 %
  + folding repair (:func:`.ffd.repair_folding`)                          ~21          0.30 / 0.86   **0**
iterations 150/100/60                                                     ~15 wall     0.30 / 0.89   0
iterations 150/100/50, subsample (1,2,2) from the middle level (default)  9.6          0.30 / 0.88   0
iterations 100/70/40                                                      8.0          0.32 / 0.95   0
========================================================================  ===========  ============  ========

The default keeps the accuracy of the 200/150/100 run at half the time (the step pairs: 0.34 / 0.82 and
0.30 / 0.74 mm); 100/70/40 saves another 17 % but loses 0.02 / 0.07 mm.  All 19 pairs of the study as one
batch (``bench/registration.py``, 1 thread, load 2-4): lung error 0.28 / 0.76 mm averaged over the pairs, 0 %
folding on every pair (11 of 19 folded before the repair, 3 to 1101 voxels).  2-thread timings on a loaded
machine are meaningless for this code (OpenMP barriers wait for a descheduled thread: 45 s / pair at load 5
against ~10 s of CPU per pair); time it on an idle machine with the command in ``bench/registration.py``.
"""

from .bspline import BSplineField, ControlGrid, dense_field, load_bspline, save_bspline
from .config import RegisterConfig
from .ffd import FFDSettings, register
from .pipeline import load_pair_field, run_registration

__all__ = ["BSplineField", "ControlGrid", "dense_field", "load_bspline", "save_bspline", "RegisterConfig",
           "FFDSettings", "register", "load_pair_field", "run_registration"]
