"""Checks of ``respmotion synthesize`` settings that run before anything is written.

:func:`check_settings` refuses, in one line naming the flag or file, settings that cannot give a
sensible 4D-CT (no cycles, an amplitude of zero or beyond any breathing, two amplitude flags at
once, structure names without a structure file, a structure file that is not there) and a breathing
trace the sequence cannot follow (:func:`respmotion.synthesis.breathing.check_trace`; the trace is read
there, once, and handed on).  :func:`check_trace_space` refuses a trace whose frames the output's file
system cannot hold.  :func:`respmotion.synthesis.run.load_inputs` calls :func:`check_settings` first, before
the CT and the model are loaded, and :func:`check_trace_space` once the CT and the model's grid are known;
the CLI does both before it claims ``--out``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from .breathing import BreathingTrace, check_trace

#: largest breathing amplitude accepted by ``--si-amplitude-mm`` / ``--excursion-mm`` (mm): beyond any
#: human breathing (DIR-Lab's largest mean landmark motion is about 15 mm)
MAX_AMPLITUDE_MM = 100.0
#: largest ``--amplitude`` factor (times the model's motion)
MAX_AMPLITUDE_FACTOR = 10.0
#: bytes a trace frame writes per voxel and format: the int16 CT (compressed NIfTI keeps about half)
#: on the CT's grid and the float32 (z, y, x) field on the model grid (it hardly compresses)
CT_BYTES_PER_VOXEL = 1.0
FIELD_BYTES_PER_VOXEL = 12.0


def _positive_amount(flag: str, value: float | None, limit: float, unit: str) -> None:
    """``value`` (when given) is finite, > 0 and <= ``limit``; a ``ValueError`` naming ``flag`` otherwise."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{flag} {value:g}: the target amplitude must be >= 0 {unit} and finite")
    if value == 0:
        raise ValueError(f"{flag} 0: no motion (every phase would equal the input); give an amplitude > 0 {unit}")
    if value > limit:
        raise ValueError(f"{flag} {value:g}: larger than any breathing motion (at most {limit:g} {unit})")


def check_settings(cfg: Any) -> BreathingTrace | None:
    """Refuse settings of a :class:`respmotion.synthesis.run.SynthesizeConfig` that cannot give a sensible
    4D-CT, and an unreadable or unfollowable ``--trace`` file, with a one-line ``ValueError`` /
    ``FileNotFoundError`` naming the flag or file.  Reads only the trace and checks that the
    structure files exist; the CT and model are not loaded.  Returns the trace read
    (:class:`~respmotion.synthesis.breathing.BreathingTrace`; ``None`` without ``--trace``)."""
    o = cfg.options  # formats, intensity and input phase: checked when the options were made
    if cfg.model.strip() == "seed:":
        raise ValueError("--model seed: names no folder; give the research checkpoints' folder, e.g. seed:weights/")
    if o.samples < 1:
        raise ValueError(f"--samples {o.samples}: must be >= 1 (the number of breathing cycles to draw)")
    _positive_amount("--amplitude", o.amplitude, MAX_AMPLITUDE_FACTOR, "times the model's motion")
    _positive_amount("--excursion-mm", o.excursion_mm, MAX_AMPLITUDE_MM, "mm")
    _positive_amount("--si-amplitude-mm", o.si_amplitude_mm, MAX_AMPLITUDE_MM, "mm")
    given = [f for f, v in (("--amplitude", o.amplitude != 1.0), ("--excursion-mm", o.excursion_mm is not None),
                            ("--si-amplitude-mm", o.si_amplitude_mm is not None)) if v]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} each set the breathing amplitude; give one of them")
    if cfg.structure_names and not cfg.structures:
        raise ValueError(f"--structure-names {' '.join(cfg.structure_names)}: names structures of an RTSTRUCT; "
                         f"give the file with --structures")
    for s in cfg.structures:
        if not Path(s).exists():
            raise FileNotFoundError(f"{s}: structure file not found")
    return check_trace(cfg.trace) if cfg.trace else None


def check_trace_space(trace: BreathingTrace, out: str | Path, ct_shape: Sequence[int], field_shape: Sequence[int],
                      n_formats: int) -> None:
    """Refuse (``ValueError`` naming ``--trace`` and the numbers) a trace whose frames, one CT of
    ``ct_shape`` and one field of ``field_shape`` voxels per sample and format, need more space than
    the file system of ``out`` has free."""
    frames = len(trace.time_s)
    per_frame = n_formats * (CT_BYTES_PER_VOXEL * math.prod(ct_shape) + FIELD_BYTES_PER_VOXEL * math.prod(field_shape))
    need = frames * per_frame
    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ValueError(f"--trace {trace.path}: {frames:,} samples would write about {need / 2**30:,.1f} GiB "
                         f"({per_frame / 2**20:,.1f} MiB a frame), {free / 2**30:,.1f} GiB are free in {where}; "
                         f"use a shorter trace")
