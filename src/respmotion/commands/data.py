"""``respmotion data fetch|prepare|import``: get 4D-Lung from IDC, make training volumes, read a user's CT."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._common import UserError, add_config_args, command, resolve_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download 4D-Lung from IDC, prepare training volumes, import a CT",
                       description=__doc__)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    f = dsub.add_parser("fetch", help="query IDC 4D-Lung (offline index), write a manifest, download (resumable)")
    f.add_argument("--out", help="download folder (default data/dicom)")
    f.add_argument("--start", type=int, help="first study (0-based, sorted by patient, date, UID)")
    f.add_argument("--end", type=int, help="one past the last study (e.g. --end 10: the first 10 studies)")
    f.add_argument("--patients", help="comma-separated PatientIDs or numbers, e.g. 100,101")
    f.add_argument("--source", choices=["aws", "gcs"], help="bucket provider (default aws)")
    f.add_argument("--yes", action="store_true", help="download without asking")
    f.add_argument("--dry-run", action="store_true", help="write the manifest and print the plan only")
    add_config_args(f)
    command(f, run_fetch)

    q = dsub.add_parser("prepare", help="DICOM phase series -> resampled HU volumes in the dataset layout")
    q.add_argument("--src", help="folder with the DICOM series (default data/dicom)")
    q.add_argument("--out", help="dataset folder (default data/prepared)")
    q.add_argument("--shape", help="target shape z,y,x (default 50,256,256)")
    q.add_argument("--workers", type=int, help="worker processes (default 2)")
    add_config_args(q)
    command(q, run_prepare)

    i = dsub.add_parser("import", help="a CT (DICOM folder/file, NIfTI, MHA/NRRD) -> a volume file")
    i.add_argument("ct", metavar="CT", help="DICOM folder or file, .nii[.gz], .mha, .nrrd")
    i.add_argument("--out", required=True, metavar="FILE", help="output volume (.npy + .json sidecar, .nii.gz, .mha)")
    i.add_argument("--shape", help="resample to z,y,x keeping the field of view (e.g. 50,256,256)")
    i.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    i.add_argument("--phase", type=float, help="pick the series of this respiratory phase (percent)")
    add_config_args(i)
    command(i, run_import)


# ---------------------------------------------------------------- fetch
def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UserError(f"{question} cannot be confirmed without a terminal; pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def run_fetch(args: argparse.Namespace) -> int:
    from ..data import idc

    patients = [p.strip() for p in args.patients.split(",") if p.strip()] if args.patients else None
    cfg = resolve_config(idc.FetchConfig, args, {"out": args.out, "start": args.start, "end": args.end,
                                                 "patients": patients, "source": args.source})
    out = Path(cfg.out)
    client = idc.new_client()
    fp = idc.plan(cfg, client)
    save_resolved(cfg, out, "fetch_config.yaml")
    print(f"manifest: {fp.manifest}")
    print(f"selected {fp.describe()}")
    if args.dry_run or fp.missing.empty:
        if fp.missing.empty:
            print("all selected series are complete on disk")
        return 0
    if not args.yes and not _confirm(f"download {len(fp.missing)} series to {out}?"):
        print("not downloaded")
        return 1
    try:
        result = idc.download(cfg, fp, client)
    except idc.FetchError as exc:
        raise UserError(str(exc)) from exc
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- prepare
def run_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import PrepareConfig, prepare

    cfg = resolve_config(PrepareConfig, args, {"src": args.src, "out": args.out, "shape": args.shape,
                                               "workers": args.workers})
    report = prepare(cfg, progress=True)
    save_resolved(cfg, cfg.out, "prepare_config.yaml")
    for key, reason in report.skipped.items():
        print(f"respmotion data prepare: skipped {key}: {reason}", file=sys.stderr)
    print(json.dumps({"out": cfg.out, "prepared": len(report.prepared), "already_done": len(report.already_done),
                      "skipped": len(report.skipped)}))
    return 1 if report.skipped else 0


# ---------------------------------------------------------------- import
def save_volume_files(vol, out: Path) -> None:
    """``save_volume`` so that a failure (disk full) leaves the old files, never a new ``.npy`` with an
    old or missing ``.json`` sidecar: the files are written under a temporary name, then renamed."""
    from ..io.atomic import TMP_PREFIX
    from ..io.volumes import save_volume, sidecar

    staged = out.with_name(f"{TMP_PREFIX}{out.name}")
    pairs = [(staged, out)] + ([(sidecar(staged), sidecar(out))] if out.suffix == ".npy" else [])
    try:
        save_volume(vol, staged)
        for src, dst in reversed(pairs):  # the sidecar first: a reader keys on the .npy
            os.replace(src, dst)
    finally:
        for src, _ in pairs:
            src.unlink(missing_ok=True)


def run_import(args: argparse.Namespace) -> int:
    from ..data.config import ImportConfig
    from ..data.importer import import_ct

    cfg = resolve_config(ImportConfig, args, {"shape": args.shape, "series": args.series, "phase": args.phase})
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out is the volume file to write (e.g. {out / 'ct.npy'})")
    vol = import_ct(args.ct, cfg.shape, series_uid=cfg.series, phase=cfg.phase)
    save_volume_files(vol, out)
    save_resolved(cfg, out.parent, f"{out.name.split('.')[0]}.import_config.yaml", extra={"ct": str(args.ct)})
    print(json.dumps({"out": str(out), "shape_zyx": list(vol.geometry.shape),
                      "spacing_zyx_mm": [round(s, 4) for s in vol.geometry.spacing]}))
    return 0
