"""``respmotion render``: GIFs of the breathing cycle (DVF arrows or heatmap, difference maps,
real vs generated) for studies of our dataset layout.

Writes ``<out>/<patient>/<study>/<patient>_<study>_<view>_<slice>_{motion,diff,compare}.gif``, a
``<patient>_<study>_render.json`` manifest per study and the resolved ``render_config.yaml`` in ``<out>``.
Display convention: patient's right on the image left (axial, coronal), superior at the top
(coronal, sagittal), anterior on the left (sagittal), physical aspect ratio kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..viz.config import START_FROM, VIEWS
from ..viz.study import RenderJob, render_study, select_studies
from ._common import UserError, add_config_args, command, resolve_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="GIFs of the breathing cycle with the motion drawn over the CT",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset root (patient/study/phase_XX.npy)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--patient", help="patient ID: folder name or its number (117 for 117_HM10395, 1 for "
                   "phantom_001); default: all")
    p.add_argument("--num-studies", type=int, help="first N studies of each patient (default 1)")
    p.add_argument("--num-slices", type=int, help="slices per view (default 1)")
    p.add_argument("--start-from", choices=START_FROM, help="slices around the middle (default), first or last")
    p.add_argument("--fps", type=float, help="GIF frames per second (default 2)")
    p.add_argument("--heatmap", action="store_true", default=None,
                   help="draw the displacement magnitude (mm) instead of arrows")
    p.add_argument("--views", help=f"comma-separated subset of {','.join(VIEWS)} (default all three)")
    p.add_argument("--fields", metavar="gt|DIR",
                   help="motion to draw: gt (phantom ground truth) or a folder of dvf_XX.(npy|nii.gz|mha) "
                        "files (generated: phase 00 is warped with them and compared to the real phases)")
    p.add_argument("--contours", metavar="NAMES", help="comma-separated mask names to outline (masks/<name>_XX.npy)")
    p.add_argument("--mp4", action="store_true", default=None, help="also write MP4s (needs imageio-ffmpeg)")
    add_config_args(p)
    command(p, run)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def patient_folder(data: str, patient: str) -> str:
    """The patient folder a ``--patient`` value means: its name, or a number that is the leading
    (4D-Lung ``117_HM10395``) or trailing (phantom ``phantom_001``) number of exactly one folder."""
    from ..io.layout import list_patients

    names = list_patients(data)
    if patient in names or not patient.isdigit():
        return patient
    hits = [n for n in names if n.split("_")[0] == patient
            or (n.rsplit("_", 1)[-1].isdigit() and int(n.rsplit("_", 1)[-1]) == int(patient))]
    if len(hits) > 1:
        raise UserError(f"{data}: --patient {patient} matches {len(hits)} patients ({', '.join(hits)}); give the "
                        f"folder name")
    return hits[0] if hits else patient


def run(args: argparse.Namespace) -> int:
    flags = {
        "data": args.data, "out": args.out, "patient": args.patient, "num_studies": args.num_studies,
        "fields": args.fields, "contours": _split(args.contours),
        "render.num_slices": args.num_slices, "render.start_from": args.start_from, "render.fps": args.fps,
        "render.style": "heatmap" if args.heatmap else None, "render.views": _split(args.views),
        "render.mp4": args.mp4,
    }
    job = resolve_config(RenderJob, args, flags)
    if not job.data or not job.out:
        raise UserError("--data and --out are required")
    job.render.validate()
    if job.patient is not None:
        job.patient = patient_folder(job.data, job.patient)
    studies = select_studies(job.data, job.patient, job.num_studies)
    if not studies:
        who = f"patient {job.patient!r}" if job.patient else "any patient"
        raise UserError(f"{job.data}: no complete study of {who}")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(job, out, "render_config.yaml")
    written = []
    for study in studies:
        files = render_study(study, out / study.patient / study.study, job.fields, job.contours, job.render,
                             single=len(studies) == 1)
        written.extend(str(f) for f in files)
    print(json.dumps({"out": str(out), "studies": [s.key for s in studies],
                      "gifs": sum(f.endswith(".gif") for f in written)}))
    return 0
