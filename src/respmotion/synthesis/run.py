"""The ``synthesize`` stage end to end: input CT -> motion -> 4D-CT, structures, DICOM, GIFs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..core.types import Volume
from ..io.atomic import read_npy, write_json
from ..io.layout import PHASES, StudyDir
from ..runtime import check_precision, resolve_device
from .breathing import BreathingTrace
from .pipeline import FixedMotion, MotionModel, SynthesisOptions, SynthesisResult, render_result, synthesize

#: the synthesis settings of :class:`SynthesisOptions`, top-level keys of configs saved before they were nested
_OPTIONS = ("samples", "seed", "amplitude", "excursion_mm", "si_amplitude_mm", "formats", "intensity", "input_phase")


@dataclass
class SynthesizeConfig:
    """Settings of ``respmotion synthesize`` (what each does and when to change it: docs/synthesis.md): input,
    output, motion model and its sampler, device and threads, structures, trace and GIFs; what is made of the CT
    (cycles, seed, amplitude, formats, intensities, input phase) is the nested ``options``
    (:class:`~.pipeline.SynthesisOptions`, checked when made).  ``dicom`` adds ``dicom`` to ``options.formats``.
    Sampler settings None: the model's own (:func:`respmotion.diffusion.config.choose_sampler` checks them)."""

    ct: str = ""
    out: str = "out/synthesis"
    model: str = ""  # "" or "default": the DIR-Lab population prior; a bundle folder; "seed:DIR"; "gt" (phantom study)
    sampler: str | None = None  # override the bundle's sampler (diffusion.config.SAMPLER_CHOICES)
    steps: int | None = None  # number of sampling steps (None: the sampler's default)
    delta_t: int | None = None  # research-code timestep stride: num_train_timesteps / delta_t steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N (respmotion.runtime.resolve_device)
    precision: str = "fp32"  # a bundle's networks: fp32 | bf16 | auto (respmotion.runtime.resolve_precision)
    threads: int = 0  # torch CPU threads (0: the CPUs this process may use, respmotion.runtime.use_threads)
    trace: str = ""
    dicom: bool = False
    structures: list[str] = field(default_factory=list)
    structure_names: list[str] = field(default_factory=list)
    render: bool = True
    heatmap: bool = False
    fps: float = 2.0
    num_slices: int = 1
    options: SynthesisOptions = field(default_factory=SynthesisOptions)

    RENAMED: ClassVar[dict[str, str]] = {k: f"options.{k}" for k in _OPTIONS}  # older saved configs

    def __post_init__(self) -> None:
        # configs saved before None meant "not given" wrote "" / 0 for the sampler settings
        self.sampler, self.steps, self.delta_t = self.sampler or None, self.steps or None, self.delta_t or None
        if self.dicom:
            self.options = replace(self.options, formats=(*self.options.formats, "dicom"))


#: settings that do not change what synthesis writes besides the GIFs (left out of the folder's identity)
_NOT_IDENTITY = ("out", "device", "threads", "render", "heatmap", "fps", "num_slices", "dicom", "slab")


def output_identity(cfg: SynthesizeConfig) -> dict:
    """What decides an output folder's content (io.ownership): every setting but :data:`_NOT_IDENTITY` (the
    ``options`` among the others), input and model as absolute paths."""
    ident = {k: v for k, v in {**asdict(cfg), **asdict(cfg.options)}.items()
             if k not in _NOT_IDENTITY and k != "options"}
    ident["formats"] = list(cfg.options.formats)
    ident["ct"] = str(Path(cfg.ct).resolve())
    ident["model"] = cfg.model if cfg.model in ("gt", "") else str(Path(cfg.model).resolve())
    ident["structures"] = [str(Path(s).resolve()) for s in cfg.structures]
    if cfg.precision == "fp32":  # what every folder made before the setting existed was made with
        del ident["precision"]
    return ident


def load_input(path: str | Path, phase: int | str = 0) -> tuple[Volume, StudyDir | None, np.ndarray | None]:
    """CT (native grid), its study folder if it is one of our layout, and a lung mask if known.

    A study folder gives its phase ``phase`` (the input's breathing state, ``--input-phase``); ``mid`` needs a
    CT, not a study (whose phases are 00..90)."""
    p = Path(path)
    if p.is_dir() and (p / "study.json").exists():
        if phase == "mid":
            raise ValueError(f"{p}: --input-phase mid needs a mid-position CT file, a study folder holds phases 00..90")
        sd = StudyDir(p)
        ct = sd.load_phase(int(phase))
        ct.meta["source"] = str(sd.phase_path(int(phase)))
        lung = sd.mask_path("lung", int(phase))
        return ct, sd, (read_npy(lung) if lung.exists() else None)
    from ..data.importer import import_ct

    return import_ct(p), None, None


def load_motion(cfg: SynthesizeConfig, study: StudyDir | None) -> MotionModel:
    bundle = cfg.model not in ("", "default", "gt") and not cfg.model.startswith("seed:")
    if check_precision(cfg.precision) != "fp32" and not bundle:
        raise ValueError(f"--precision {cfg.precision}: only a diffusion bundle's networks take it "
                         f"(--model BUNDLE_DIR)")
    if cfg.model in ("", "default"):  # the default model: the anatomical population prior (docs/motion.md)
        if _sampler_given(cfg):
            raise ValueError("--sampler/--steps/--delta-t choose how a diffusion bundle samples; the default "
                             "motion prior has none (give --model BUNDLE_DIR)")
        from ..models.anatomical_prior import PriorMotion

        return PriorMotion()
    if cfg.model == "gt":
        if _sampler_given(cfg):
            raise ValueError("--sampler/--steps/--delta-t choose how a diffusion bundle samples; --model gt has none")
        if study is None or not study.gt_path("ref", 0).exists():
            raise ValueError(f"{cfg.ct}: --model gt needs a phantom study folder with gt/ fields")
        fields = {k: study.load_gt("ref", k) for k in PHASES}
        return FixedMotion(fields, fields[0].geometry.shape)
    device = str(resolve_device(cfg.device))  # networks only: the prior and fixed fields run on the CPU
    if cfg.model.startswith("seed:"):  # the research code's published checkpoints (synthesis.seed)
        from .seed import load_seed_motion

        return load_seed_motion(cfg.model[len("seed:"):], device=device, sampler=cfg.sampler,
                                steps=cfg.steps, delta_t=cfg.delta_t)
    from .ldm import load_bundle

    return load_bundle(cfg.model, device=device, sampler=cfg.sampler, steps=cfg.steps, delta_t=cfg.delta_t,
                       precision=cfg.precision)


def _sampler_given(cfg: SynthesizeConfig) -> bool:
    return (cfg.sampler, cfg.steps, cfg.delta_t) != (None, None, None)


def _load_structures(cfg: SynthesizeConfig, ct: Volume) -> dict[str, np.ndarray]:
    from ..io.volumes import load_volume

    masks: dict[str, np.ndarray] = {}
    for s in cfg.structures:  # each exists (check_settings)
        p = Path(s)
        if p.suffix.lower() == ".dcm" or p.is_dir():
            from ..io.rtstruct import read_rtstruct

            found = read_rtstruct(p, ct)
            if not found:
                raise ValueError(f"{p}: the RTSTRUCT holds no ROI with closed contours (no structure to carry)")
            wanted = cfg.structure_names or list(found)
            missing = [n for n in wanted if n not in found]
            if missing:
                raise ValueError(f"{p}: no structure named {missing[0]!r} (has {', '.join(found)})")
            masks.update({n: found[n] for n in wanted})
        else:
            v = load_volume(p)
            if v.array.shape != ct.geometry.shape:
                raise ValueError(f"{p}: mask shape {v.array.shape} differs from the CT's {ct.geometry.shape}")
            masks[p.name.split(".")[0]] = (v.array > 0.5).astype(np.uint8)
    return masks


@dataclass
class Inputs:
    """What a synthesis run reads, loaded and checked (:func:`load_inputs`): the CT (native grid), its lung mask
    ``(z, y, x)`` when its study has one, the motion model, the structure masks ``(z, y, x)`` by name and the
    breathing trace (``--trace``, read once)."""

    ct: Volume
    lung: Any
    model: Any
    structures: dict
    trace: BreathingTrace | None = None


def load_inputs(cfg: SynthesizeConfig) -> Inputs:
    """Check the settings (:func:`~.checks.check_settings`: the trace is read there, once), then read and check
    everything a run needs: the CT (and its study), the motion model, the structures and the disk space a trace
    will take.  A bad input raises here, so callers do this before ``--out`` is claimed (a refused run, even
    with ``--overwrite``, leaves ``--out`` as it was)."""
    from .checks import check_settings, check_trace_space
    from .writer import VOLUME_SUFFIX

    trace = check_settings(cfg)
    opts = cfg.options
    ct, study, lung = load_input(cfg.ct, opts.input_phase)
    model = load_motion(cfg, study)
    structures = _load_structures(cfg, ct) if cfg.structures else {}
    if trace is not None:
        check_trace_space(trace, cfg.out, ct.geometry.shape, model.shape,
                          sum(f in VOLUME_SUFFIX for f in opts.formats) or 1)
    return Inputs(ct, lung, model, structures, trace)


def run_synthesis(cfg: SynthesizeConfig, inputs: Inputs | None = None) -> dict:
    """Synthesize into ``cfg.out`` from ``inputs`` (:func:`load_inputs` of ``cfg`` when not given)."""
    from .sanity import write_plot

    opts = cfg.options
    formats = opts.formats
    inp = inputs or load_inputs(cfg)
    ct, lung, model, structures = inp.ct, inp.lung, inp.model, inp.structures
    source = Path(ct.meta.get("source", ""))
    result = synthesize(ct, model, cfg.out, opts, lung_mask=lung, structures=structures,
                        template=str(source) if source.is_dir() else None)
    summary = result.summary
    out = Path(cfg.out)
    summary["plot"] = write_plot(out, summary)
    if inp.trace is not None:
        summary["trace"] = {"csv": cfg.trace,
                            "frames": _write_trace(ct, result, inp.trace, out / "trace", formats, opts.intensity)}
    if cfg.render:
        gifs = render_result(result, style="heatmap" if cfg.heatmap else "arrows", fps=cfg.fps,
                             structures=structures, num_slices=cfg.num_slices)
        summary["gifs"] = [str(g) for g in gifs if str(g).endswith(".gif")]
    write_json(out / "summary.json", summary)
    return summary


def _write_trace(ct: Volume, result: SynthesisResult, trace: BreathingTrace, tdir: Path, formats: tuple[str, ...],
                 intensity: str) -> list[dict]:
    """One frame per trace sample (fields from the model-grid cycle), each computed, warped and written in
    turn (memory holds one frame), with a progress bar.  The trace follows the model's cycle relative to phase
    00 (``result.reference_cycle``); each frame is re-anchored on the input like the phases
    (:func:`~.anchor.reanchor_field`) and pulls the phases' HU and lung channels (``result.channels``), so its
    lungs get the phases' intensities.  Returns each frame's record (index, time in s, mean displacement in mm)."""
    from tqdm import tqdm

    from ..io.volumes import save_field, save_volume
    from .anchor import reanchor_field
    from .breathing import iter_trace_sequence
    from .native import warp_native
    from .pipeline import HU_CHANNEL, LUNG_CHANNEL
    from .writer import VOLUME_SUFFIX, hu_int16

    suffixes = [VOLUME_SUFFIX[f] for f in formats if f in VOLUME_SUFFIX] or [VOLUME_SUFFIX["nifti"]]
    chans = result.channels[:LUNG_CHANNEL + 1]  # HU and lung occupancy, the first two channels (a view)
    anchor = result.anchors[0] if result.anchors else None
    frames = []
    samples = iter_trace_sequence(result.reference_cycle, trace)
    for i, (t, f) in enumerate(tqdm(samples, total=len(trace.time_s), desc="trace", unit="frame")):
        if anchor is not None:
            f = reanchor_field(f, anchor)
        warped = warp_native(chans, f, ct.geometry, mass_weight=LUNG_CHANNEL if intensity == "mass" else None)
        frame = Volume(hu_int16(warped[HU_CHANNEL]), ct.geometry)
        for suffix in suffixes:
            save_volume(frame, tdir / f"frame_{i:04d}.{suffix}")
            save_field(f, tdir / f"dvf_{i:04d}.{suffix}")
        frames.append({"index": i, "time_s": float(t), "mean_mm": float(f.magnitude().mean())})
    return frames
