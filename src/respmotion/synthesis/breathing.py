"""Breathing amplitude and breathing-trace control that keep every field invertible.

Method: **stationary velocity fields (SVF)**.  Each phase field ``u_k`` (pull, mm, relative to the
reference phase 00) is written as the flow of a velocity ``v_k`` (``u_k ~= exp(v_k)``,
:func:`velocity_field`), and every new motion is ``exp(a * v)`` for some combination ``v`` of the
phase velocities.  ``exp`` is scaling and squaring (:func:`respmotion.core.warp.exp_velocity`),
whose result is a diffeomorphism (Jacobian determinant > 0) when ``v / 2**steps`` is small; the
number of squaring steps is chosen per field so that one step moves at most
:data:`MAX_STEP_VOXELS` voxel.  Plain scaling ``a * u`` does not have that guarantee: where
``|grad u| > 1/a`` it folds.

* :func:`scale_motion`: ``exp(factor * v_k)`` for every phase (0 = no motion, 1 = the model's motion
  up to the log/exp round trip, 2 = about twice the excursion).
* :func:`amplitude_for_excursion`: the factor whose end-exhale diaphragm excursion
  (:func:`respmotion.anatomy.measures.diaphragm_excursion`) is a target in mm (secant search).
* :func:`iter_trace_sequence`: one field per sample of a breathing trace CSV ``time, amplitude``
  (larger amplitude = deeper inhale unless ``inhale_positive=False``).  Inhale peaks and exhale
  troughs are found with hysteresis (a turn counts once the signal has come back by
  ``hysteresis`` x its range; this is the sign of the derivative, robust to noise).  Between
  them, each sample is on the exhale branch (peak -> trough) or the inhale branch (trough -> peak).
  With the peak envelope ``P(t)`` and the trough envelope ``T(t)`` (piecewise linear through the
  peaks / troughs), the sample's position in its breath is ``sigma = (P - a) / (P - T)`` in [0, 1]
  (0 = end-inhale, 1 = end-exhale) and its depth relative to the model cycle is
  ``d = (P - T) / model_depth`` (``model_depth`` defaults to the median breath depth of the trace).
  The model's phases have breathing states ``s_k`` in [0, 1] (projection of ``v_k`` on the
  end-exhale velocity); on the sample's branch the two phases whose states bracket ``sigma`` are
  interpolated linearly **in velocity space**, and the field is ``exp(d * v)``.  Both envelopes
  are continuous and both branches meet at sigma = 0 (reference) and 1 (end-exhale), so the
  sequence has no jumps, and irregular breaths (depth, period) are followed breath by breath.

Bad trace files raise :class:`TraceError` with a one-line message naming the file and line.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..core import warp as W
from ..core.types import DisplacementField, Volume
from ..anatomy.measures import diaphragm_excursion

#: largest displacement (voxels) of one scaling-and-squaring step.
MAX_STEP_VOXELS = 0.5
MIN_STEPS = 6


class TraceError(ValueError):
    """A breathing-trace problem; the message names the file (and line)."""


# ---------------------------------------------------------------------------- log / exp
def _steps_for(v: torch.Tensor, spacing) -> int:
    """Scaling-and-squaring steps for velocity ``v`` (mm): one step moves at most :data:`MAX_STEP_VOXELS`."""
    vmax = float(W.mm_to_voxels(v, spacing).abs().max()) if v.numel() else 0.0
    if not math.isfinite(vmax):
        raise ValueError("the scaled motion is not finite (an amplitude far beyond breathing)")
    return max(MIN_STEPS, int(math.ceil(math.log2(max(vmax, 1e-6) / MAX_STEP_VOXELS))))


def exp_field(velocity: DisplacementField, factor: float = 1.0) -> DisplacementField:
    """``exp(factor * v)``: displacement (pull, mm) of the flow of the velocity field (adaptive steps)."""
    v = W.to_tensor(velocity.array) * float(factor)
    u = W.exp_velocity(v, velocity.geometry.spacing, steps=_steps_for(v, velocity.geometry.spacing))
    return DisplacementField(u[0].numpy().astype(np.float32), velocity.geometry, {"svf_factor": float(factor)})


def velocity_field(field: DisplacementField, tol_mm: float = 0.05, max_iter: int = 8) -> DisplacementField:
    """Stationary velocity ``v`` with ``exp(v) ~= u`` (mm, ``(3, z, y, x)``).

    Fixed-point iteration ``v <- v + (u - exp(v))`` from ``v = u``, stopped when the mean residual
    is below ``tol_mm`` or after ``max_iter`` rounds (unit steps converge in ~3-6 rounds for
    breathing motion, 7-8 warps each).  The final residual (mean / max mm) is in ``meta``.
    """
    u = W.to_tensor(field.array)
    sp = field.geometry.spacing
    v = u.clone()
    res = u - W.exp_velocity(v, sp, steps=_steps_for(v, sp))
    for _ in range(max_iter):
        if float(res.norm(dim=1).mean()) < tol_mm:
            break
        v = v + res
        res = u - W.exp_velocity(v, sp, steps=_steps_for(v, sp))
    r = res.norm(dim=1)
    meta = {"log_residual_mean_mm": float(r.mean()), "log_residual_max_mm": float(r.max())}
    return DisplacementField(v[0].numpy().astype(np.float32), field.geometry, meta)


def velocity_fields(fields: Mapping[int, DisplacementField], **kw: Any) -> dict[int, DisplacementField]:
    """:func:`velocity_field` of every phase (phase 00, the reference, maps to a zero velocity)."""
    out = {}
    for k, f in sorted(fields.items()):
        if int(k) == 0:
            out[0] = DisplacementField(np.zeros_like(f.array, dtype=np.float32), f.geometry)
        else:
            out[int(k)] = velocity_field(f, **kw)
    return out


# ---------------------------------------------------------------------------- amplitude
def scale_motion(
    fields_by_phase: Mapping[int, DisplacementField],
    factor: float,
    velocities: Mapping[int, DisplacementField] | None = None,
) -> dict[int, DisplacementField]:
    """Every phase's motion scaled by ``factor`` >= 0 as ``exp(factor * log(u_k))`` (invertible).

    Pass ``velocities`` (:func:`velocity_fields`) to reuse them across calls.
    """
    if not math.isfinite(factor) or factor < 0:
        raise ValueError(f"amplitude factor must be a finite number >= 0, got {factor}")
    vel = velocities if velocities is not None else velocity_fields(fields_by_phase)
    return {int(k): exp_field(vel[int(k)], factor) for k in sorted(fields_by_phase)}


def _mask_volume(lung_mask: Volume | np.ndarray, field: DisplacementField) -> Volume:
    if isinstance(lung_mask, Volume):
        return lung_mask
    return Volume(np.asarray(lung_mask), field.geometry)


def end_exhale_phase(fields: Mapping[int, DisplacementField], mask: np.ndarray | None = None) -> int:
    """The phase with the largest mean displacement (inside ``mask`` if given): end-exhale."""
    best, best_val = None, -1.0
    for k, f in fields.items():
        mag = np.sqrt((f.array.astype(np.float64) ** 2).sum(0))
        val = float(mag[mask != 0].mean()) if mask is not None else float(mag.mean())
        if val > best_val:
            best, best_val = int(k), val
    if best is None:
        raise ValueError("no phase fields")
    return best


def amplitude_for_excursion(
    fields: Mapping[int, DisplacementField],
    lung_mask: Volume | np.ndarray,
    target_mm: float,
    phase: int | None = None,
    velocities: Mapping[int, DisplacementField] | None = None,
    tol_mm: float = 0.1,
    max_iter: int = 8,
) -> float:
    """Factor for :func:`scale_motion` giving a diaphragm SI excursion of ``target_mm`` at ``phase``.

    ``phase`` defaults to end-exhale (:func:`end_exhale_phase`); ``lung_mask`` is the reference
    (phase 00) lung mask.  The excursion of ``exp(a v)`` is nearly linear in ``a``; a secant search
    from ``a = target / excursion(1)`` stops within ``tol_mm``.  Raises when the model has no
    diaphragm motion or the target is not reached.
    """
    if not math.isfinite(target_mm) or target_mm < 0:
        raise ValueError(f"target excursion must be >= 0 mm, got {target_mm}")
    m = _mask_volume(lung_mask, next(iter(fields.values())))
    k = phase if phase is not None else end_exhale_phase(fields, m.array)
    if k not in fields:
        raise ValueError(f"phase {k} is not among the fields ({sorted(fields)})")
    vel = velocities[k] if velocities is not None and k in velocities else velocity_field(fields[k])

    def excursion(a: float) -> float:
        return abs(diaphragm_excursion(m, exp_field(vel, a))["mean_mm"])

    return _secant(excursion, target_mm, tol_mm, max_iter, f"the model's phase {k} has no diaphragm motion to scale")


def _secant(measure, target_mm: float, tol_mm: float, max_iter: int, no_motion: str) -> float:
    """Factor ``a`` >= 0 with ``measure(a) == target_mm`` (within ``tol_mm``); ``measure`` ~ linear, 0 at 0."""
    if target_mm == 0:
        return 0.0
    e1 = measure(1.0)
    if e1 < 1e-3:
        raise ValueError(no_motion)
    a0, f0 = 0.0, -target_mm
    a1 = target_mm / e1
    f1 = measure(a1) - target_mm
    for _ in range(max_iter):
        if abs(f1) <= tol_mm:
            return a1
        a0, f0, a1 = a1, f1, a1 - f1 * (a1 - a0) / (f1 - f0)
        if a1 < 0:
            raise ValueError(f"no amplitude factor reaches {target_mm} mm")
        f1 = measure(a1) - target_mm
    if abs(f1) > tol_mm:
        raise ValueError(
            f"amplitude search did not reach {target_mm} mm within {tol_mm} mm (last {f1 + target_mm:.2f} mm)")
    return a1


def superior_mean(field: DisplacementField, lung_mask: Volume | np.ndarray) -> float:
    """Mean superior displacement (mm, LPS +z) of the lung's points: ``-mean(u_z)`` of the pull field over
    the reference lung mask (first order in the field gradient)."""
    m = _mask_volume(lung_mask, field).array != 0
    if not m.any():
        raise ValueError("the lung mask is empty")
    up = field.geometry.axes_to_world(field.array[:, m], axis=0)[2]
    return float(-up.mean())


def amplitude_for_superior_mean(
    fields: Mapping[int, DisplacementField],
    lung_mask: Volume | np.ndarray,
    target_mm: float,
    phase: int = 50,
    velocities: Mapping[int, DisplacementField] | None = None,
    tol_mm: float = 0.05,
    max_iter: int = 8,
) -> float:
    """Factor for :func:`scale_motion` giving the lung a mean superior displacement of ``target_mm`` at
    ``phase`` (default 50 %): the breathing amplitude as a user gives it, e.g. the mean superior-inferior
    landmark displacement at 50 % of a 4D-CT.  Secant search as :func:`amplitude_for_excursion`."""
    if not math.isfinite(target_mm) or target_mm < 0:
        raise ValueError(f"target amplitude must be >= 0 mm, got {target_mm}")
    if phase not in fields:
        raise ValueError(f"phase {phase} is not among the fields ({sorted(fields)})")
    vel = velocities[phase] if velocities is not None and phase in velocities else velocity_field(fields[phase])
    return _secant(lambda a: superior_mean(exp_field(vel, a), lung_mask), target_mm, tol_mm, max_iter,
                   f"the model's phase {phase} has no superior motion to scale")


def scale_to_superior_mean(
    cycles: Sequence[Mapping[int, DisplacementField]],
    lung_mask: Volume | np.ndarray,
    target_mm: float,
) -> tuple[list[dict[int, DisplacementField]], list[float]]:
    """Every cycle scaled (:func:`scale_motion`) so that its lung's mean superior displacement at 50 % is
    ``target_mm`` (:func:`amplitude_for_superior_mean`); returns the scaled cycles and their factors.  Each
    cycle's velocity fields are computed once and serve both the search and the scaling."""
    out, factors = [], []
    for cycle in cycles:
        vel = velocity_fields(cycle)
        f = amplitude_for_superior_mean(cycle, lung_mask, target_mm, velocities=vel)
        out.append(scale_motion(cycle, f, velocities=vel))
        factors.append(f)
    return out, factors


# ---------------------------------------------------------------------------- breathing trace
def read_trace(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(time_s, amplitude)`` float arrays from a CSV of ``time, amplitude`` rows.

    Blank lines and ``#`` comments are skipped; a first row that is not numeric is a header.
    Times must be finite and strictly increasing; at least 3 samples.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read breathing trace ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a text CSV of 'time, amplitude' rows (byte {exc.start} is not UTF-8 text)") from exc
    times, amps = [], []
    seen_data = False
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) < 2:
            raise TraceError(f"{path}:{lineno}: expected 'time, amplitude', got {','.join(cells)!r}")
        try:
            t, a = float(cells[0]), float(cells[1])
        except ValueError:
            if not seen_data and not times:
                seen_data = True  # header row
                continue
            raise TraceError(f"{path}:{lineno}: not a number in {','.join(cells[:2])!r}") from None
        seen_data = True
        if not (math.isfinite(t) and math.isfinite(a)):
            raise TraceError(f"{path}:{lineno}: time and amplitude must be finite numbers")
        if times and t <= times[-1]:
            raise TraceError(f"{path}:{lineno}: time {t:g} does not increase (previous {times[-1]:g})")
        times.append(t)
        amps.append(a)
    if len(times) < 3:
        raise TraceError(f"{path}: breathing trace needs at least 3 samples, found {len(times)}")
    return np.asarray(times, dtype=np.float64), np.asarray(amps, dtype=np.float64)


def find_extrema(amplitude: np.ndarray, hysteresis: float = 0.15) -> list[tuple[int, str]]:
    """Alternating inhale peaks / exhale troughs ``[(index, "peak" | "trough")]`` of a trace.

    A turning point is accepted once the signal has moved back from it by more than
    ``hysteresis`` x the trace's range (so noise and small wiggles are not breaths); a turn at the
    very end of the trace that has not come back yet is not counted.
    """
    a = np.asarray(amplitude, dtype=np.float64)
    h = hysteresis * float(a.max() - a.min())
    if h <= 0:
        return []
    out: list[tuple[int, str]] = []
    hi = lo = 0
    direction = 0  # +1 rising (a peak is pending), -1 falling (a trough is pending), 0 not known yet
    for i in range(1, len(a)):
        if direction >= 0 and a[i] > a[hi]:
            hi = i
        if direction <= 0 and a[i] < a[lo]:
            lo = i
        if direction >= 0 and a[hi] - a[i] > h:
            out.append((hi, "peak"))
            direction, lo = -1, hi + int(np.argmin(a[hi:i + 1]))
        elif direction <= 0 and a[i] - a[lo] > h:
            out.append((lo, "trough"))
            direction, hi = 1, lo + int(np.argmax(a[lo:i + 1]))
    return out


def _envelope(t: np.ndarray, idx: list[int], values: np.ndarray) -> np.ndarray:
    """Piecewise-linear envelope through ``(t[idx], values[idx])``, constant outside."""
    return np.interp(t, t[idx], values[idx])


def phase_states(
    velocities: Mapping[int, DisplacementField], eoe: int, mask: np.ndarray | None = None
) -> dict[int, float]:
    """Breathing state in [0, 1] of each phase: projection of ``v_k`` on the end-exhale velocity."""
    ve = velocities[eoe].array.astype(np.float64)
    sel = (mask != 0) if mask is not None else np.ones(ve.shape[1:], bool)
    ref = float((ve[:, sel] ** 2).sum())
    if ref <= 0:
        raise ValueError("the end-exhale field is zero: no motion to follow a trace with")
    return {k: float(np.clip((v.array[:, sel].astype(np.float64) * ve[:, sel]).sum() / ref, 0.0, 1.0))
            for k, v in velocities.items()}


def _branches(states: Mapping[int, float], eoe: int) -> dict[str, tuple[np.ndarray, list[int | None]]]:
    """Per branch: increasing states and the phases they belong to (None = the reference, zero velocity).

    exhale: 0 -> ... -> eoe; inhale: eoe -> ... -> 90 -> (100 = 0), read backwards so states increase.
    """
    ks = sorted(states)
    ex = [None] + [k for k in ks if 0 < k <= eoe]
    inh = [None] + [k for k in reversed(ks) if k >= eoe and k != 0]
    out = {}
    for name, seq in (("exhale", ex), ("inhale", inh)):
        s = np.asarray([0.0 if k is None else states[k] for k in seq])
        out[name] = (np.maximum.accumulate(s), seq)
    return out


def _branch_velocity(branch, velocities, sigma: float) -> tuple[np.ndarray, tuple]:
    """Velocity at state ``sigma`` on a branch: linear between the two bracketing phases."""
    s, seq = branch
    shape = next(iter(velocities.values())).array.shape

    def vel(k):
        return np.zeros(shape, np.float32) if k is None else velocities[k].array

    if sigma >= s[-1]:
        # beyond the branch end (end-exhale): scale its velocity
        scale = sigma / s[-1] if s[-1] > 0 else 1.0
        return vel(seq[-1]) * scale, (seq[-1], seq[-1], 1.0)
    j = int(np.searchsorted(s, sigma, side="right")) - 1
    j = min(max(j, 0), len(s) - 2)
    w = 0.0 if s[j + 1] <= s[j] else (sigma - s[j]) / (s[j + 1] - s[j])
    return (1.0 - w) * vel(seq[j]) + w * vel(seq[j + 1]), (seq[j], seq[j + 1], float(w))


@dataclass(frozen=True)
class BreathingTrace:
    """A breathing trace :func:`iter_trace_sequence` can follow, read and checked once (:func:`check_trace`):
    ``time_s`` and ``amplitude`` ``(n,)`` float64 (seconds; the monitor's unit), the alternating inhale peaks and
    exhale troughs ``extrema`` (:func:`find_extrema`, indices into them) and whether the amplitude grows on
    inhalation (``inhale_positive``)."""

    path: Path
    time_s: np.ndarray
    amplitude: np.ndarray
    extrema: list[tuple[int, str]]
    inhale_positive: bool = True


def check_trace(trace_csv: str | os.PathLike, inhale_positive: bool = True,
                hysteresis: float = 0.15) -> BreathingTrace:
    """The trace in ``trace_csv`` (:func:`read_trace`) when :func:`iter_trace_sequence` can follow it: it holds
    at least one full breath (an inhale peak and an exhale trough beyond ``hysteresis`` x its range,
    :func:`find_extrema`); :class:`TraceError` naming the file otherwise.  Needs no motion: call it before
    anything is written."""
    path = Path(trace_csv)
    t, amp = read_trace(path)
    ext = find_extrema(amp if inhale_positive else -amp, hysteresis)
    if not any(kind == "peak" for _, kind in ext) or not any(kind == "trough" for _, kind in ext):
        raise TraceError(f"{path}: no full breath found (need an inhale peak and an exhale trough beyond "
                         f"{hysteresis:.0%} of the amplitude range)")
    return BreathingTrace(path, t, amp, ext, inhale_positive)


def iter_trace_sequence(
    fields_by_phase: Mapping[int, DisplacementField],
    trace: BreathingTrace,
    velocities: Mapping[int, DisplacementField] | None = None,
    model_depth: float | None = None,
    mask: np.ndarray | None = None,
) -> Iterator[tuple[float, DisplacementField]]:
    """One field per trace sample ``(time_s, DisplacementField)`` following a breathing trace (module doc),
    computed as they are taken (a long trace never holds more than one field).

    Args:
        fields_by_phase: phase -> pull field relative to phase 00 (any subset of phases holding
            the end-exhale one; phase 00, if given, is the reference).
        trace: the breathing trace (:func:`check_trace` of a CSV of ``time, amplitude``: seconds, any unit;
            irregular breaths allowed).
        velocities: precomputed :func:`velocity_fields` (else computed here).
        model_depth: trace amplitude (peak - trough) that corresponds to the model's cycle;
            default: the median breath depth of the trace.
        mask: optional ``(z, y, x)`` region (e.g. lung) for the phase states and end-exhale choice.

    Each field's ``meta`` holds ``time_s``, ``amplitude``, ``branch``, ``sigma``, ``depth`` and the
    bracketing ``phases`` with the interpolation weight.
    """
    path, t, amp, ext = trace.path, trace.time_s, trace.amplitude, trace.extrema
    a = amp if trace.inhale_positive else -amp
    peaks = [i for i, kind in ext if kind == "peak"]
    troughs = [i for i, kind in ext if kind == "trough"]
    P, T = _envelope(t, peaks, a), _envelope(t, troughs, a)
    depth = P - T
    if model_depth is None:  # median depth of the half-breaths between consecutive turning points
        model_depth = float(np.median([abs(a[j] - a[i]) for (i, _), (j, _) in zip(ext, ext[1:])]))
    if not model_depth > 0:
        raise TraceError(f"{path}: model depth must be > 0, got {model_depth}")
    vel = dict(velocities) if velocities is not None else velocity_fields(fields_by_phase)
    vel = {int(k): v for k, v in vel.items() if int(k) in {int(x) for x in fields_by_phase}}
    any_v = next(iter(vel.values()))
    vel.setdefault(0, DisplacementField(np.zeros_like(any_v.array), any_v.geometry))
    eoe = end_exhale_phase({k: v for k, v in vel.items() if k != 0}, mask)
    branches = _branches(phase_states(vel, eoe, mask), eoe)
    geom = next(iter(vel.values())).geometry

    # branch of each sample: between a peak and the next trough = exhale; before the first extremum
    # the branch leads into it; after the last it leads away from it.
    kinds = np.empty(len(t), dtype=object)
    first_i, first_kind = ext[0]
    kinds[: first_i + 1] = "inhale" if first_kind == "peak" else "exhale"
    for (i0, k0), (i1, _) in zip(ext, ext[1:] + [(len(t) - 1, None)]):
        kinds[i0 + 1: i1 + 1] = "exhale" if k0 == "peak" else "inhale"
    for i in range(len(t)):
        sigma = float(np.clip((P[i] - a[i]) / depth[i], 0.0, 1.0)) if depth[i] > 0 else 0.0
        d = float(depth[i] / model_depth)
        v, (k0, k1, w) = _branch_velocity(branches[kinds[i]], vel, sigma)
        f = exp_field(DisplacementField(np.asarray(v, np.float32), geom), d)
        f.meta.update({"time_s": float(t[i]), "amplitude": float(amp[i]), "branch": kinds[i], "sigma": sigma,
                       "depth": d, "phases": [k0 if k0 is not None else 0, k1 if k1 is not None else 0], "weight": w})
        yield float(t[i]), f
