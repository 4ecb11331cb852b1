"""From a static CT to a breathing 4D-CT: generate motion, warp, export -- one phase at a time.

The motion model works at its own shape (default 50x256x256); the CT is resampled to it with
the field of view kept (:meth:`Geometry.resized`), motion is generated there as pull fields of
every phase relative to the input (the reference, phase 00).  The native CT is then warped one
phase at a time and, within a phase, in slabs of ``slab`` slices: each slab's field is the
model-grid field interpolated trilinearly onto the native voxels (:class:`NativeField`, the same
numbers as :func:`respmotion.core.ops.resample_field` of the whole field), and the CT (with any
structure occupancies as extra channels) is pulled there.  So memory holds the native CT, one
phase and the small model-grid fields, never a native-size field per phase: it does not grow with
the number of phases.  Outputs keep the input's size, spacing, origin and direction.  A cycle is
never a sum of fields: models predict each phase relative to the reference, or their consecutive
steps are composed (:func:`respmotion.core.warp.compose`).

Outputs in ``out/sample_XX/`` by ``formats`` (:data:`FORMATS`; default :data:`DEFAULT_FORMATS`):

* ``nifti``: ``phase_XX.nii.gz`` (int16 HU) and ``dvf_XX.nii.gz``; ``mha``: the same as ``.mha``;
* ``dicom``: ``dicom/phase_XX/`` CT series in the input's study (DICOM input) and, with structures,
  ``dicom/rtstruct_phase_XX.dcm`` (every structure and its ITV on that phase);
* ``nifti4d``: ``ct_4d.nii.gz`` (x, y, z, phase; int16; holds every phase in memory while built).

Fields ``dvf_XX`` are float32 ITK displacement fields (LPS mm, pull) on the grid the motion model
made them on (the model grid, covering the CT's field of view): ITK's
``DisplacementFieldTransform`` and 3D Slicer interpolate them linearly at the CT's voxels, exactly
as this pipeline does, so resampling the input CT with them gives phase XX.  Structures:
``structures/<name>_XX.nii.gz`` and ``<name>_ITV.nii.gz`` (uint8) with ``nifti``.  ``summary.json``
in ``out`` records the motion (sampler, steps), seed, formats, per-phase field statistics (on the
field's grid) and lung measures (:mod:`.sanity`).  Lung HU follow the motion's volume change
(``intensity="mass"``, docs/motion.md); an input at another breathing state is re-anchored (:mod:`.anchor`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping, Protocol, Sequence

import numpy as np
import torch

from ..core import warp as W
from ..core.geometry import Geometry
from ..core.ops import resample_array, resample_field, resample_volume, warp_volume
from ..core.types import DisplacementField, Volume
from ..io.atomic import atomic_path, write_json
from ..io.layout import PHASES
from ..io.volumes import save_field, save_volume
from .anchor import check_input_phase

#: output formats: nifti/mha (phases int16 HU + float32 fields), dicom (CT series + RTSTRUCT), nifti4d
FORMATS = ("nifti", "mha", "dicom", "nifti4d")
#: one compressed copy of every phase and field, readable by 3D Slicer, ITK, nibabel and our loaders;
#: DICOM (1,410 files for 10 phases of 141 slices) and the others are asked for by name.
DEFAULT_FORMATS = ("nifti",)
VOLUME_SUFFIX = {"nifti": "nii.gz", "mha": "mha"}
SLAB = 16  # native slices warped at once
#: lung intensities: "mass" (density follows the motion's volume change, mass kept; the default) or "warp"
INTENSITIES = ("mass", "warp")


class MotionModel(Protocol):
    """Anything that turns a CT (at ``shape``) into pull fields of every phase vs the reference."""

    shape: tuple[int, int, int]
    #: False: ``generate`` gets the CT already resampled to ``shape`` (anti-aliased, :func:`resample_volume`);
    #: True: it gets the native CT and resamples it its own way (research-code models: trilinear, as trained)
    #: and returns fields on ``ct.geometry.resized(shape)``.
    resamples_input: bool

    def generate(self, ct: Volume, samples: int, seed: int) -> list[dict[int, DisplacementField]]:
        """``samples`` cycles; each maps phase percent -> field on ``ct.geometry`` (mm, pull)."""


@dataclass
class FixedMotion:
    """A motion "model" that returns given fields (ground truth, registration, a mean field).

    Fields are resampled to the CT's geometry; used for tests, baselines and the phantom.
    """

    fields: dict[int, DisplacementField]
    shape: tuple[int, int, int] = (50, 256, 256)
    resamples_input: ClassVar[bool] = False

    def generate(self, ct: Volume, samples: int, seed: int) -> list[dict[int, DisplacementField]]:
        out = {}
        for k, f in self.fields.items():
            g = f if f.geometry.shape == ct.geometry.shape else resample_field(f, ct.geometry.shape)
            out[k] = DisplacementField(g.array, ct.geometry, dict(f.meta))
        return [out for _ in range(samples)]

    def describe(self) -> dict:
        return {"kind": "fixed fields", "model_shape": list(self.shape)}


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` without repeats, each one of :data:`FORMATS`; a one-line ``ValueError`` otherwise."""
    out = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise ValueError(f"--formats: {bad[0]!r} is not one of {', '.join(FORMATS)}")
    if not out:
        raise ValueError(f"--formats {','.join(formats)!r}: no format given (choose from {', '.join(FORMATS)})")
    return out


@dataclass
class SynthesisOptions:
    """What :func:`synthesize` makes of a CT (the ``options`` section of
    :class:`respmotion.synthesis.run.SynthesizeConfig`).  Checked once, when made: ``formats`` without repeats
    (:func:`check_formats`), ``input_phase`` a phase percent or ``"mid"`` (:func:`~.anchor.check_input_phase`),
    ``intensity`` one of :data:`INTENSITIES`; a one-line ``ValueError`` naming the flag otherwise."""

    samples: int = 1
    seed: int = 0
    amplitude: float = 1.0  # motion scale (invertible: velocity-field scaling), 1 = the model's motion
    excursion_mm: float | None = None  # target diaphragm SI excursion (needs a lung mask); overrides amplitude
    # target mean superior lung displacement at 50 %, mm (needs a lung mask; each sample scaled to it): the
    # breathing amplitude as a user knows it, e.g. the mean SI landmark motion of a 4D-CT; overrides the others
    si_amplitude_mm: float | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS  # FORMATS
    slab: int = SLAB  # native slices warped at once (memory, not results)
    intensity: str = "mass"  # INTENSITIES: lung density follows the motion (mass kept) or is only warped
    input_phase: int | str = 0  # breathing state of the input: a phase percent or "mid" (synthesis.anchor)

    def __post_init__(self) -> None:
        self.formats = check_formats(self.formats)
        self.input_phase = check_input_phase(self.input_phase)
        if self.intensity not in INTENSITIES:
            raise ValueError(f"--intensity: {self.intensity!r} is not one of {', '.join(INTENSITIES)}")


@dataclass
class SynthesisResult:
    """``cycles``: each sample's fields on the model grid (small); ``model_ct``: the CT on that grid."""

    out: Path
    summary: dict = field(default_factory=dict)
    cycles: list[dict[int, DisplacementField]] = field(default_factory=list)
    model_ct: Volume | None = None
    dicom: list[dict] = field(default_factory=list)  # DicomCycleWriter results (SeriesRef per phase)
    anchors: list[DisplacementField] = field(default_factory=list)  # per sample, with input_phase != 0
    reference_cycle: dict[int, DisplacementField] | None = None  # sample 0 relative to phase 00 (model grid)
    lung: np.ndarray | None = None  # the input's lung mask (native grid) the intensities and measures used


class NativeField:
    """A pull field on a grid covering ``native``'s field of view, evaluated on native slabs.

    The values are those of :func:`respmotion.core.ops.resample_field` (trilinear, voxel edges kept,
    Gaussian pre-filter along an axis the native grid is coarser in), computed separably: the
    field is brought to the native in-plane size once (``(3, Zm, Y, X)``), then each slab is a
    linear blend of two of those planes.  ``slab(z0, z1)`` -> ``(3, z1 - z0, Y, X)`` float32 mm.
    """

    def __init__(self, f: DisplacementField, native: Geometry) -> None:
        g = f.geometry
        self.identity = g.same_as(native)
        if self.identity:
            self.planes = np.asarray(f.array, dtype=np.float32)
            return
        if not native.resized(g.shape).same_as(g, tol=1e-3):
            raise ValueError(f"field grid {g.shape} / {g.spacing} mm does not cover the CT's field of view "
                             f"({native.shape} / {native.spacing} mm)")
        nz, mz = native.shape[0], g.shape[0]
        planes = resample_array(f.array, (mz,) + tuple(native.shape[1:]), 1)
        if mz > nz:  # the whole-field resampling smooths along z before shrinking it; so do we
            from scipy.ndimage import gaussian_filter1d

            planes = gaussian_filter1d(planes, (mz / nz - 1.0) / 2.0, axis=1, mode="nearest")
        self.planes = planes
        # continuous model-grid slice of every native slice centre (through the geometries), clamped like torch
        idx = np.zeros((nz, 3))
        idx[:, 0] = np.arange(nz)
        c = np.clip(g.world_to_index(native.index_to_world(idx))[:, 0], 0.0, mz - 1)
        self.lo = np.minimum(np.floor(c).astype(int), mz - 1)
        self.hi = np.minimum(self.lo + 1, mz - 1)
        self.w = (c - self.lo).astype(np.float32)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        if self.identity:
            return self.planes[:, z0:z1]
        w = self.w[z0:z1, None, None]
        return self.planes[:, self.lo[z0:z1]] * (1.0 - w) + self.planes[:, self.hi[z0:z1]] * w


def warp_native(channels: torch.Tensor, f: DisplacementField, native: Geometry, slab: int = SLAB,
                mass_weight: int | None = None) -> np.ndarray:
    """Pull ``channels`` ``(C, Z, Y, X)`` (float32, on ``native``) through ``f`` slab by slab.

    ``f`` is on ``native`` or on a grid covering its field of view (:class:`NativeField`).  Same
    values as :func:`respmotion.core.ops.warp_volume` with the field resampled to ``native``
    (trilinear, border padding); returns ``(C, Z, Y, X)`` float32.  ``mass_weight``: index of a
    pulled channel (the lung occupancy) weighting :func:`respmotion.core.warp.mass_preserving_hu` on
    channel 0 (HU), with the Jacobian determinant of the very field sampled here (the native voxels'
    field, central differences across slab borders: the numbers of the whole volume's determinant).
    """
    nf = NativeField(f, native)
    nz, ny, nx = native.shape
    out = np.empty(tuple(channels.shape), dtype=np.float32)
    yy, xx = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                            indexing="ij")
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        # with the density law, one slice beyond the slab for the Jacobian's central differences; the field of
        # those rows is built once (NativeField.slab is row by row: the slab's rows are the same numbers)
        h0, h1 = (max(0, z0 - 1), min(nz, z1 + 1)) if mass_weight is not None else (z0, z1)
        u = torch.from_numpy(np.ascontiguousarray(nf.slab(h0, h1)))[None]  # (1, 3, h1 - h0, Y, X) mm
        vox = W.mm_to_voxels(u[:, :, z0 - h0:z1 - h0].contiguous(), native.spacing)[0]
        vox[0] += torch.arange(z0, z1, dtype=torch.float32)[:, None, None]
        vox[1] += yy
        vox[2] += xx
        vals = W.sample_points(channels, vox.reshape(3, -1).T).T.reshape(-1, z1 - z0, ny, nx)  # (C, z, y, x)
        if mass_weight is not None:
            det = W.jacobian_determinant(u, native.spacing, dtype=torch.float32)[0, z0 - h0:z1 - h0]
            vals[0] = W.mass_preserving_hu(vals[0], det, vals[mass_weight])
        out[:, z0:z1] = vals.numpy()
    return out


def _field_stats(f: DisplacementField) -> dict:
    from ..core.ops import jacobian_determinant

    mag = f.magnitude()
    det = jacobian_determinant(f)
    return {"mean_mm": float(mag.mean()), "max_mm": float(mag.max()), "folding_percent": float((det <= 0).mean() * 100),
            "min_jacobian": float(det.min())}


def hu_int16(array: np.ndarray) -> np.ndarray:
    """HU rounded to the nearest integer (half to even) and clipped to int16 (what the files store)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).round().clamp_(-32768, 32767).to(torch.int16).numpy()


class CycleWriter:
    """Writes one sample's phases as they come (``phase``), then the ITVs and RTSTRUCTs (``finish``).

    Holds per structure only its ITV and its traced contours per phase; ``nifti4d`` holds the
    int16 phases until the end.
    """

    def __init__(self, sdir: Path, ct: Volume, phases: list[int], formats: tuple[str, ...],
                 structures: Sequence[str], template: str | None) -> None:
        from .contours import MotionAccumulator

        self.sdir, self.geometry, self.formats, self.phases = sdir, ct.geometry, formats, phases
        self.names = list(structures)
        self.motion = {n: MotionAccumulator(ct.geometry) for n in self.names}
        self.contours: dict[int, dict[str, list]] = {}
        self.stack: np.ndarray | None = None
        self.dicom = None
        self.dicom_result: dict | None = None  # DicomCycleWriter.finish()'s result
        if "dicom" in formats:
            from ..io.dicom_export import DicomCycleWriter

            self.dicom = DicomCycleWriter(sdir / "dicom", ct.geometry, phases, template, overwrite=True)
        self.record: dict = {"dir": str(sdir), "phases": {}}

    def phase(self, k: int, hu: np.ndarray, field_: DisplacementField, occupancy: Mapping[str, np.ndarray],
              lung: dict | None = None) -> None:
        """Phase ``k``: HU ``(z, y, x)`` float32 on the CT grid, its field (model grid), structure occupancies,
        its lung measures (:class:`respmotion.synthesis.sanity.LungRecord`)."""
        stored = hu_int16(hu)
        vol = Volume(stored, self.geometry)
        for fmt, suffix in VOLUME_SUFFIX.items():
            if fmt in self.formats:
                save_volume(vol, self.sdir / f"phase_{k:02d}.{suffix}")
                save_field(field_, self.sdir / f"dvf_{k:02d}.{suffix}")
        if "nifti4d" in self.formats:
            if self.stack is None:
                self.stack = np.empty(self.geometry.shape[::-1] + (len(self.phases),), dtype=np.int16)
            self.stack[..., self.phases.index(k)] = stored.transpose(2, 1, 0)
        if self.dicom is not None:
            self.dicom.write(k, vol)
        self.record["phases"][f"{k:02d}"] = _field_stats(field_)
        if lung is not None:
            self.record["phases"][f"{k:02d}"]["lung"] = lung
        if self.names:
            from ..io.rtstruct import mask_contours

            self.contours[k] = {}
            for name in self.names:
                occ = np.clip(occupancy[name], 0.0, 1.0)
                self.motion[name].add(k, occ)
                binary = (occ >= 0.5).astype(np.uint8)
                if "nifti" in self.formats:
                    save_volume(Volume(binary, self.geometry), self.sdir / "structures" / f"{name}_{k:02d}.nii.gz")
                if self.dicom is not None:
                    self.contours[k][name] = mask_contours(binary)

    def finish(self) -> dict:
        """The 4D NIfTI, ITVs, DICOM series moved into place and one RTSTRUCT per phase; the summary record."""
        if self.stack is not None:
            _write_4d_nifti(self.sdir / "ct_4d.nii.gz", self.stack, self.geometry)
        if self.names:
            from .contours import motion_summary

            motions = {n: acc.result() for n, acc in self.motion.items()}
            self.record["structures"] = {n: motion_summary(m) for n, m in motions.items()}
            if "nifti" in self.formats:
                for n, m in motions.items():
                    save_volume(Volume(m["itv"], self.geometry), self.sdir / "structures" / f"{n}_ITV.nii.gz")
        if self.dicom is not None:
            exported = self.dicom.finish()
            self.record["dicom"] = {k: v for k, v in exported.items() if k != "series"}
            self.record["dicom"]["series"] = {f"{k:02d}": ref.to_dict() for k, ref in exported["series"].items()}
            if self.names:
                from ..io.rtstruct import mask_contours, write_rtstruct_contours

                itv = {f"{n}_ITV": mask_contours(m["itv"]) for n, m in motions.items()}
                self.record["dicom"]["rtstruct"] = []
                for k, ref in exported["series"].items():
                    path = self.sdir / "dicom" / f"rtstruct_phase_{k:02d}.dcm"
                    write_rtstruct_contours({**self.contours[k], **itv}, ref, path,
                                            description=f"respmotion structures, Gated, {k:02d}%")
                    self.record["dicom"]["rtstruct"].append(str(path))
            self.dicom_result = exported
        return self.record

    def abort(self) -> None:
        if self.dicom is not None:
            self.dicom.abort()


def _write_4d_nifti(path: Path, stack_xyzp: np.ndarray, geometry: Geometry) -> None:
    import nibabel as nib

    from ..io.volumes import nifti_affine

    img = nib.Nifti1Image(stack_xyzp, nifti_affine(geometry))
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def synthesize(ct: Volume, model: MotionModel, out: str | Path, opts: SynthesisOptions,
               lung_mask: np.ndarray | None = None,
               structures: Mapping[str, np.ndarray] | None = None, template: str | None = None) -> SynthesisResult:
    """Generate ``opts.samples`` breathing cycles for ``ct`` (native grid) and write them to ``out``.

    ``structures``: name -> binary or occupancy mask ``(z, y, x)`` on the CT, carried through every
    phase (pulled with the phase's field, :mod:`respmotion.synthesis.contours`).  ``lung_mask``: the
    input's lungs ``(z, y, x)`` (found with :func:`respmotion.anatomy.lung_mask` when not given): the
    region whose density follows the motion (``opts.intensity == "mass"``) and that the per-phase
    measures (:mod:`respmotion.synthesis.sanity`) are taken on.  ``opts.input_phase``: the input's
    breathing state; the cycle is re-anchored on it (:mod:`respmotion.synthesis.anchor`).  ``template``: the
    input CT's DICOM folder (the DICOM phases join its study).
    """
    from .sanity import LungRecord

    formats, input_phase = opts.formats, opts.input_phase
    if lung_mask is None:
        from ..anatomy import lung_mask as find_lungs

        lung_mask = find_lungs(ct.array)
    if tuple(np.shape(lung_mask)) != ct.geometry.shape:
        raise ValueError(f"lung mask shape {np.shape(lung_mask)} differs from the CT's {ct.geometry.shape}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    structures = dict(structures or {})
    for name, m in structures.items():
        if tuple(np.shape(m)) != ct.geometry.shape:
            raise ValueError(f"structure {name!r}: mask shape {np.shape(m)} differs from the CT's {ct.geometry.shape}")
    t0 = time.perf_counter()
    model_ct = ct if ct.geometry.shape == tuple(model.shape) else resample_volume(ct, model.shape)
    cycles_model = model.generate(ct if model.resamples_input else model_ct, opts.samples, opts.seed)
    t_gen = time.perf_counter() - t0
    describe = getattr(model, "describe", None)
    summary: dict = {"input": ct.meta.get("source", ""), "input_geometry": ct.geometry.to_dict(),
                     "model_shape": list(model.shape), "motion": describe() if describe else {},
                     "seed": opts.seed, "formats": list(formats), "samples": [],
                     "convention": "dvf_XX: pull field, LPS mm, on the model grid; phase_XX(p) = input(p + u(p))",
                     "seconds_generate": t_gen}
    if opts.amplitude != 1.0 or opts.excursion_mm is not None or opts.si_amplitude_mm is not None:
        from .breathing import amplitude_for_excursion, scale_motion, scale_to_superior_mean

        factors = [opts.amplitude] * len(cycles_model)
        if opts.excursion_mm is not None or opts.si_amplitude_mm is not None:
            model_lung = lung_mask if lung_mask.shape == tuple(model.shape) else \
                resample_array(lung_mask.astype(np.float32), model.shape) >= 0.5
            if opts.si_amplitude_mm is None:  # --si-amplitude-mm overrides --excursion-mm
                factors = [amplitude_for_excursion(cycles_model[0], model_lung, opts.excursion_mm)] * len(factors)
        if opts.si_amplitude_mm is not None:
            cycles_model, factors = scale_to_superior_mean(cycles_model, model_lung, opts.si_amplitude_mm)
        else:
            cycles_model = [scale_motion(c, f) for c, f in zip(cycles_model, factors)]
        summary["amplitude_factor"] = factors[0]
        summary["amplitude_factors"] = factors
        if opts.si_amplitude_mm is not None:
            summary["si_amplitude_mm"] = opts.si_amplitude_mm
    result = SynthesisResult(out, summary, cycles_model, model_ct, reference_cycle=cycles_model[0], lung=lung_mask)
    summary["input_phase"], summary["intensity"] = input_phase, opts.intensity
    if input_phase != 0:
        from .anchor import anchor_field, reanchor

        anchors = [anchor_field(c, input_phase) for c in cycles_model]
        result.anchors = [a for a, _ in anchors]
        summary["reanchoring"] = [rec for _, rec in anchors]
        result.cycles = cycles_model = [reanchor(c, a, input_phase) for c, (a, _) in zip(cycles_model, anchors)]
    t_write = time.perf_counter()
    names = list(structures)
    lungs = LungRecord(ct, lung_mask)
    summary["lung_input"] = lungs.input
    chans = torch.from_numpy(np.stack([ct.array.astype(np.float32)]
                                      + [np.asarray(structures[n], dtype=np.float32) for n in names]
                                      + [lungs.lung, lungs.interior]))
    il = 1 + len(names)  # channels il, il + 1: lung and lung interior occupancies
    for i, cyc in enumerate(cycles_model):
        ks = sorted(cyc)
        writer = CycleWriter(out / f"sample_{i:02d}", ct, ks, formats, names, template)
        try:
            for k in ks:
                warped = warp_native(chans, cyc[k], ct.geometry, opts.slab,
                                     mass_weight=il if opts.intensity == "mass" else None)
                writer.phase(k, warped[0], cyc[k], {n: warped[1 + j] for j, n in enumerate(names)},
                             lung=lungs.phase(warped[0], warped[il], warped[il + 1]))
                del warped
            summary["samples"].append(writer.finish())
        except BaseException:
            writer.abort()
            raise
        if writer.dicom_result is not None:
            result.dicom.append(writer.dicom_result)
    summary["seconds_warp_and_write"] = time.perf_counter() - t_write
    summary["seconds_total"] = time.perf_counter() - t0
    write_json(out / "summary.json", summary)
    return result


def phases_of(cycle: dict[int, DisplacementField]) -> list[int]:
    return [k for k in PHASES if k in cycle]


def render_result(result: SynthesisResult, style: str = "arrows", fps: float = 2.0,
                  structures: Mapping[str, np.ndarray] | None = None, num_slices: int = 1) -> list[Path]:
    """GIFs of the first sample's cycle (axial, coronal, sagittal) in ``out/gifs``.

    Drawn on the motion model's grid (the CT resampled there and pulled by the model-grid fields:
    previews cost seconds and no native-size copies); ``structures`` (masks on the native CT) are
    resampled there and outlined on every phase.
    """
    from ..viz.cycle import render_cycle

    cyc = result.cycles[0]
    ks = phases_of(cyc)
    ref = result.model_ct
    contours = None
    if structures:
        from .contours import propagate_structure

        contours = []
        for m in structures.values():
            small = m if m.shape == ref.geometry.shape else \
                resample_array(np.asarray(m, np.float32), ref.geometry.shape)
            by_phase = propagate_structure(np.clip(small, 0.0, 1.0), {k: cyc[k] for k in ks})
            contours.append([by_phase[k] for k in ks])
    return render_cycle(result.out / "gifs", [warp_volume(ref, cyc[k]) for k in ks], [cyc[k] for k in ks],
                        contours=contours, style=style, fps=fps, num_slices=num_slices)
