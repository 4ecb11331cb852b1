"""The ``synthesize`` stage end to end: input CT -> motion -> 4D-CT, structures, DICOM, GIFs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.types import Volume
from ..io.atomic import read_json, write_json
from ..io.layout import PHASES, StudyDir
from .pipeline import FixedMotion, MotionModel, SynthesisOptions, render_result, synthesize


@dataclass
class SynthesizeConfig:
    ct: str = ""
    out: str = "out/synthesis"
    model: str = ""  # model bundle folder, or "gt" for a phantom study's ground-truth motion
    samples: int = 1
    seed: int = 0
    sampler: str = ""  # override the bundle's sampler (ddpm, ddim, dpm)
    steps: int = 0  # override the bundle's number of sampling steps (0 = bundle default)
    device: str = "cpu"
    amplitude: float = 1.0
    excursion_mm: float | None = None
    trace: str = ""
    dicom: bool = False
    structures: list[str] = field(default_factory=list)
    structure_names: list[str] = field(default_factory=list)
    render: bool = True
    heatmap: bool = False
    fps: float = 2.0
    num_slices: int = 1


def load_input(path: str | Path) -> tuple[Volume, StudyDir | None, np.ndarray | None]:
    """CT (native grid), its study folder if it is one of our layout, and a lung mask if known."""
    p = Path(path)
    if p.is_dir() and (p / "study.json").exists():
        sd = StudyDir(p)
        ct = sd.load_phase(0)
        ct.meta["source"] = str(sd.phase_path(0))
        lung = sd.mask_path("lung", 0)
        return ct, sd, (np.load(lung) if lung.exists() else None)
    from ..data.importer import import_ct

    return import_ct(p), None, None


def load_motion(cfg: SynthesizeConfig, study: StudyDir | None) -> MotionModel:
    if cfg.model == "gt":
        if study is None or not study.gt_path("ref", 0).exists():
            raise ValueError(f"{cfg.ct}: --model gt needs a phantom study folder with gt/ fields")
        fields = {k: study.load_gt("ref", k) for k in PHASES}
        return FixedMotion(fields, fields[0].geometry.shape)
    if cfg.model.startswith("seed:"):  # the research code's published checkpoints (synthesis.seed)
        from .seed import load_seed_motion

        return load_seed_motion(cfg.model[len("seed:"):], device=cfg.device, sampler=cfg.sampler or None,
                                steps=cfg.steps or None)
    from .ldm import load_bundle

    return load_bundle(cfg.model, device=cfg.device, sampler=cfg.sampler or None, steps=cfg.steps or None)


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
    ct, study, lung = load_input(cfg.ct)
    model = load_motion(cfg, study)
    structures = _load_structures(cfg, ct) if cfg.structures else {}
    opts = SynthesisOptions(samples=cfg.samples, seed=cfg.seed, amplitude=cfg.amplitude,
                            excursion_mm=cfg.excursion_mm, dicom=cfg.dicom)
    if cfg.excursion_mm is not None and lung is None:
        from ..anatomy import lung_mask

        lung = lung_mask(ct.array)
    result = synthesize(ct, model, cfg.out, opts, lung_mask=lung)
    summary = result.summary
    out = Path(cfg.out)
    contour_masks = None
    if structures:
        from ..io.volumes import save_volume
        from .contours import motion_summary, propagate_structure, structure_motion

        summary["structures"] = {}
        contour_masks = []
        sdir = out / "sample_00" / "structures"
        for name, mask in structures.items():
            occupancy = propagate_structure(mask, result.cycles[0], threshold=None)
            motion = structure_motion(occupancy, ct.geometry)
            summary["structures"][name] = motion_summary(motion)
            by_phase = {k: (occupancy[k] >= 0.5).astype(np.uint8) for k in sorted(occupancy)}
            contour_masks.append([by_phase[k] for k in sorted(by_phase)])
            for k, m in by_phase.items():
                save_volume(Volume(m, ct.geometry), sdir / f"{name}_{k:02d}.nii.gz")
            save_volume(Volume(motion["itv"], ct.geometry), sdir / f"{name}_ITV.nii.gz")
            if cfg.dicom:
                from ..io.rtstruct import write_rtstruct

                series = result.dicom[0]["series"]
                for k in sorted(by_phase):
                    write_rtstruct({name: by_phase[k], f"{name}_ITV": motion["itv"]}, series[k],
                                   out / "sample_00" / "dicom" / f"rtstruct_phase_{k:02d}_{name}.dcm")
    if cfg.trace:
        from ..core.ops import warp_volume
        from ..io.volumes import save_field, save_volume
        from .breathing import trace_sequence

        seq = trace_sequence(result.cycles[0], cfg.trace)
        tdir = out / "trace"
        frames = []
        for i, (t, f) in enumerate(seq):
            save_volume(warp_volume(ct, f), tdir / f"frame_{i:04d}.nii.gz")
            save_field(f, tdir / f"dvf_{i:04d}.mha")
            frames.append({"index": i, "time_s": float(t), "mean_mm": float(f.magnitude().mean())})
        summary["trace"] = {"csv": cfg.trace, "frames": frames}
    if cfg.render:
        gifs = render_result(result, ct, style="heatmap" if cfg.heatmap else "arrows", fps=cfg.fps,
                             contours=contour_masks, num_slices=cfg.num_slices)
        summary["gifs"] = [str(g) for g in gifs if str(g).endswith(".gif")]
    write_json(out / "summary.json", summary)
    return summary


def read_summary(out: str | Path) -> dict:
    return read_json(Path(out) / "summary.json")
