"""From a static CT to a breathing 4D-CT: generate motion, warp, export.

The motion model works at its own shape (default 50x256x256); the CT is resampled to it with
the field of view kept (:meth:`Geometry.resized`), motion is generated there as pull fields of
every phase relative to the input (the reference, phase 00), and the fields (in mm, physical)
are resampled back to the input's native grid, where the native CT is warped.  So outputs keep
the input's size, spacing, origin and direction.  A cycle is never a sum of fields: models
predict each phase relative to the reference, or their consecutive steps are composed
(:func:`respmotion.core.warp.compose`).

Outputs in ``out/sample_XX/``: ``phase_XX.nii.gz`` and ``.mha`` (HU), ``ct_4d.nii.gz``
(x, y, z, phase), ``dvf_XX.mha`` and ``dvf_XX.nii.gz`` (ITK displacement fields, LPS mm, pull:
resample the input with them in 3D Slicer to get phase XX), and ``summary.json`` in ``out``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..core.ops import resample_field, resample_volume, warp_volume
from ..core.types import DisplacementField, Volume
from ..io.atomic import atomic_path, write_json
from ..io.layout import PHASES
from ..io.volumes import save_field, save_volume


class MotionModel(Protocol):
    """Anything that turns a CT (at ``shape``) into pull fields of every phase vs the reference."""

    shape: tuple[int, int, int]

    def generate(self, ct: Volume, samples: int, seed: int) -> list[dict[int, DisplacementField]]:
        """``samples`` cycles; each maps phase percent -> field on ``ct.geometry`` (mm, pull)."""


@dataclass
class FixedMotion:
    """A motion "model" that returns given fields (ground truth, registration, a mean field).

    Fields are resampled to the CT's geometry; used for tests, baselines and the phantom.
    """

    fields: dict[int, DisplacementField]
    shape: tuple[int, int, int] = (50, 256, 256)

    def generate(self, ct: Volume, samples: int, seed: int) -> list[dict[int, DisplacementField]]:
        out = {}
        for k, f in self.fields.items():
            g = f if f.geometry.shape == ct.geometry.shape else resample_field(f, ct.geometry.shape)
            out[k] = DisplacementField(g.array, ct.geometry, dict(f.meta))
        return [out for _ in range(samples)]


@dataclass
class SynthesisOptions:
    samples: int = 1
    seed: int = 0
    amplitude: float = 1.0  # motion scale (invertible: velocity-field scaling), 1 = the model's motion
    excursion_mm: float | None = None  # target diaphragm SI excursion (needs a lung mask); overrides amplitude
    trace: str = ""  # CSV (time, amplitude) breathing trace; writes a sequence instead of 10 phases
    formats: tuple[str, ...] = ("nii.gz", "mha")
    dicom: bool = False
    structures: tuple[str, ...] = ()  # RTSTRUCT file and/or mask files (NIfTI/MHA/npy) on the input CT
    structure_names: tuple[str, ...] = ()  # names to take from the RTSTRUCT (empty = all)
    render: bool = True
    render_style: str = "arrows"
    fps: float = 2.0


@dataclass
class SynthesisResult:
    out: Path
    summary: dict = field(default_factory=dict)
    cycles: list[dict[int, DisplacementField]] = field(default_factory=list)  # native grid
    phases: list[dict[int, Volume]] = field(default_factory=list)
    dicom: list[dict] = field(default_factory=list)  # write_dicom_4dct results (SeriesRef per phase)


def _write_4d_nifti(path: Path, phases: dict[int, Volume]) -> None:
    import nibabel as nib

    from ..io.volumes import _nifti_affine

    ref = next(iter(phases.values()))
    data = np.stack([phases[k].array.transpose(2, 1, 0) for k in sorted(phases)], axis=-1).astype(np.int16)
    img = nib.Nifti1Image(data, _nifti_affine(ref.geometry))
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _field_stats(f: DisplacementField) -> dict:
    from ..core.ops import jacobian_determinant

    mag = f.magnitude()
    det = jacobian_determinant(f)
    return {"mean_mm": float(mag.mean()), "max_mm": float(mag.max()), "folding_percent": float((det <= 0).mean() * 100),
            "min_jacobian": float(det.min())}


def synthesize(ct: Volume, model: MotionModel, out: str | Path, opts: SynthesisOptions,
               lung_mask: np.ndarray | None = None) -> SynthesisResult:
    """Generate ``opts.samples`` breathing cycles for ``ct`` (native grid) and write them to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_ct = ct if ct.geometry.shape == tuple(model.shape) else resample_volume(ct, model.shape)
    cycles_model = model.generate(model_ct, opts.samples, opts.seed)
    t_gen = time.perf_counter() - t0
    summary: dict = {"input": ct.meta.get("source", ""), "input_geometry": ct.geometry.to_dict(),
                     "model_shape": list(model.shape), "samples": [], "convention":
                     "dvf_XX: pull field, LPS mm; phase_XX(p) = input(p + u(p))", "seconds_generate": t_gen}
    if opts.amplitude != 1.0 or opts.excursion_mm is not None:
        from .breathing import amplitude_for_excursion, scale_motion

        factor = opts.amplitude
        if opts.excursion_mm is not None:
            if lung_mask is None:
                raise ValueError("--excursion-mm needs a lung mask of the input CT")
            factor = amplitude_for_excursion(cycles_model[0], lung_mask, opts.excursion_mm)
        cycles_model = [scale_motion(c, factor) for c in cycles_model]
        summary["amplitude_factor"] = factor
    result = SynthesisResult(out, summary)
    t_write = time.perf_counter()
    for i, cyc in enumerate(cycles_model):
        sdir = out / f"sample_{i:02d}"
        native = {k: (f if f.geometry.same_as(ct.geometry) else
                      DisplacementField(resample_field(f, ct.geometry.shape).array, ct.geometry, f.meta))
                  for k, f in cyc.items()}
        phases = {k: warp_volume(ct, native[k]) for k in sorted(native)}
        for k in sorted(phases):
            name = f"phase_{k:02d}"
            for fmt in opts.formats:
                save_volume(phases[k], sdir / f"{name}.{fmt}")
                save_field(native[k], sdir / f"dvf_{k:02d}.{fmt}")
        _write_4d_nifti(sdir / "ct_4d.nii.gz", phases)
        rec = {"dir": str(sdir), "phases": {f"{k:02d}": _field_stats(native[k]) for k in sorted(native)}}
        if opts.dicom:
            from ..io.dicom_export import write_dicom_4dct

            template = Path(ct.meta["source"]) if Path(ct.meta.get("source", "")).is_dir() else None
            exported = write_dicom_4dct(phases, sdir / "dicom", template)
            result.dicom.append(exported)
            rec["dicom"] = {k: v for k, v in exported.items() if k != "series"}
            rec["dicom"]["series"] = {f"{k:02d}": ref.to_dict() for k, ref in exported["series"].items()}
        summary["samples"].append(rec)
        result.cycles.append(native)
        result.phases.append(phases)
    summary["seconds_warp_and_write"] = time.perf_counter() - t_write
    summary["seconds_total"] = time.perf_counter() - t0
    write_json(out / "summary.json", summary)
    return result


def phases_of(cycle: dict[int, DisplacementField]) -> list[int]:
    return [k for k in PHASES if k in cycle]


def render_result(result: SynthesisResult, ct: Volume, style: str = "arrows", fps: float = 2.0,
                  contours: Sequence[Sequence[np.ndarray]] | None = None, num_slices: int = 1) -> list[Path]:
    """GIFs of the first sample's cycle (axial, coronal, sagittal) in ``out/gifs``."""
    from ..viz.cycle import render_cycle

    cyc = result.cycles[0]
    ks = phases_of(cyc)
    return render_cycle(result.out / "gifs", [result.phases[0][k] for k in ks], [cyc[k] for k in ks],
                        contours=contours, style=style, fps=fps, num_slices=num_slices)
