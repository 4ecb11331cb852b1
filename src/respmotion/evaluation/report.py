"""Evaluation report: ``report.json`` + a one-page ``summary.png`` + ``summary.html`` (PNG embedded, table).

``report`` is a JSON-like dict.  Keys the summary page draws (all optional; any other keys go to the JSON only):

* ``"title"``: str.
* ``"headline"``: ``{name: number or str}``, the table of headline numbers.
* ``"breathing_curve"``: ``{label: {phase: mm}}``, e.g. ``{"generated": ..., "registered": ..., "ground truth": ...}``
  (values from :func:`respmotion.evaluation.metrics.breathing_curve`).
* ``"dvf_error_per_phase"``: ``{label: {phase: stats}}`` with stats from
  :func:`respmotion.evaluation.metrics.dvf_error` (``mean``, optional ``p95``) or a bare number (mm).
* ``"landmarks"``: a :func:`respmotion.evaluation.landmarks.landmark_report` dict, or ``{label: such dict}``.
* ``"breathing_band"``: ``{label: {phase: [low, high]}}`` (mm), e.g. the range of K samples' breathing curves,
  drawn as a band behind the curves.
* ``"generator"``: ``{score: {phase: mm}}`` (:mod:`respmotion.evaluation.ensemble`: ``single_sample_error``,
  ``mean_error``, ``energy_score``, ``spread``, ``population_mean_error``), drawn with the DVF errors and
  tabled per phase in the HTML page.

Phase keys may be ints or strings (JSON turns them into strings).  In the JSON, non-finite floats (e.g. the
PSNR of identical images) become ``null`` and numpy values become Python numbers.  ``report.json`` is written
last, so its presence means the three files are complete; every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure

from ..io.atomic import atomic_path, write_json

#: Size of ``summary.png`` in pixels (width, height).
SUMMARY_SIZE_PX: tuple[int, int] = (1400, 1000)
_DPI = 100


def _jsonable(obj: Any) -> Any:
    """Recursively: str keys, Python numbers, lists for arrays/tuples, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k.item() if isinstance(k, np.generic) else k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _by_phase(curve: Mapping) -> tuple[list[int], list[float]]:
    """``{phase: value}`` -> phases sorted numerically and values (a stats dict contributes its ``mean``)."""
    items = sorted((int(p), v) for p, v in curve.items())
    phases = [p for p, _ in items]
    vals = [float("nan") if v is None else float(v["mean"] if isinstance(v, Mapping) else v) for _, v in items]
    return phases, vals


def _no_data(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_breathing(ax, report: Mapping) -> None:
    curves = report.get("breathing_curve") or {}
    if not curves:
        return _no_data(ax, "Breathing curve")
    for label, band in (report.get("breathing_band") or {}).items():
        rows = sorted((int(p), lo, hi) for p, (lo, hi) in band.items())
        ax.fill_between([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], alpha=0.25,
                        label=f"{label} (range)")
    for label, curve in curves.items():
        ax.plot(*_by_phase(curve), marker="o", label=str(label))
    ax.set(title="Breathing curve: mean |u| in the lungs", xlabel="phase (%)", ylabel="mm")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _plot_dvf_error(ax, report: Mapping) -> None:
    errors = report.get("dvf_error_per_phase") or {}
    if not errors:
        return _no_data(ax, "DVF error per phase")
    for label, per_phase in errors.items():
        line = ax.plot(*_by_phase(per_phase), marker="o", label=f"{label} mean")[0]
        p95 = {p: s["p95"] for p, s in per_phase.items() if isinstance(s, Mapping) and "p95" in s}
        if p95:
            ax.plot(*_by_phase(p95), ls=":", color=line.get_color(), label=f"{label} p95")
    gen = report.get("generator") or {}
    for key, style in (("energy_score", "--"), ("spread", ":")):
        if gen.get(key):
            ax.plot(*_by_phase(gen[key]), ls=style, marker="x", color="k", label=f"model {key.replace('_', ' ')}")
    ax.set(title="DVF error per phase", xlabel="phase (%)", ylabel="mm")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _plot_landmarks(ax, report: Mapping) -> None:
    lm = report.get("landmarks") or {}
    reports = {"": lm} if "phases" in lm else lm
    if not reports:
        return _no_data(ax, "Landmark error per phase")
    no_motion_drawn = False
    for label, rep in reports.items():
        phases = rep.get("phases", {})
        for key, style in (("field", "-"), ("no_motion", "--")):
            if key == "no_motion" and no_motion_drawn:
                continue
            rows = {p: r[key]["all"] for p, r in phases.items() if key in r and r[key]["all"].get("n", 0) > 0}
            if not rows:
                continue
            x, mean = _by_phase(rows)
            sd = [rows[p]["sd"] for p in sorted(rows, key=int)]
            name = "no motion" if key == "no_motion" else (label or "field")
            ax.errorbar(x, mean, yerr=sd, ls=style, marker="o", capsize=3, label=f"{name} (mean ± sd)")
            no_motion_drawn |= key == "no_motion"
    ax.set(title="Landmark error per phase", xlabel="phase (%)", ylabel="mm")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _plot_table(ax, report: Mapping) -> None:
    ax.axis("off")
    ax.set_title("Headline numbers")
    rows = [[str(k), _fmt(v)] for k, v in (report.get("headline") or {}).items()]
    if not rows:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    table = ax.table(cellText=rows, colLabels=["metric", "value"], loc="upper center", cellLoc="left",
                     colWidths=[0.75, 0.25])
    table.auto_set_font_size(False)
    fit = min(1.0, 15.0 / len(rows))  # up to 15 rows at full size; more rows shrink to stay on the page
    table.set_fontsize(9 * max(fit, 0.6))
    table.scale(1.0, 1.3 * fit)


def _summary_figure(report: Mapping) -> Figure:
    w, h = SUMMARY_SIZE_PX
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI)
    axes = fig.subplots(2, 2)
    _plot_breathing(axes[0, 0], report)
    _plot_dvf_error(axes[0, 1], report)
    _plot_landmarks(axes[1, 0], report)
    _plot_table(axes[1, 1], report)
    fig.suptitle(str(report.get("title", "respmotion evaluation")))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.92, wspace=0.2, hspace=0.3)
    return fig


def _summary_html(report: Mapping, png: bytes) -> str:
    title = html.escape(str(report.get("title", "respmotion evaluation")))
    rows = "\n".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in (report.get("headline") or {}).items()
    )
    data = base64.b64encode(png).decode("ascii")
    gen = report.get("generator") or {}
    table = ""
    if gen:
        phases = sorted({p for v in gen.values() for p in v}, key=int)
        head = "".join(f"<th>{html.escape(str(p))} %</th>" for p in phases)
        body = "\n".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td>"
                         + "".join(f"<td>{_fmt(v.get(p))}</td>" for p in phases) + "</tr>" for k, v in gen.items())
        table = (f"<h2>The model as a generator (mm, mean over the studies)</h2>\n<table><tr><th>score</th>{head}"
                 f"</tr>\n{body}\n</table>\n")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + title + "</title>\n"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>\n"
        f"<h1>{title}</h1>\n<img alt=\"summary\" src=\"data:image/png;base64,{data}\">\n"
        "<h2>Headline numbers</h2>\n<table><tr><th>metric</th><th>value</th></tr>\n"
        f"{rows}\n</table>\n{table}<p>Full numbers: report.json</p>\n</body></html>\n"
    )


def write_report(out_dir: str | os.PathLike, report: Mapping) -> dict[str, Path]:
    """Write ``summary.png``, ``summary.html`` and (last) ``report.json`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    clean = _jsonable(report)
    paths = {"png": out / "summary.png", "html": out / "summary.html", "json": out / "report.json"}
    fig = _summary_figure(clean)
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(_summary_html(clean, paths["png"].read_bytes()), encoding="utf-8")
    write_json(paths["json"], clean)
    return paths
