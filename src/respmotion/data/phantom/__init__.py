"""A synthetic thoracic 4D-CT with exactly known motion (our ground truth).

Anatomy (HU): body with a fat layer, chest-wall muscle, ribs, spine, two lungs with a textured
parenchyma, branching vessels and nodules, heart, liver and a stomach gas bubble, a domed
diaphragm.  It is drawn once in the *reference* (end-inhale, phase 00) frame on a grid twice as
fine along z, extended below and above the field of view.

Motion (analytic, in mm, pull convention of :mod:`respmotion.core.types`), calibrated on the measured
DIR-Lab reference (:mod:`respmotion.data.motion_reference`, table in docs/motion.md): for phase k with
breathing states ``(s_k, h_k)`` of the patient's own curve (:class:`BreathingCurve`: the reference's asymmetric
Lujan cos^2n curve with a per-patient end-exhale phase and exponent; ``s`` 0 at 00 = end-inhale, 1 at 50; ``h``
the AP/LR state, lagging ``s`` on exhale and leading it on inhale: hysteresis)::

    u_z(p) = -A * s * g(z, dome) * w(y, x) * ap(y) * ml(x)   superior-inferior: largest at the posterior,
                                              lateral base; only inside the rib cage and away from the spine
                                              (w: sliding interfaces), small in the mediastinum
    u_y(p) = -B * h * a(y)                    anterior-posterior, the anterior chest wall moves most
    u_x(p) = +C * h * x / X                   lateral contraction at exhale

``A`` is set per patient so that the lung's mean superior motion at 50 % is an amplitude drawn from the
DIR-Lab distribution (:class:`PhantomParams`); ``B`` and ``C`` are fractions of it.
``phase_k(p) = phase_00(p + u_k(p))``.  Because ``u_y`` depends on y only and ``u_x`` on x only,
the Jacobian matrix is triangular and ``det = (1 + du_z/dz)(1 + du_y/dy)(1 + du_x/dx)``, which is
> 0 by construction even across the sliding interface, where ``u_z`` shears steeply in y and x
(the lungs slide along the chest wall, the ribs and spine do not move superior-inferiorly).
Landmarks move with the inverse map (solved to 1e-6 mm); consecutive-phase fields are exact
compositions ``t_k = phi_k^-1 o phi_{k+1} - id``.

Modules: :mod:`.params` (patient parameters, calibration constants, body surfaces), :mod:`.curve` (breathing
curve), :mod:`.anatomy` (drawing the reference), :mod:`.motion` (the field, its inverse and Jacobian),
:mod:`.patient` (:class:`Phantom`: one patient's phases on the base grid), :mod:`.landmarks` (landmarks and
motion statistics), :mod:`.cohort` (writing cohorts to disk).
"""

from .anatomy import Anatomy
from .cohort import check_memory, check_request, write_cohort, write_patient
from .curve import PEAK_RANGE, PHASE_CURVES, BreathingCurve
from .landmarks import landmark_table, motion_statistics
from .motion import Motion
from .params import DEFAULT_SHAPE, FOV_MM, SKIN_DEPTH_MM, PhantomParams
from .patient import Phantom, make_patient

__all__ = ["Anatomy", "BreathingCurve", "DEFAULT_SHAPE", "FOV_MM", "Motion", "PEAK_RANGE", "PHASE_CURVES", "Phantom",
           "PhantomParams", "SKIN_DEPTH_MM", "check_memory", "check_request", "landmark_table", "make_patient",
           "motion_statistics", "write_cohort", "write_patient"]
