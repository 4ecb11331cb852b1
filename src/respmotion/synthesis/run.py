"""The ``synthesize`` stage end to end: input CT -> motion -> 4D-CT, structures, DICOM, GIFs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.types import Volume
from ..io.atomic import read_npy, write_json
from ..io.layout import PHASES, StudyDir
from .pipeline import DEFAULT_FORMATS, FixedMotion, MotionModel, SynthesisOptions, render_result, synthesize


@dataclass
class SynthesizeConfig:
    ct: str = ""
    out: str = "out/synthesis"
    model: str = ""  # "" or "default": the DIR-Lab population prior; a bundle folder; "seed:DIR"; "gt" (phantom study)
    samples: int = 1
    seed: int = 0
    sampler: str = ""  # override the bundle's sampler (diffusion.config.SAMPLER_CHOICES; "" = bundle default)
    steps: int = 0  # number of sampling steps (0 = the sampler's default)
    delta_t: int = 0  # research-code timestep stride: num_train_timesteps / delta_t steps (0 = not given)
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = the CPUs this process may run on (os.sched_getaffinity)
    amplitude: float = 1.0
    excursion_mm: float | None = None
    si_amplitude_mm: float | None = None  # mean superior lung motion at 50 %, mm (SynthesisOptions)
    trace: str = ""
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))  # pipeline.FORMATS
    dicom: bool = False  # adds "dicom" to formats
    structures: list[str] = field(default_factory=list)
    structure_names: list[str] = field(default_factory=list)
    render: bool = True
    heatmap: bool = False
    fps: float = 2.0
    num_slices: int = 1
    intensity: str = "mass"  # pipeline.INTENSITIES: lung density follows the motion ("mass") or only warped
    input_phase: str = "0"  # breathing state of the input CT: a phase percent 0..90 or "mid" (synthesis.anchor)


#: settings that do not change what synthesis writes besides the GIFs (left out of the folder's identity)
_NOT_IDENTITY = ("out", "device", "threads", "render", "heatmap", "fps", "num_slices")


def output_identity(cfg: SynthesizeConfig) -> dict:
    """What decides an output folder's content (io.ownership): every setting but :data:`_NOT_IDENTITY`,
    input and model as absolute paths, the formats as written, the input phase and intensity checked (one-line
    ``ValueError`` before the folder is claimed)."""
    from dataclasses import asdict

    from .anchor import check_input_phase
    from .pipeline import INTENSITIES, check_formats

    ident = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IDENTITY}
    ident["input_phase"] = check_input_phase(cfg.input_phase)
    if cfg.intensity not in INTENSITIES:
        raise ValueError(f"--intensity: {cfg.intensity!r} is not one of {', '.join(INTENSITIES)}")
    ident["formats"] = list(check_formats([*cfg.formats, *(["dicom"] if cfg.dicom else [])]))
    del ident["dicom"]
    ident["ct"] = str(Path(cfg.ct).resolve())
    ident["model"] = cfg.model if cfg.model in ("gt", "") else str(Path(cfg.model).resolve())
    ident["structures"] = [str(Path(s).resolve()) for s in cfg.structures]
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
    if cfg.model in ("", "default"):  # the default model: the anatomical population prior (docs/motion.md)
        if cfg.sampler or cfg.steps or cfg.delta_t:
            raise ValueError("--sampler/--steps/--delta-t choose how a diffusion bundle samples; the default "
                             "motion prior has none (give --model BUNDLE_DIR)")
        from ..models.prior import PriorMotion

        return PriorMotion()
    if cfg.model == "gt":
        if cfg.sampler or cfg.steps or cfg.delta_t:
            raise ValueError("--sampler/--steps/--delta-t choose how a diffusion bundle samples; --model gt has none")
        if study is None or not study.gt_path("ref", 0).exists():
            raise ValueError(f"{cfg.ct}: --model gt needs a phantom study folder with gt/ fields")
        fields = {k: study.load_gt("ref", k) for k in PHASES}
        return FixedMotion(fields, fields[0].geometry.shape)
    if cfg.model.startswith("seed:"):  # the research code's published checkpoints (synthesis.seed)
        from .seed import load_seed_motion

        return load_seed_motion(cfg.model[len("seed:"):], device=cfg.device, sampler=cfg.sampler or None,
                                steps=cfg.steps or None, delta_t=cfg.delta_t or None)
    from .ldm import load_bundle

    return load_bundle(cfg.model, device=cfg.device, sampler=cfg.sampler or None, steps=cfg.steps or None,
                       delta_t=cfg.delta_t or None)


def _load_structures(cfg: SynthesizeConfig, ct: Volume) -> dict[str, np.ndarray]:
    from ..io.volumes import load_volume

    masks: dict[str, np.ndarray] = {}
    for s in cfg.structures:
        p = Path(s)
        if not p.exists():
            raise FileNotFoundError(f"{p}: structure file not found")
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


def run_synthesis(cfg: SynthesizeConfig) -> dict:
    from .checks import check_trace_space
    from .pipeline import VOLUME_SUFFIX, check_formats

    from .anchor import check_input_phase
    from .sanity import write_plot

    formats = check_formats([*cfg.formats, *(["dicom"] if cfg.dicom else [])])
    input_phase = check_input_phase(cfg.input_phase)
    ct, study, lung = load_input(cfg.ct, input_phase)
    model = load_motion(cfg, study)
    structures = _load_structures(cfg, ct) if cfg.structures else {}
    if cfg.trace:
        check_trace_space(cfg.trace, cfg.out, ct.geometry.shape, model.shape,
                          sum(f in VOLUME_SUFFIX for f in formats) or 1)
    source = Path(ct.meta.get("source", ""))
    opts = SynthesisOptions(samples=cfg.samples, seed=cfg.seed, amplitude=cfg.amplitude, excursion_mm=cfg.excursion_mm,
                            si_amplitude_mm=cfg.si_amplitude_mm,
                            formats=formats, template=str(source) if source.is_dir() else None,
                            intensity=cfg.intensity, input_phase=input_phase)
    result = synthesize(ct, model, cfg.out, opts, lung_mask=lung, structures=structures)
    summary = result.summary
    out = Path(cfg.out)
    summary["plot"] = write_plot(out, summary)
    if cfg.trace:
        summary["trace"] = _write_trace(ct, result, cfg.trace, out / "trace", formats, cfg.intensity)
    if cfg.render:
        gifs = render_result(result, style="heatmap" if cfg.heatmap else "arrows", fps=cfg.fps,
                             structures=structures, num_slices=cfg.num_slices)
        summary["gifs"] = [str(g) for g in gifs if str(g).endswith(".gif")]
    write_json(out / "summary.json", summary)
    return summary


def _write_trace(ct: Volume, result, trace_csv: str, tdir: Path, formats: tuple[str, ...], intensity: str) -> dict:
    """One frame per trace sample (fields from the model-grid cycle), each computed, warped and written in
    turn (memory holds one frame), with a progress bar.  The trace follows the model's cycle relative to phase
    00 (``result.reference_cycle``); each frame is re-anchored on the input like the phases
    (``compose(anchor, f)``, :mod:`respmotion.synthesis.anchor`) and its lungs get the phases' intensities."""
    import torch
    from tqdm import tqdm

    from ..core import warp as W
    from ..core.types import DisplacementField

    from ..io.volumes import save_field, save_volume
    from .breathing import check_trace, iter_trace_sequence
    from .pipeline import VOLUME_SUFFIX, hu_int16, warp_native

    suffixes = [VOLUME_SUFFIX[f] for f in formats if f in VOLUME_SUFFIX] or [VOLUME_SUFFIX["nifti"]]
    chans = torch.from_numpy(np.stack([ct.array.astype(np.float32), (result.lung != 0).astype(np.float32)]))
    anchor = result.anchors[0] if result.anchors else None
    frames = []
    samples = iter_trace_sequence(result.reference_cycle, trace_csv)
    for i, (t, f) in enumerate(tqdm(samples, total=len(check_trace(trace_csv)[0]), desc="trace", unit="frame")):
        if anchor is not None:
            sp = f.geometry.spacing
            f = DisplacementField(W.compose(W.to_tensor(anchor.array), W.to_tensor(f.array), sp)[0].numpy(),
                                  f.geometry, f.meta)
        frame = Volume(hu_int16(warp_native(chans, f, ct.geometry, mass_weight=1 if intensity == "mass" else None)[0]),
                       ct.geometry)
        for suffix in suffixes:
            save_volume(frame, tdir / f"frame_{i:04d}.{suffix}")
            save_field(f, tdir / f"dvf_{i:04d}.{suffix}")
        frames.append({"index": i, "time_s": float(t), "mean_mm": float(f.magnitude().mean())})
    return {"csv": trace_csv, "frames": frames}
