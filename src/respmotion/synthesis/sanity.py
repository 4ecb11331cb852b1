"""Per-phase lung measures of a synthesized cycle (``summary.json``) and their plot (``summary.png`` / ``.html``).

Measured on the native CT grid, from each written phase (HU before int16 rounding) and the input's lung mask
pulled with the same field (trilinear occupancy, 0..1):

* ``lung_volume_ml``: sum of the lung occupancy x voxel volume;
* ``mean_lung_hu``: mean HU over the phase's lung mask (occupancy >= 0.5);
* ``mean_lung_hu_mass_law``: what conservation of mass predicts from the input and the volume:
  ``(mean_in + 1000) * volume_in / volume - 1000`` (compare with ``mean_lung_hu``);
* ``lung_mass_g`` and ``lung_mass_change_percent`` (vs the input): mass ``sum((HU + 1000) / 1000 g/ml x voxel
  ml)`` of the lung's interior (the input's lung mask eroded by :data:`INTERIOR_EROSION` voxels) followed
  through the motion with its pulled occupancy.  Following a fixed piece of lung keeps partial-volume voxels at
  the lung's edge (chest wall, mediastinum, diaphragm, 7x denser than lung) out of the sum: their share of a
  mask changes with the interpolation and would move a whole-mask sum by percents;
* ``diaphragm_z_mm``: mean LPS z (mm, + superior) of the lung base, the most inferior voxel of every (y, x)
  column of the phase's lung mask (:func:`respmotion.anatomy.measures.lung_base_points`); ``None`` on a grid
  whose z axis is not superior-inferior.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import ndimage

from ..core.types import Volume
from ..io.atomic import atomic_path

#: voxels the lung mask is eroded by for the tracked lung mass
INTERIOR_EROSION = 2
#: keys of a phase record, with the plot's labels
MEASURES = {"lung_volume_ml": "lung volume (ml)", "mean_lung_hu": "mean lung HU",
            "lung_mass_change_percent": "lung mass change (%)", "diaphragm_z_mm": "diaphragm z (mm, LPS +z)"}


class LungRecord:
    """Lung measures of one input CT ``(z, y, x)`` HU and its lung mask, per synthesized phase."""

    def __init__(self, ct: Volume, lung: np.ndarray) -> None:
        self.geometry = ct.geometry
        self.voxel_ml = float(np.prod(ct.geometry.spacing)) / 1000.0
        mask = np.asarray(lung) != 0  # may be empty (a CT without lungs): the measures are then None
        self.lung = mask.astype(np.float32)
        self.interior = ndimage.binary_erosion(mask, iterations=INTERIOR_EROSION).astype(np.float32)
        self.si = abs(float(ct.geometry.direction_matrix[2, 2])) >= 0.9
        self.input = self._measures(np.asarray(ct.array, np.float32), self.lung, self.interior)

    def _measures(self, hu: np.ndarray, lung: np.ndarray, interior: np.ndarray) -> dict:
        mask = lung >= 0.5
        rec = {"lung_volume_ml": float(lung.sum(dtype=np.float64)) * self.voxel_ml,
               "mean_lung_hu": float(hu[mask].mean(dtype=np.float64)) if mask.any() else None,
               "lung_mass_g": float((interior * (hu + 1000.0)).sum(dtype=np.float64)) / 1000.0 * self.voxel_ml,
               "diaphragm_z_mm": None}
        if self.si and mask.any():
            from ..anatomy.measures import lung_base_points

            rec["diaphragm_z_mm"] = float(lung_base_points(Volume(mask.astype(np.uint8), self.geometry))[:, 2].mean())
        return rec

    def phase(self, hu: np.ndarray, lung: np.ndarray, interior: np.ndarray) -> dict:
        """Measures of one phase: its HU and the pulled lung and interior occupancies, all ``(z, y, x)``."""
        rec = self._measures(hu, lung, interior)
        ref = self.input
        rec["mean_lung_hu_mass_law"] = ((ref["mean_lung_hu"] + 1000.0) * ref["lung_volume_ml"]
                                        / rec["lung_volume_ml"] - 1000.0) \
            if rec["lung_volume_ml"] > 0 and ref["mean_lung_hu"] is not None else None
        rec["lung_mass_change_percent"] = 100.0 * (rec["lung_mass_g"] / ref["lung_mass_g"] - 1.0) \
            if ref["lung_mass_g"] > 0 else None
        return rec


def _figure(samples: list[Mapping]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), dpi=100)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, label) in zip(axes, MEASURES.items()):
        for i, s in enumerate(samples):
            rows = sorted((int(k), v.get("lung", {}).get(key)) for k, v in s["phases"].items())
            ks = [k for k, v in rows if v is not None]
            ax.plot(ks, [v for _, v in rows if v is not None], "o-", label=f"sample {i:02d}")
            if key == "mean_lung_hu":
                law = [(int(k), v["lung"].get("mean_lung_hu_mass_law")) for k, v in sorted(s["phases"].items())]
                ax.plot([k for k, v in law if v is not None], [v for _, v in law if v is not None], "k:",
                        label="mass law from the volume" if i == 0 else None)
        ax.set_title(label)
        ax.set_xlabel("phase (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("respmotion synthesize: lungs per phase")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.9, wspace=0.25, hspace=0.4)
    return fig


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.1f}"


def write_plot(out: str | Path, summary: Mapping) -> dict[str, str]:
    """``summary.png`` (the :data:`MEASURES` over the phases of every sample) and ``summary.html`` (the PNG and a
    table of the first sample) in ``out``; returns their paths."""
    out = Path(out)
    samples = [s for s in summary.get("samples", []) if all("lung" in v for v in s["phases"].values())]
    if not samples:
        raise ValueError("no per-phase lung measures in the summary to plot")
    png, page = out / "summary.png", out / "summary.html"
    with atomic_path(png) as tmp:
        _figure(samples).savefig(tmp, format="png")
    keys = [*MEASURES, "mean_lung_hu_mass_law", "lung_mass_g"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = "\n".join(f"<tr><td>{k}</td>" + "".join(f"<td>{_fmt(v['lung'].get(c))}</td>" for c in keys) + "</tr>"
                     for k, v in sorted(samples[0]["phases"].items()))
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    with atomic_path(page) as tmp:
        tmp.write_text(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>respmotion synthesize</title>\n"
            "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>\n"
            f"<h1>Lungs per phase</h1>\n<img alt=\"summary\" src=\"data:image/png;base64,{data}\">\n"
            f"<h2>Sample 00</h2>\n<table><tr><th>phase</th>{head}</tr>\n{rows}\n</table>\n"
            "<p>Definitions: respmotion.synthesis.sanity; all numbers: summary.json</p>\n</body></html>\n",
            encoding="utf-8")
    return {"png": str(png), "html": str(page)}
