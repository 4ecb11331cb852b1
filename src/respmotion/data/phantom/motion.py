"""The phantom's analytic motion (:class:`Motion`): its pull field, the field's inverse and its Jacobian.

The model is separable (package docstring, :mod:`respmotion.data.phantom`): ``u_y`` depends on y only, ``u_x`` on
x only, and ``u_z = s * amp(y, x) * g(z, dome(y, x))``; ``u_y`` and ``u_x`` scale with the AP/LR state ``h``.
All positions and displacements are mm, ``(z, y, x)``, pull convention (phase k at p is phase 00 at p + u_k(p)).
"""

from __future__ import annotations

import numpy as np

from .curve import BreathingCurve
from .params import EXT_ABOVE_MM, FOV_MM, SI_AP_GAIN, SI_ML_GAIN, SI_PROFILE_EXP, SPINE_STATIC_R, SPINE_Y, PhantomParams


class Motion:
    """The motion of one patient (parameters ``p``, breathing ``curve``).  ``p.amp_si`` is read at every call:
    the patient's calibration may rescale it after construction."""

    def __init__(self, p: PhantomParams, curve: BreathingCurve):
        self.p, self.curve = p, curve

    def _g_dg(self, z: np.ndarray, zd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SI profile g and its slope dg/dz: g = 1 at the diaphragm (zero slope there, so the field is
        C1), falling as ``1 - t**SI_PROFILE_EXP`` to 0 at the apex level and as a Gaussian into the abdomen."""
        d = z - zd
        h = FOV_MM[0] / 2 + EXT_ABOVE_MM - zd  # 0 at the top of the drawn lungs (apex)
        above = d >= 0
        t = np.clip(d / h, 0.0, 1.0)
        q = SI_PROFILE_EXP
        e = np.exp(-((np.minimum(d, 0.0) / self.p.abdomen_decay) ** 2))  # 1 above the dome: no overflow
        g = np.where(above, 1.0 - t**q, e)
        dg = np.where(above, np.where(t < 1.0, -q * t ** (q - 1.0) / h, 0.0), -2.0 * d / self.p.abdomen_decay**2 * e)
        return g, dg

    def _uz_parts(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dome z, SI amplitude at s = 1 incl. sliding weight) at (y, x), mm: largest at the posterior, lateral
        base (gains :data:`~.params.SI_AP_GAIN`, :data:`~.params.SI_ML_GAIN` across the cavity), small in the
        mediastinum."""
        p = self.p
        ax, ay = p.body_ax * p.cavity_scale, p.body_ay * p.cavity_scale
        w = 1.0 / (1.0 + np.exp((p.cavity_r(y, x) - 1.0) * ax / p.slide_width))
        spine_r = np.sqrt(x * x + (y - SPINE_Y * p.body_ay) ** 2)  # the spine does not move: weight ~0 inside
        w = w / (1.0 + np.exp((SPINE_STATIC_R - spine_r) / p.slide_width))
        lr = 1.0 + p.lr_asym * np.tanh(x / 40.0)
        ap = 1.0 + 0.5 * SI_AP_GAIN * np.clip((y + 0.08 * p.body_ay) / ay, -1.0, 1.0)
        ml = 1.0 + SI_ML_GAIN * (np.clip(np.sqrt(x * x + 25.0) / ax, 0.0, 1.0) - 0.5)
        return p.dome(y, x), -p.amp_si * w * lr * ap * ml

    def _uy(self, y: np.ndarray) -> np.ndarray:
        """AP displacement (mm) at y for h = 1: the anterior chest wall moves most."""
        p = self.p
        y_ant, y_post = -p.body_ay, 0.75 * p.body_ay
        return -p.amp_ap * np.clip((y_post - y) / (y_post - y_ant), 0.0, 1.0) ** 1.5

    def _ux(self, x: np.ndarray) -> np.ndarray:
        """Lateral displacement (mm) at x for h = 1: contraction towards the midline."""
        return self.p.amp_lr * np.clip(x / self.p.body_ax, -1.2, 1.2)

    def states(self, percent: float) -> tuple[float, float]:
        """(SI state, AP/LR state) of this patient at ``percent`` (:meth:`BreathingCurve.states`)."""
        s, h = self.curve.states(float(percent))
        return float(s), float(h)

    def displacement(self, percent: float, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact pull field of ``percent`` relative to phase 0, at points (z, y, x) mm -> (3, ...) mm."""
        return self.displacement_at(*self.states(percent), z, y, x)

    def displacement_at(self, s: float, h: float, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Pull field (3, ...) mm at points (z, y, x) mm for SI state ``s`` and AP/LR state ``h``."""
        z, y, x = np.broadcast_arrays(np.asarray(z, float), np.asarray(y, float), np.asarray(x, float))
        zd, amp = self._uz_parts(y, x)
        return np.stack([s * amp * self._g_dg(z, zd)[0], h * self._uy(y), h * self._ux(x)])

    def move_points(self, percent: float, points_zyx: np.ndarray, tol: float = 1e-7) -> np.ndarray:
        """Where reference points (mm, z,y,x, ``(..., 3)``) are at ``percent``: solve q + u(q) = p -> ``(..., 3)``
        mm, to ``tol`` mm."""
        p = np.asarray(points_zyx, dtype=np.float64)
        return self.solve_inverse(*self.states(percent), p[..., 0], p[..., 1], p[..., 2], tol)

    def solve_inverse(self, s: float, h: float, tz, ty, tx, tol: float = 1e-7,
                      z0: np.ndarray | None = None) -> np.ndarray:
        """Solve q + U_{s,h}(q) = t component-wise (SI state ``s``, AP/LR state ``h``; y and x are 1D problems,
        then z given y, x) -> ``(..., 3)`` mm (z, y, x) over the broadcast shape of ``tz, ty, tx`` (mm), to
        ``tol`` mm.  ``z0``: optional starting guess for the z component (Newton converges in fewer steps).
        Raises ``RuntimeError`` if it does not converge."""
        def fixed_point(f, t):
            q = np.array(t, dtype=np.float64, copy=True)
            for _ in range(200):
                q_new = t - f(q)
                if np.max(np.abs(q_new - q)) < tol:
                    return q_new
                q = q_new
            raise RuntimeError("phantom inversion did not converge")

        qy = fixed_point(lambda q: h * self._uy(q), np.asarray(ty, float))
        qx = fixed_point(lambda q: h * self._ux(q), np.asarray(tx, float))
        qz = self._solve_z(s, np.asarray(tz, float), qy, qx, tol, z0)
        return np.stack(np.broadcast_arrays(qz, qy, qx), -1)

    def _solve_z(self, s: float, tz: np.ndarray, qy: np.ndarray, qx: np.ndarray, tol: float,
                 z0: np.ndarray | None = None) -> np.ndarray:
        """Newton's method for q + s * amp(y, x) * g(q, dome) = tz (g is piecewise smooth, 1 + s amp g' > 0)."""
        zd, amp = self._uz_parts(qy, qx)
        shape = np.broadcast_shapes(tz.shape, zd.shape)
        start = tz if z0 is None else z0
        q = np.array(np.broadcast_to(start, shape), dtype=np.float64).ravel()
        tz, zd, amp = (np.broadcast_to(a, shape).ravel() for a in (tz, zd, amp))
        active = np.arange(q.size)  # Newton on the points not yet converged only
        for _ in range(50):
            qa, za, aa = q[active], zd[active], s * amp[active]
            g, dg = self._g_dg(qa, za)
            step = (qa + aa * g - tz[active]) / (1.0 + aa * dg)
            q[active] = qa - step
            active = active[np.abs(step) >= tol]
            if active.size == 0:
                return q.reshape(shape)
        raise RuntimeError("phantom inversion did not converge")

    def unit_slopes(self, zs: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Diagonal Jacobian entries of the field at s = h = 1 on the grid of axes ``zs, ys, xs`` (mm):
        ``(3, nz, ny, nx)`` float32, ``du_z/dz``, ``du_y/dy``, ``du_x/dx`` (mm per mm, analytic).  The Jacobian
        matrix is triangular, so phase k's determinant is the product of ``1 + (s_k, h_k, h_k) * slope``."""
        p = self.p
        Y, X = np.meshgrid(ys, xs, indexing="ij")
        zd, amp = self._uz_parts(Y, X)  # depend on (y, x) only: one plane, broadcast along z
        duz = amp * self._g_dg(np.asarray(zs)[:, None, None], zd)[1]
        y_ant, y_post = -p.body_ay, 0.75 * p.body_ay
        t = (y_post - ys) / (y_post - y_ant)
        duy = np.where((t > 0) & (t < 1), 1.5 * p.amp_ap * np.sqrt(np.clip(t, 0.0, 1.0)) / (y_post - y_ant), 0.0)
        dux = np.where(np.abs(xs / p.body_ax) < 1.2, p.amp_lr / p.body_ax, 0.0)
        return np.stack(np.broadcast_arrays(duz, duy[None, :, None], dux[None, None, :])).astype(np.float32)
