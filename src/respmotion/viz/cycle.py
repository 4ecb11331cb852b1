"""Breathing-cycle GIFs: the one entry point synthesis, evaluation and ``respmotion render`` call.

:func:`render_cycle` writes, for every requested view and slice, with one frame per phase:

* ``{name}{view}_{slice:03d}_motion.gif``: the CT of each phase with the motion drawn over it
  (arrows or a magnitude heatmap, see :mod:`respmotion.viz.frames`) and contour outlines;
* ``{name}{view}_{slice:03d}_diff.gif``: phase k minus the first phase (HU), when
  ``config.difference``;
* ``{name}{view}_{slice:03d}_compare.gif``: real | generated | generated - real, when real phases
  are given;
* an ``.mp4`` beside each GIF when ``config.mp4`` and imageio's ffmpeg plugin is installed;
* ``{name}render.json``: the list of files, slices, frame size, scales and the display convention.

Frames are ``(panel_px, n_panels * panel_px)`` pixels (height, width): one panel for motion and
difference GIFs, three for the comparison.  Orientation: :mod:`respmotion.viz.orient`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core import grid
from ..core.ops import warp_volume
from ..core.types import DisplacementField, Volume
from ..io.atomic import write_json
from ..io.layout import PHASES
from .config import RenderConfig
from .frames import Panel, Scales, nice_floor, render_frame
from .movie import write_gif, write_mp4
from .orient import VIEW_SPECS, Canonical, choose_slices, slice_count, view_slice, view_spacing, view_vectors
from . import orient

log = logging.getLogger("respmotion")

Masks = Sequence[Sequence[np.ndarray]]  # [structure][phase] -> (z, y, x) bool/uint8


def phases_from_fields(reference: Volume, fields: Sequence[DisplacementField | None]) -> list[Volume]:
    """The reference CT pulled through each phase's field (``None`` = the reference itself)."""
    return [Volume(reference.array.copy(), reference.geometry, dict(reference.meta)) if f is None
            else warp_volume(reference, f) for f in fields]


def warp_masks(mask: np.ndarray, reference: Volume, fields: Sequence[DisplacementField | None]) -> list[np.ndarray]:
    """A mask of the reference phase pulled like the image (nearest neighbour), one per phase.

    This is the mask *of the warped image* (``mask_k(p) = mask_ref(p + u_k(p))``), i.e. what to
    outline on :func:`phases_from_fields`' output.
    """
    vol = Volume(np.asarray(mask).astype(np.uint8), reference.geometry)
    return [vol.array.astype(bool) if f is None else warp_volume(vol, f, mode="nearest").array.astype(bool)
            for f in fields]


def default_labels(n: int) -> list[str]:
    """``phase 00%`` ... ``phase 90%`` for a 10-phase cycle, else ``phase 1/n`` ..."""
    if n == len(PHASES):
        return [f"phase {p:02d}%" for p in PHASES]
    return [f"phase {i + 1}/{n}" for i in range(n)]


def _check_geometry(items: Sequence, ref: Volume, what: str) -> None:
    for i, it in enumerate(items):
        if it is None:
            continue
        geom = it.geometry
        if not geom.same_as(ref.geometry):
            raise ValueError(f"{what}[{i}] has geometry {geom.shape} / {geom.spacing} mm, not that of the CT "
                             f"{ref.geometry.shape} / {ref.geometry.spacing} mm")


def _check_masks(masks: Masks, n: int, shape: tuple[int, ...], what: str) -> None:
    for s, per_phase in enumerate(masks):
        if len(per_phase) != n:
            raise ValueError(f"{what}[{s}] has {len(per_phase)} masks, expected one per phase ({n})")
        for k, m in enumerate(per_phase):
            if tuple(np.shape(m)) != tuple(shape):
                raise ValueError(f"{what}[{s}][{k}] has shape {np.shape(m)}, expected {tuple(shape)}")


def _magnitude_max(fields: Sequence[DisplacementField | None]) -> float:
    m = max((float(f.magnitude().max()) for f in fields if f is not None), default=0.0)
    return m if m > 0 else 1.0


def _inplane_max(fields_c: Sequence[np.ndarray | None], view: str) -> float:
    """Largest in-plane displacement (mm) of canonical fields in ``view``'s plane (1.0 if none)."""
    spec = VIEW_SPECS[view]
    m = max((float(np.sqrt(f[spec.row_axis].astype(np.float64) ** 2 + f[spec.col_axis] ** 2).max())
             for f in fields_c if f is not None), default=0.0)
    return m if m > 0 else 1.0


def _view_scales(cfg: RenderConfig, canon: Canonical, shape_c: tuple[int, ...], view: str, mag_max: float,
                 inplane_max: float) -> Scales:
    """Arrow grid and scale of one view (see :class:`RenderConfig` for the automatic choices):
    arrows every ``step_mm`` (about 18 across), scale = 1-2-5 number <= 1.5 * step_mm / the
    largest in-plane displacement, so the longest arrow spans at most 1.5 grid steps."""
    spec = VIEW_SPECS[view]
    sr, sc = view_spacing(canon, view)
    h_mm, w_mm = (float(v) for v in grid.to_mm((shape_c[spec.row_axis], shape_c[spec.col_axis]), (sr, sc)))
    step_mm = cfg.arrow_spacing_mm or max(h_mm, w_mm) / 18.0
    step = tuple(max(1, int(round(v))) for v in grid.to_voxels(step_mm, (sr, sc)))
    scale = cfg.arrow_scale or nice_floor(1.5 * step_mm / inplane_max)
    return Scales(
        display_window_hu=tuple(cfg.display_window_hu), diff_window_hu=cfg.diff_window_hu, magnitude_max_mm=mag_max,
        arrow_step=step, arrow_scale=scale, arrow_key_mm=nice_floor(inplane_max / 2.0),
        heatmap_alpha=cfg.heatmap_alpha,
    )


def render_cycle(
    out_dir: str | os.PathLike,
    ct_phases: Sequence[Volume] | None = None,
    fields: Sequence[DisplacementField | None] | None = None,
    *,
    reference: Volume | None = None,
    contours: Masks | None = None,
    real_phases: Sequence[Volume] | None = None,
    real_fields: Sequence[DisplacementField | None] | None = None,
    real_contours: Masks | None = None,
    phase_labels: Sequence[str] | None = None,
    name: str = "",
    config: RenderConfig | None = None,
    **settings,
) -> list[Path]:
    """Render GIFs of a breathing cycle; returns the paths written (GIFs, MP4s, manifest last).

    Args:
        out_dir: output folder (created).
        ct_phases: the CT of every phase, ``(z, y, x)`` HU, one geometry; or ``None`` with
            ``reference`` + ``fields`` (synthesis): phases = reference pulled through each field.
        fields: pull field of every phase relative to the first (``(3, z, y, x)`` mm, ``None`` or
            absent entry = no motion); drawn as arrows or a heatmap.  ``None``: CT only.
        reference: the static CT when ``ct_phases`` is ``None``.
        contours: ``[structure][phase]`` masks ``(z, y, x)`` outlined on the (generated) phases.
        real_phases: the real CT of every phase; adds the real | generated | difference GIF.
        real_fields: motion drawn on the real panel of the comparison (e.g. registration or
            phantom ground truth).
        real_contours: ``[structure][phase]`` masks outlined on the real panel.
        phase_labels: frame titles (default ``phase 00%`` ... ``phase 90%`` for 10 phases).
        name: prefix of every file name (e.g. ``"P001_"``).
        config: :class:`RenderConfig`; ``**settings`` override its fields (e.g. ``style="heatmap"``).

    Raises:
        ValueError: inconsistent inputs (counts, geometries, mask shapes) or bad settings.
    """
    cfg = dataclasses.replace(config or RenderConfig(), **settings).validate()
    out = Path(out_dir)
    if ct_phases is None:
        if reference is None or fields is None:
            raise ValueError("render_cycle needs ct_phases, or a reference CT and its fields")
        ct_phases = phases_from_fields(reference, fields)
    phases = list(ct_phases)
    n = len(phases)
    if n == 0:
        raise ValueError("render_cycle needs at least one phase")
    ref = phases[0]
    _check_geometry(phases, ref, "ct_phases")
    if fields is not None:
        if len(fields) != n:
            raise ValueError(f"got {len(fields)} fields for {n} phases")
        _check_geometry(fields, ref, "fields")
    if real_phases is not None:
        if len(real_phases) != n:
            raise ValueError(f"got {len(real_phases)} real phases for {n} generated phases")
        _check_geometry(real_phases, ref, "real_phases")
    if real_fields is not None:
        if real_phases is None or len(real_fields) != n:
            raise ValueError("real_fields needs real_phases and one field per phase")
        _check_geometry(real_fields, ref, "real_fields")
    for masks, what in ((contours, "contours"), (real_contours, "real_contours")):
        if masks is not None:
            _check_masks(masks, n, ref.geometry.shape, what)
    labels = list(phase_labels) if phase_labels is not None else default_labels(n)
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} phase labels for {n} phases")

    canon = Canonical.from_geometry(ref.geometry)
    if canon.max_obliquity_deg > 1.0:
        log.info("volume is oblique by up to %.1f deg; shown along its nearest patient axes", canon.max_obliquity_deg)
    ct_c = [canon.volume(v.array) for v in phases]
    f_c = [None if f is None else canon.field(f.array) for f in fields] if fields is not None else None
    real_c = [canon.volume(v.array) for v in real_phases] if real_phases is not None else None
    rf_c = [None if f is None else canon.field(f.array) for f in real_fields] if real_fields is not None else None
    cont_c = [[canon.volume(np.asarray(m).astype(bool)) for m in per] for per in (contours or [])]
    rcont_c = [[canon.volume(np.asarray(m).astype(bool)) for m in per] for per in (real_contours or [])]
    all_fields = list(fields or []) + list(real_fields or [])
    mag_max = _magnitude_max(all_fields)
    shape_c = ct_c[0].shape

    written: list[Path] = []
    manifest: dict = {"frame_count": n, "phase_labels": labels, "panel_px": cfg.panel_px, "views": {},
                      "convention": orient.__doc__.split("How:")[0].strip(), "config": dataclasses.asdict(cfg),
                      "max_displacement_mm": mag_max if all_fields else 0.0, "files": []}

    def overlay(panel: Panel, fc: np.ndarray | None, view: str, idx: int) -> Panel:
        if fc is None:
            return panel
        if cfg.style == "arrows":
            panel.vectors = view_vectors(fc, view, idx)
        else:
            comps = np.stack([view_slice(fc[c], view, idx) for c in range(3)]).astype(np.float64)
            panel.magnitude = np.sqrt((comps**2).sum(0)).astype(np.float32)
        return panel

    for view in cfg.views:
        spec = VIEW_SPECS[view]
        spacing = view_spacing(canon, view)
        scales = _view_scales(cfg, canon, shape_c, view, mag_max, _inplane_max(list(f_c or []) + list(rf_c or []), view))
        slices = choose_slices(slice_count(shape_c, view), cfg.num_slices, cfg.start_from)
        manifest["views"][view] = {"slices": slices, "pixel_mm": list(spacing), "arrow_scale": scales.arrow_scale,
                                   "arrow_step_voxels": list(scales.arrow_step)}
        if fields is None:
            motion_note = ""
        elif cfg.style == "arrows":
            motion_note = (f"arrows: tissue motion since {labels[0]} (tail = where it was) drawn x{scales.arrow_scale:g};"
                           f" max |u| {mag_max:.1f} mm")
        else:
            motion_note = f"heatmap: displacement magnitude |u| in mm; max {mag_max:.1f} mm"
        common = f"HU window [{cfg.display_window_hu[0]:g}, {cfg.display_window_hu[1]:g}]; pixel {spacing[0]:.2f} x {spacing[1]:.2f} mm"
        note = "\n".join(x for x in (motion_note, common) if x)
        diff_note = f"difference map, HU window +/-{cfg.diff_window_hu:g}\npixel {spacing[0]:.2f} x {spacing[1]:.2f} mm"
        for idx in slices:
            stem = f"{name}{view}_{idx:03d}"
            motion, diff, compare = [], [], []
            base0 = view_slice(ct_c[0], view, idx).astype(np.float32)
            for k in range(n):
                img = view_slice(ct_c[k], view, idx).astype(np.float32)
                title = f"{name.rstrip('_')} {view} {idx}  {labels[k]}".strip()
                gen = Panel(img, spacing, spec.labels, contours=[view_slice(c[k], view, idx) for c in cont_c])
                overlay(gen, f_c[k] if f_c is not None else None, view, idx)
                motion.append(render_frame([gen], scales, cfg.panel_px, title, note))
                if cfg.difference:
                    d = Panel(img - base0, spacing, spec.labels, title=f"{labels[k]} - {labels[0]}", kind="diff")
                    diff.append(render_frame([d], scales, cfg.panel_px, title, diff_note))
                if real_c is not None:
                    rimg = view_slice(real_c[k], view, idx).astype(np.float32)
                    real = Panel(rimg, spacing, spec.labels, title="real",
                                 contours=[view_slice(c[k], view, idx) for c in rcont_c])
                    overlay(real, rf_c[k] if rf_c is not None else None, view, idx)
                    g2 = dataclasses.replace(gen, title="generated")
                    dd = Panel(img - rimg, spacing, spec.labels, title="generated - real", kind="diff")
                    compare.append(render_frame([real, g2, dd], scales, cfg.panel_px, title, note))
            for kind, frames in (("motion", motion), ("diff", diff), ("compare", compare)):
                if not frames:
                    continue
                path = write_gif(out / f"{stem}_{kind}.gif", frames, cfg.fps)
                written.append(path)
                manifest["files"].append({"file": path.name, "view": view, "slice": idx, "kind": kind,
                                          "frame_size_hw": list(frames[0].shape[:2])})
                if cfg.mp4:
                    mp4 = write_mp4(out / f"{stem}_{kind}.mp4", frames, cfg.fps)
                    if mp4 is not None:
                        written.append(mp4)
                        manifest["files"].append({"file": mp4.name, "view": view, "slice": idx, "kind": kind})
    man = out / f"{name}render.json"
    write_json(man, manifest)
    written.append(man)
    log.info("wrote %d GIF/MP4 files to %s", len(written) - 1, out)
    return written
