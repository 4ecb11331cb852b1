"""From a static CT to a breathing 4D-CT: generate motion, warp, export -- one phase at a time (:func:`synthesize`).

The motion model works at its own shape (default 50x256x256); the CT is resampled to it with
the field of view kept (:meth:`Geometry.resized`), motion is generated there as pull fields of
every phase relative to the input (the reference, phase 00).  The native CT is then warped one
phase at a time, in slabs of ``slab`` slices, through the model-grid field
(:func:`respmotion.synthesis.native.warp_native`), with the lung occupancies and any structure
occupancies as extra channels.  So memory holds the native CT, one phase and the small model-grid
fields, never a native-size field per phase: it does not grow with the number of phases.  Outputs keep
the input's size, spacing, origin and direction.  A cycle is never a sum of fields: models predict each
phase relative to the reference, or their consecutive steps are composed (:func:`respmotion.core.warp.compose`).

Outputs in ``out/sample_XX/`` by ``formats`` (:data:`FORMATS`; default :data:`DEFAULT_FORMATS`; the files:
:mod:`respmotion.synthesis.writer`).  ``summary.json`` in ``out`` records the motion (sampler, steps), seed,
formats, per-phase field statistics (on the field's grid) and lung measures (:mod:`.sanity`).  Lung HU follow
the motion's volume change (``intensity="mass"``, docs/motion.md); an input at another breathing state is
re-anchored (:mod:`.anchor`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping, Protocol, Sequence

import numpy as np
import torch

from ..core.ops import resample_array, resample_field, resample_volume, warp_volume
from ..core.types import DisplacementField, Volume
from ..io.atomic import write_json
from ..io.layout import PHASES
from .anchor import check_input_phase
from .native import SLAB, warp_native
from .writer import CycleWriter

#: output formats: nifti/mha (phases int16 HU + float32 fields), dicom (CT series + RTSTRUCT), nifti4d
FORMATS = ("nifti", "mha", "dicom", "nifti4d")
#: one compressed copy of every phase and field, readable by 3D Slicer, ITK, nibabel and our loaders;
#: DICOM (1,410 files for 10 phases of 141 slices) and the others are asked for by name.
DEFAULT_FORMATS = ("nifti",)
#: lung intensities: "mass" (density follows the motion's volume change, mass kept; the default) or "warp"
INTENSITIES = ("mass", "warp")
#: channels every phase pulls (:attr:`SynthesisResult.channels`): HU, lung and lung-interior occupancies, then
#: the structures
HU_CHANNEL, LUNG_CHANNEL, INTERIOR_CHANNEL, FIRST_STRUCTURE_CHANNEL = 0, 1, 2, 3


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
    #: what every phase pulled, ``(C, Z, Y, X)`` float32 on the CT's grid: HU, the input's lung and lung-interior
    #: occupancies (the mask the intensities and measures used), then the structures (:data:`LUNG_CHANNEL` ...)
    channels: torch.Tensor | None = None


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
    result = SynthesisResult(out, summary, cycles_model, model_ct, reference_cycle=cycles_model[0])
    summary["input_phase"], summary["intensity"] = input_phase, opts.intensity
    if input_phase != 0:
        from .anchor import reanchor_cycles

        result.cycles, result.anchors, summary["reanchoring"] = reanchor_cycles(cycles_model, input_phase)
        cycles_model = result.cycles
    t_write = time.perf_counter()
    names = list(structures)
    lungs = LungRecord(ct, lung_mask)
    summary["lung_input"] = lungs.input
    result.channels = chans = torch.from_numpy(np.stack(
        [ct.array.astype(np.float32), lungs.lung, lungs.interior]
        + [np.asarray(structures[n], dtype=np.float32) for n in names]))
    for i, cyc in enumerate(cycles_model):
        ks = sorted(cyc)
        writer = CycleWriter(out / f"sample_{i:02d}", ct, ks, formats, names, template)
        try:
            for k in ks:
                warped = warp_native(chans, cyc[k], ct.geometry, opts.slab,
                                     mass_weight=LUNG_CHANNEL if opts.intensity == "mass" else None)
                writer.phase(k, warped[HU_CHANNEL], cyc[k],
                             {n: warped[FIRST_STRUCTURE_CHANNEL + j] for j, n in enumerate(names)},
                             lung=lungs.phase(warped[HU_CHANNEL], warped[LUNG_CHANNEL], warped[INTERIOR_CHANNEL]))
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
