"""Fit the motion reference to the DIR-Lab 4D-CT landmarks, and compare the phantom with it (``make motion-reference``).

``python -m respmotion.data.motion_reference_fit --data DIR --out FILE.json [--plot FILE.png] [--phantom N]``
measures, from the DIR-Lab landmarks of cases 1-9 (no images; see shared/data's README):

* **amplitude**: per case, the mean *superior* displacement (mm) of the 300 landmarks from T00 (end-inhale)
  to T50 (end-exhale) -- the one number a user gives as "the breathing amplitude";
* **motion vs position**: the displacement (superior, posterior, lateral mm) as a function of the landmark's
  normalised position in the lung, ``n = (n_si, n_ap, n_ml)`` in [0, 1]: apex -> base, anterior ->
  posterior, medial -> lateral.  The lung box is the landmarks' own extent (percentiles
  :data:`~respmotion.anatomy.lung_frame.EXTENT_PERCENTILES` per axis at T00; medial-lateral is
  ``|x - centre| / half width``);
* **phase curve** over the expiratory half: the state ``s(T)`` in [0, 1] (projection of the 75 tracked
  landmarks' displacement at T00..T50 on their T50 displacement);

and fits the population model of :mod:`respmotion.data.motion_reference` to them: ``f`` by ridge least squares
to every case's displacement divided by its own amplitude (each case weighs the same); ``n`` and the end-exhale
phase ``phi_p`` to the DIR-Lab expiratory half (normalised at T50; ``phi_p`` in [0.50, 0.55] because T50 is
DIR-Lab's extreme phase; the inhale branch is the published physiology, not measured here); ``eta`` as the median
lead of the in-plane state over the superior state on the exhale half.  ``--phantom N`` also prints the
phantom's motion statistics next to the reference (:func:`phantom_comparison`, the table of docs/motion.md).

Coordinates: DIR-Lab indices are read with :func:`respmotion.io.landmarks.read_dirlab_txt` (x = column,
patient right -> left; y = row, anterior -> posterior; z = slice, superior -> inferior as the data
show: the base, where the landmarks move most, has the larger slice index).  All displacements here are
point motion (push) from T00, in mm: superior = -dz, posterior = +dy, lateral = +dx on the left side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..anatomy.lung_frame import EXTENT_PERCENTILES, lateral_sign, lung_box, normalised
from .motion_reference import (COMPONENTS, DEGREE, FORMAT, N_GRID, PEAKS, SAMPLED_PHASES, basis, exponent_per_case,
                               exponents, fit_exhale, load_reference, phase_state, profile_table, spatial_unit)

CASES = tuple(range(1, 10))
RIDGE = 1e-3
DIRLAB_INFERIOR = 1.0  # DIR-Lab slice indices grow inferiorly (the base moves most, at the larger index)


# ---------------------------------------------------------------------------- data
@dataclass
class Case:
    """One DIR-Lab case in mm (LPS-like axes of the DIR-Lab grid: x left, y posterior, z inferior)."""

    number: int
    t00: np.ndarray  # (300, 3) x, y, z mm at end-inhale
    t50: np.ndarray  # (300, 3) at end-exhale
    sampled: list[np.ndarray]  # 6 x (75, 3) at T00..T50


def load_cases(root: str | Path, cases: Sequence[int] = CASES) -> list[Case]:
    """The DIR-Lab landmark sets of ``cases`` from the shared-data folder layout (README there)."""
    from ..io.landmarks import read_dirlab_txt

    root = Path(root)
    out = []
    for c in cases:
        d = root / f"case{c}"
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: DIR-Lab case folder not found")
        ext = d / "ExtremePhases"
        t00 = read_dirlab_txt(ext / f"Case{c}_300_T00_xyz.txt", case=c)
        t50 = read_dirlab_txt(ext / f"Case{c}_300_T50_xyz.txt", case=c)
        sampled = [read_dirlab_txt(d / "Sampled4D" / f"case{c}_4D-75_T{k:02d}.txt", case=c) for k in SAMPLED_PHASES]
        out.append(Case(c, t00, t50, sampled))
    return out


def components(points_xyz: np.ndarray, disp_xyz: np.ndarray, box: dict[str, list[float]]) -> np.ndarray:
    """DIR-Lab displacement (x, y, z mm) -> (superior, posterior, lateral) mm."""
    return np.stack([-disp_xyz[:, 2], disp_xyz[:, 1], disp_xyz[:, 0] * lateral_sign(points_xyz, box)], 1)


def amplitude(case: Case) -> float:
    """Mean superior displacement (mm) of the 300 landmarks T00 -> T50: the case's breathing amplitude."""
    return float(-(case.t50[:, 2] - case.t00[:, 2]).mean())


# ---------------------------------------------------------------------------- fits
def fit_spatial(cases: Sequence[Case], degree: int = DEGREE, ridge: float = RIDGE) -> dict[str, Any]:
    """Fit ``f`` (module doc) on ``cases``: coefficients ``(3, B)`` per unit amplitude."""
    rows, ys, ws = [], [], []
    for c in cases:
        box = lung_box(c.t00)
        a = amplitude(c)
        rows.append(basis(normalised(c.t00, box, DIRLAB_INFERIOR), degree))
        ys.append(components(c.t00, c.t50 - c.t00, box) / a)
        ws.append(np.full(len(c.t00), 1.0 / len(c.t00)))
    X, Y, w = np.concatenate(rows), np.concatenate(ys), np.concatenate(ws)
    A = X.T @ (X * w[:, None]) + ridge * np.eye(X.shape[1])
    coef = np.linalg.solve(A, X.T @ (Y * w[:, None])).T  # (3, B)
    amps = [amplitude(c) for c in cases]
    return {"degree": degree, "ridge": ridge, "exponents": exponents(degree), "coef": coef.tolist(),
            "amplitude_median_mm": float(np.median(amps)), "cases": [c.number for c in cases]}


def sampled_states(case: Case) -> dict[str, np.ndarray]:
    """Measured states at T00..T50 of one case: superior component and AP+lateral, each divided by its T50 mean
    (``superior``), and the 3D projection on the T50 displacement (``projection``)."""
    box = lung_box(case.sampled[0])
    comps = [components(case.sampled[0], p - case.sampled[0], box) for p in case.sampled]
    end = comps[-1]
    proj = np.array([(c * end).sum() / (end * end).sum() for c in comps])
    sup = np.array([c[:, 0].mean() / end[:, 0].mean() for c in comps])
    # AP/LR projected on their own T50 vectors (state of the in-plane motion)
    ip = end[:, 1:]
    inplane = np.array([(c[:, 1:] * ip).sum() / (ip * ip).sum() for c in comps])
    return {"projection": proj, "superior": sup, "inplane": inplane}


def fit_phase_curve(cases: Sequence[Case]) -> dict[str, Any]:
    """Fit ``n`` and the end-exhale phase to the mean expiratory-half superior state (normalised at T50),
    and the hysteresis ``eta`` to the in-plane state's lead over the superior state."""
    sup = np.array([sampled_states(c)["superior"] for c in cases])
    inpl = np.array([sampled_states(c)["inplane"] for c in cases])
    mean = sup.mean(0)
    pct = np.asarray(SAMPLED_PHASES, float)
    _, n, peak = fit_exhale(mean, N_GRID, PEAKS)
    s = phase_state(pct, n, peak)[0]
    mid = (s > 0.1) & (s < 0.9)
    lead = (inpl[:, mid] - sup[:, mid]) / (s[mid] * (1.0 - s[mid]))
    eta_measured = float(np.median(lead))
    eta = float(np.clip(eta_measured, -1.0, 1.0))
    # the peak phase varies between patients: fit each case with the population n
    peaks = [fit_exhale(row, [n], PEAKS)[2] for row in sup]
    return {"n": round(n, 3), "peak": round(peak, 3), "eta": round(eta, 3), "eta_measured_median": eta_measured,
            "peak_per_case": peaks, "peak_range": [float(min(peaks)), float(max(peaks))],
            "superior_state_mean": mean.tolist(), "superior_state_per_case": sup.tolist(),
            "inplane_state_per_case": inpl.tolist(), "phases": list(SAMPLED_PHASES)}


# ---------------------------------------------------------------------------- evaluation
def predict(model: dict[str, Any], case: Case, amplitude_mm: float | None) -> np.ndarray:
    """Predicted T00 -> T50 displacement of a case's 300 landmarks in DIR-Lab axes (x, y, z mm)."""
    box = lung_box(case.t00)
    a = model["amplitude_median_mm"] if amplitude_mm is None else amplitude_mm
    d = a * spatial_unit(model, normalised(case.t00, box, DIRLAB_INFERIOR))  # superior, posterior, lateral
    return np.stack([d[:, 2] * lateral_sign(case.t00, box), d[:, 1], -d[:, 0]], 1)


def leave_one_out(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Per case k: the model fitted without k predicts k's landmarks with / without k's amplitude."""
    rows = []
    for k, case in enumerate(cases):
        model = fit_spatial([c for i, c in enumerate(cases) if i != k])
        true = case.t50 - case.t00
        zero = float(np.linalg.norm(true, axis=1).mean())
        row = {"case": case.number, "amplitude_mm": amplitude(case), "zero_motion_mm": zero}
        for name, amp in (("with_amplitude", amplitude(case)), ("without_amplitude", None)):
            err = float(np.linalg.norm(predict(model, case, amp) - true, axis=1).mean())
            row[f"{name}_mm"] = err
            row[f"{name}_gain"] = 1.0 - err / zero
        rows.append(row)
    return rows


def profiles(cases: Sequence[Case], bins: int = 5) -> dict[str, Any]:
    """Mean displacement per unit amplitude in bins of each normalised coordinate (pooled cases)."""
    ns, ds = [], []
    for c in cases:
        box = lung_box(c.t00)
        ns.append(normalised(c.t00, box, DIRLAB_INFERIOR))
        ds.append(components(c.t00, c.t50 - c.t00, box) / amplitude(c))
    return profile_table(np.concatenate(ns), np.concatenate(ds), bins)


def build_reference(root: str | Path) -> dict[str, Any]:
    """Everything the JSON holds (module doc), from the DIR-Lab folder ``root``."""
    cases = load_cases(root)
    amps = [amplitude(c) for c in cases]
    mags = [float(np.linalg.norm(c.t50 - c.t00, axis=1).mean()) for c in cases]
    comp_means = [components(c.t00, c.t50 - c.t00, lung_box(c.t00)).mean(0).tolist() for c in cases]
    return {
        "format": FORMAT,
        "source": "DIR-Lab 4D-CT landmarks, cases 1-9 (300 T00/T50 pairs, 75 landmarks over T00..T50)",
        "axes": "superior, posterior, lateral (mm, point motion from end-inhale)",
        "normalised_coordinates": {"order": ["n_si (apex 0 -> base 1)", "n_ap (anterior 0 -> posterior 1)",
                                             "n_ml (medial 0 -> lateral 1)"],
                                   "extent_percentiles": list(EXTENT_PERCENTILES)},
        "amplitude": {"definition": "mean superior displacement of the 300 landmarks T00 -> T50, mm",
                      "per_case": dict(zip([str(c.number) for c in cases], amps)),
                      "median_mm": float(np.median(amps)), "mean_mm": float(np.mean(amps)),
                      "sd_mm": float(np.std(amps)), "log_mean": float(np.mean(np.log(amps))),
                      "log_sd": float(np.std(np.log(amps))),
                      "magnitude_mean_per_case_mm": dict(zip([str(c.number) for c in cases], mags)),
                      "component_mean_per_case_mm": dict(zip([str(c.number) for c in cases], comp_means))},
        "spatial_model": fit_spatial(cases),
        "phase_curve": fit_phase_curve(cases),
        "profiles": profiles(cases),
        "leave_one_out": leave_one_out(cases),
        "references": [
            "R. Castillo et al., Phys. Med. Biol. 54:1849-1870 (2009); E. Castillo et al., Phys. Med. Biol. "
            "55:305-327 (2010) (DIR-Lab)",
            "D. A. Lujan et al., Med. Phys. 26:715-720 (1999) (cos^2n breathing model)",
            "Y. Seppenwoolde et al., Int. J. Radiat. Oncol. Biol. Phys. 53:822-834 (2002) (hysteresis)",
        ],
    }


def plot_reference(ref: dict[str, Any], path: str | Path) -> None:
    """One figure: motion vs normalised position (3 panels) and the phase curve (1 panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    prof = ref["profiles"]
    x = prof["bin_centres"]
    for ax, axis, label in zip(axes[:3], ("si", "ap", "ml"), ("apex -> base", "anterior -> posterior",
                                                             "medial -> lateral")):
        for comp in COMPONENTS:
            ax.plot(x, prof[axis][comp], "o-", label=comp)
        ax.set_xlabel(f"normalised position, {label}")
        ax.set_ylabel("displacement / amplitude")
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend()
    pc = ref["phase_curve"]
    pct = np.arange(0, 101, 2)
    s, h = phase_state(pct, pc["n"], pc["peak"], pc["eta"])
    for row in pc["superior_state_per_case"]:
        axes[3].plot(pc["phases"], row, color="0.7", lw=0.8)
    axes[3].plot(pc["phases"], pc["superior_state_mean"], "ko", label="DIR-Lab mean (superior)")
    axes[3].plot(pct, s / phase_state(50, pc["n"], pc["peak"])[0], label="model s (SI, /s(50))")
    axes[3].plot(pct, h / phase_state(50, pc["n"], pc["peak"])[0], "--", label="model h (AP/LR)")
    axes[3].set_xlabel("phase %")
    axes[3].set_ylabel("state")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- phantom vs reference
def phantom_comparison(patients: int = 8, shape: Sequence[int] = (16, 64, 64), ref: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The phantom's motion statistics (:func:`respmotion.data.phantom.motion_statistics`, seeds
    0..patients-1) next to the reference: amplitudes, mean components, superior profiles, phase states."""
    from .phantom import Phantom, motion_statistics

    ref = ref or load_reference()
    stats = [motion_statistics(Phantom(i, shape)) for i in range(patients)]
    amps = [s["amplitude_mm"] for s in stats]

    def prof(axis: str) -> list[float | None]:
        cols = zip(*[s["profiles"][axis]["superior"] for s in stats])  # per bin, over patients
        return [float(np.mean(vals)) if vals else None for vals in ([v for v in c if v is not None] for c in cols)]

    return {
        "patients": patients, "shape": list(shape),
        "amplitude_mm": {"phantom": amps, "reference": list(ref["amplitude"]["per_case"].values())},
        "component_mean_mm": {"phantom": np.mean([s["component_mean_mm"] for s in stats], 0).tolist(),
                              "reference": np.mean(list(ref["amplitude"]["component_mean_per_case_mm"].values()),
                                                   0).tolist()},
        "superior_profile": {a: {"phantom": prof(a), "reference": ref["profiles"][a]["superior"]}
                             for a in ("si", "ap", "ml")},
        "superior_state": {"phantom": {k: float(np.mean([s["superior_state"][k] for s in stats]))
                                       for k in stats[0]["superior_state"]},
                           "reference_exhale": dict(zip([f"{k:02d}" for k in ref["phase_curve"]["phases"]],
                                                        ref["phase_curve"]["superior_state_mean"]))},
        "spine_max_mm": max(s["spine_max_mm"] for s in stats),
        "end_exhale_phase": {"phantom": [s["end_exhale_phase"] for s in stats],
                             "reference": list(ref["phase_curve"]["peak_per_case"])},
        "curve_n": {"phantom": [s["curve_n"] for s in stats], "reference": exponent_per_case(ref["phase_curve"])},
        "hysteresis_loop_mm": [s["hysteresis_loop_mm"] for s in stats],
    }


def comparison_markdown(cmp: dict[str, Any]) -> str:
    """``phantom_comparison`` as the docs table (markdown)."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    pa, ra = cmp["amplitude_mm"]["phantom"], cmp["amplitude_mm"]["reference"]
    rows = ["| statistic | phantom | DIR-Lab |", "| --- | --- | --- |",
            f"| amplitude (mean superior at 50 %), median [min, max] mm | {np.median(pa):.2f} [{min(pa):.2f}, "
            f"{max(pa):.2f}] | {np.median(ra):.2f} [{min(ra):.2f}, {max(ra):.2f}] |",
            "| mean (superior, posterior, lateral) mm | " + ", ".join(f(v) for v in cmp["component_mean_mm"]["phantom"])
            + " | " + ", ".join(f(v) for v in cmp["component_mean_mm"]["reference"]) + " |"]
    for axis, label in (("si", "apex -> base"), ("ap", "anterior -> posterior"), ("ml", "medial -> lateral")):
        p = cmp["superior_profile"][axis]
        rows.append(f"| superior / amplitude, 5 bins {label} | {' '.join(f(v) for v in p['phantom'])} | "
                    f"{' '.join(f(v) for v in p['reference'])} |")
    st = cmp["superior_state"]
    rows.append("| superior state at 00..50 % | " + " ".join(f(st["phantom"][k]) for k in st["reference_exhale"])
                + " | " + " ".join(f(v) for v in st["reference_exhale"].values()) + " |")
    rows.append("| superior state at 60..90 % (inhale: Lujan model) | "
                + " ".join(f(st["phantom"][k]) for k in ("60", "70", "80", "90")) + " | (not measured) |")
    for key, label in (("end_exhale_phase", "end-exhale phase"), ("curve_n", "phase-curve exponent n")):
        p, r = cmp[key]["phantom"], cmp[key]["reference"]
        rows.append(f"| {label}, median [min, max] | {np.median(p):.2f} [{min(p):.2f}, {max(p):.2f}] | "
                    f"{np.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] (per case) |")
    loop = cmp["hysteresis_loop_mm"]
    rows.append(f"| hysteresis loop (largest in-plane gap at equal SI state), median [max] mm | {np.median(loop):.2f} "
                f"[{max(loop):.2f}] | (not measured) |")
    rows.append(f"| largest motion in the vertebral body, mm | {cmp['spine_max_mm']:.2f} | (not measured) |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DIR-Lab motion reference -> JSON (+ plot)")
    ap.add_argument("--data", required=True, help="the dirlab-4dct-landmarks folder")
    ap.add_argument("--out", required=True, help="JSON to write")
    ap.add_argument("--plot", help="PNG to write")
    ap.add_argument("--phantom", type=int, default=0, help="also print the phantom-vs-DIR-Lab table of N patients")
    args = ap.parse_args(argv)
    from ..io.atomic import write_json
    from ..io.landmarks import LandmarkFileError

    try:
        ref = build_reference(args.data)
    except (FileNotFoundError, LandmarkFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(args.out, ref)
    if args.plot:
        plot_reference(ref, args.plot)
    loo = ref["leave_one_out"]
    print(json.dumps({"amplitude_median_mm": ref["amplitude"]["median_mm"], "phase_curve": {
        k: ref["phase_curve"][k] for k in ("n", "peak", "eta", "peak_range")},
        "loo_gain_with_amplitude_min": min(r["with_amplitude_gain"] for r in loo),
        "loo_gain_without_amplitude_min": min(r["without_amplitude_gain"] for r in loo)}, indent=1))
    if args.phantom:
        print(comparison_markdown(phantom_comparison(args.phantom, ref=ref)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
