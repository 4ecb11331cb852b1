"""The breathing state of the input CT (``--input-phase``) and cycles re-anchored on it.

Every motion model (the prior, bundles, research checkpoints, fixed fields) returns pull fields ``u_k`` of
phase ``k`` relative to its reference, end-inhale (phase 00): ``phase_k(p) = phase_00(p + u_k(p))``, and takes
the input CT as that reference.  When the input is phase ``P`` instead, the model's motion is laid into the
input as given, and the cycle is re-anchored on it: with ``v`` the inverse of ``u_P``
(:func:`respmotion.core.warp.invert`: ``v`` pulls phase P back to phase 00),
``phase_00 = warp(input, v)`` and every phase ``w_k = compose(v, u_k)`` pulls the input into phase ``k``
(``w_k(p) = u_k(p) + v(p + u_k(p))``).  Phase ``P`` itself is the input: ``w_P = 0`` exactly, and the
re-anchoring's accuracy is the inversion residual ``|compose(u_P, v)|`` (recorded).  From end-exhale
(``P = 50``) the other phases expand the lungs.

``mid``: the input is a mid-position (time-averaged) CT.  A point's mid position is its mean position over the
cycle's phases (equal weights), ``m(q) = q + mean_k d_k(q)`` with ``d_k = inv(u_k)`` (``q + d_k(q)`` is where
reference point ``q`` is at phase k); the mid-position image is ``mid(m(q)) = phase_00(q)``, so
``v = mean_k d_k`` pulls it back to phase 00 (``phase_00 = warp(mid, v)``), ``w_k = compose(v, u_k)`` for every
phase and no phase equals the input.

Fields are on the model grid (mm, ``(3, z, y, x)``); amplitude scaling and breathing traces act on the model's
own cycle (relative to 00) before re-anchoring.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..core import warp as W
from ..core.types import DisplacementField
from ..io.layout import PHASES

MID = "mid"


def check_input_phase(value: object) -> int | str:
    """``value`` (int, float or str: ``"50"``, ``"mid"``) as a phase percent of :data:`PHASES` or :data:`MID`;
    a one-line ``ValueError`` naming ``--input-phase`` otherwise."""
    text = str(value).strip().lower()
    if text == MID:
        return MID
    allowed = ", ".join(str(k) for k in PHASES)
    try:
        num = float(text)
    except ValueError:
        num = float("nan")
    if not (num == num and num.is_integer() and int(num) in PHASES):
        raise ValueError(f"--input-phase: {value!r} is not a breathing phase of the cycle: give one of {allowed} "
                         f"(percent; 0 = end-inhale, 50 = end-exhale) or {MID} (a mid-position CT)")
    return int(num)


def _tensor(f: DisplacementField) -> torch.Tensor:
    return W.to_tensor(f.array)


def _residual(u: torch.Tensor, v: torch.Tensor, spacing) -> dict:
    """Inversion residuals (mm): ``|compose(u, v)|`` and ``|compose(v, u)|``, mean and max over the grid."""
    a = W.compose(u, v, spacing).norm(dim=1)
    b = W.compose(v, u, spacing).norm(dim=1)
    return {"mean_mm": float(a.mean()), "max_mm": float(a.max()),
            "reverse_mean_mm": float(b.mean()), "reverse_max_mm": float(b.max())}


def anchor_field(cycle: Mapping[int, DisplacementField], phase: int | str) -> tuple[DisplacementField, dict]:
    """``v``: the pull field from the input (at ``phase``) back to the model's reference, and its record
    (``phase``, inversion residuals in mm; for ``mid`` the largest residual over the phases)."""
    f0 = next(iter(cycle.values()))
    g, sp = f0.geometry, f0.geometry.spacing
    if phase == MID:
        total = torch.zeros_like(_tensor(f0), dtype=torch.float64)
        worst: dict = {}
        for k, f in cycle.items():
            u = _tensor(f)
            d = W.invert(u, sp)
            res = _residual(u, d, sp)
            worst = {key: max(val, worst.get(key, 0.0)) for key, val in res.items()}
            total += d
        v = (total / len(cycle)).to(torch.float32)
        return DisplacementField(v[0].numpy(), g, {"anchor": MID}), {"phase": MID, "inversion": worst}
    if phase not in cycle:
        raise ValueError(f"--input-phase {phase}: the model's cycle has phases {sorted(cycle)}")
    u = _tensor(cycle[phase])
    v = W.invert(u, sp)
    return (DisplacementField(v[0].numpy(), g, {"anchor": phase}),
            {"phase": phase, "inversion": _residual(u, v, sp)})


def reanchor_field(f: DisplacementField, anchor: DisplacementField, meta: dict | None = None) -> DisplacementField:
    """``f`` (a pull field relative to the model's reference, ``(3, z, y, x)`` mm on the model grid) as a pull
    field from the input: ``compose(anchor, f)``, float32, on ``f``'s grid with ``meta`` (default: ``f``'s)."""
    arr = W.compose(_tensor(anchor), _tensor(f), anchor.geometry.spacing)[0].numpy().astype(np.float32)
    return DisplacementField(arr, f.geometry, dict(f.meta) if meta is None else meta)


def reanchor(cycle: Mapping[int, DisplacementField], anchor: DisplacementField,
             phase: int | str) -> dict[int, DisplacementField]:
    """Every phase of ``cycle`` (relative to the model's reference) as a pull field from the input
    (:func:`reanchor_field`); the input's own phase (``phase``, unless ``mid``) is exactly zero."""
    out = {}
    for k, f in sorted(cycle.items()):
        meta = {**f.meta, "input_phase": phase}
        if k == phase:
            out[k] = DisplacementField(np.zeros_like(f.array, dtype=np.float32), f.geometry, meta)
        else:
            out[k] = reanchor_field(f, anchor, meta)
    return out


def reanchor_cycles(cycles: Sequence[Mapping[int, DisplacementField]], phase: int | str
                    ) -> tuple[list[dict[int, DisplacementField]], list[DisplacementField], list[dict]]:
    """Every sample's cycle re-anchored on the input at ``phase``: the re-anchored cycles, each sample's anchor
    (:func:`anchor_field`) and its record.  A cycle given for several samples (the same object: a model without
    randomness, fixed fields) is inverted and composed once; its samples share the result."""
    done: dict[int, tuple] = {}
    for c in cycles:
        if id(c) not in done:
            a, rec = anchor_field(c, phase)
            done[id(c)] = (reanchor(c, a, phase), a, rec)
    per_sample = [done[id(c)] for c in cycles]
    return [r[0] for r in per_sample], [r[1] for r in per_sample], [r[2] for r in per_sample]
