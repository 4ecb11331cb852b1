"""TCIA 4D-Lung from NCI Imaging Data Commons: offline query, manifest, resumable download.

The query runs on the index that ``idc-index`` ships (no network): collection ``4d_lung``,
Modality CT, more than 49 instances per series, minus three non-conforming studies (the research code's cohort).
Downloads go through idc-index's own downloader (``IDCClient.download_from_selection``, which
drives s5cmd) into ``<out>/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``.

Resuming: a series whose folder already holds as many ``.dcm`` files as the index says is
skipped; after the download every selected series is counted again.  Nothing on disk is ever
deleted here.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import pandas as pd

from ..io.atomic import write_json
from ..io.dicom import phase_from_description

log = logging.getLogger(__name__)

COLLECTION = "4d_lung"
MODALITY = "CT"
MIN_INSTANCES = 49  # series with more instances than this are the gated CT phases
EXCLUDED_STUDY_SUFFIXES: tuple[str, ...] = (
    "170605434729890793667175785576",
    "195368562719946042143948478411",
    "983119680047871775036619601861",
)
# Download folder template (idc-index attribute names).
DIR_TEMPLATE = "%PatientID/%StudyInstanceUID/%SeriesInstanceUID"
ENDPOINTS = {"aws": "https://s3.amazonaws.com", "gcs": "https://storage.googleapis.com"}
MANIFEST_NAME = "manifest.json"
COLUMNS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "SeriesDescription",
    "instanceCount", "series_size_MB", "series_aws_url", "crdc_series_uuid",
]


class FetchError(RuntimeError):
    """A download problem (network, verification); one line, names the folder."""


@dataclass
class FetchConfig:
    """``respmotion data fetch`` settings."""

    out: str = "data/dicom"  # download root
    start: int = 0  # first study (0-based, in the sorted study list after --patients)
    end: int | None = None  # one past the last study; None = all
    patients: list[str] = field(default_factory=list)  # PatientIDs or their numbers (e.g. 100 or 100_HM10395)
    source: str = "aws"  # bucket provider for idc-index: aws or gcs
    connect_timeout_s: float = 8.0  # reachability check before downloading


# ---------------------------------------------------------------- query and selection
def new_client():
    """idc-index's client (loads the packaged index; a few seconds, no network)."""
    from idc_index import IDCClient

    return IDCClient()


def query_series(client=None) -> pd.DataFrame:
    """All 4D-Lung CT phase series (> 49 instances) minus the excluded studies, sorted.

    Sorted by PatientID, StudyDate, StudyInstanceUID, then phase; one row per series with the
    columns in :data:`COLUMNS` plus ``phase`` (percent, float; NaN when the description has none).
    """
    client = client if client is not None else new_client()
    idx = client.index
    sel = idx[(idx["collection_id"] == COLLECTION) & (idx["Modality"] == MODALITY)]
    sel = sel[sel["instanceCount"].astype("int64") > MIN_INSTANCES]
    excluded = sel["StudyInstanceUID"].astype(str).str.endswith(EXCLUDED_STUDY_SUFFIXES)
    df = sel.loc[~excluded, COLUMNS].copy()
    df["instanceCount"] = df["instanceCount"].astype("int64")
    df["series_size_MB"] = df["series_size_MB"].astype(float)
    df["phase"] = df["SeriesDescription"].astype(str).map(phase_from_description).astype(float)
    return df.sort_values(["PatientID", "StudyDate", "StudyInstanceUID", "phase", "SeriesInstanceUID"]).reset_index(
        drop=True
    )


def _patient_matches(pid: str, wanted: str) -> bool:
    return pid == wanted or pid.split("_", 1)[0] == wanted


def select(df: pd.DataFrame, start: int = 0, end: int | None = None, patients: Sequence[str] = ()) -> pd.DataFrame:
    """Series of the chosen patients, then of studies ``start:end`` of the remaining sorted study list."""
    if patients:
        ids = sorted(df["PatientID"].unique())
        unknown = [w for w in patients if not any(_patient_matches(p, str(w)) for p in ids)]
        if unknown:
            raise ValueError(f"unknown patient(s) {', '.join(map(str, unknown))} (known: {', '.join(ids)})")
        df = df[df["PatientID"].map(lambda p: any(_patient_matches(p, str(w)) for w in patients))]
    studies = list(dict.fromkeys(df["StudyInstanceUID"]))  # sorted order of first appearance
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad study range --start {start} --end {end}")
    if start >= len(studies) and studies:
        raise ValueError(f"--start {start} is past the last study ({len(studies)} selected)")
    keep = set(studies[start:end])
    return df[df["StudyInstanceUID"].isin(keep)].reset_index(drop=True)


def summary(df: pd.DataFrame) -> dict[str, Any]:
    return {
        "patients": int(df["PatientID"].nunique()),
        "studies": int(df["StudyInstanceUID"].nunique()),
        "series": int(len(df)),
        "instances": int(df["instanceCount"].sum()),
        "size_MB": round(float(df["series_size_MB"].sum()), 1),
    }


# ---------------------------------------------------------------- local state
def series_folder(out: Path, row) -> Path:
    return Path(out) / str(row.PatientID) / str(row.StudyInstanceUID) / str(row.SeriesInstanceUID)


def count_on_disk(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.dcm") if p.is_file()) if folder.is_dir() else 0


def missing_series(df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Rows whose folder does not hold exactly ``instanceCount`` ``.dcm`` files."""
    counts = [count_on_disk(series_folder(out, r)) for r in df.itertuples()]
    df = df.assign(on_disk=counts)
    return df[df["on_disk"] != df["instanceCount"]]


def write_manifest(df: pd.DataFrame, out: Path, selection: dict[str, Any]) -> Path:
    """Atomic ``<out>/manifest.json``: the selection, totals and one record per series (with its URL)."""
    import idc_index_data

    series = [
        {
            "patient_id": r.PatientID,
            "study_uid": r.StudyInstanceUID,
            "series_uid": r.SeriesInstanceUID,
            "study_date": str(r.StudyDate),
            "series_description": r.SeriesDescription,
            "phase_percent": None if pd.isna(r.phase) else float(r.phase),
            "instance_count": int(r.instanceCount),
            "size_MB": float(r.series_size_MB),
            "url": r.series_aws_url,
            "folder": f"{r.PatientID}/{r.StudyInstanceUID}/{r.SeriesInstanceUID}",
        }
        for r in df.itertuples()
    ]
    path = Path(out) / MANIFEST_NAME
    write_json(path, {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": f"IDC collection {COLLECTION}, Modality {MODALITY}, instanceCount > {MIN_INSTANCES}",
        "idc_index_data_version": idc_index_data.__version__,
        "excluded_study_uid_suffixes": list(EXCLUDED_STUDY_SUFFIXES),
        "selection": selection,
        "totals": summary(df),
        "series": series,
    })
    return path


# ---------------------------------------------------------------- network boundary
def check_reachable(url: str, timeout_s: float) -> None:
    """Open a TCP connection to ``url``'s host within ``timeout_s`` seconds or raise :class:`FetchError`.

    DNS lookups ignore socket timeouts, so the attempt runs in a daemon thread that is abandoned
    when the deadline passes.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    result: dict[str, BaseException | None] = {}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result["error"] = None
        except OSError as exc:  # handed to the caller below
            result["error"] = exc

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout_s)
    if "error" not in result:
        raise FetchError(f"cannot reach {host}:{port} within {timeout_s:g} s (network unreachable?)")
    if result["error"] is not None:
        exc = result["error"]
        raise FetchError(f"cannot reach {host}:{port} ({type(exc).__name__}: {exc}); check the network")


Downloader = Callable[[Any, list[str], Path, str], None]


def idc_download(client, series_uids: list[str], out: Path, source: str) -> None:
    """Download series with idc-index (s5cmd ``sync``, so files already present are skipped)."""
    from idc_index.index import IDCClientInsufficientDiskSpaceError

    try:
        client.download_from_selection(
            downloadDir=str(out), seriesInstanceUID=list(series_uids), dirTemplate=DIR_TEMPLATE,
            use_s5cmd_sync=True, quiet=True, show_progress_bar=True, source_bucket_location=source,
        )
    except IDCClientInsufficientDiskSpaceError as exc:
        raise FetchError(f"{out}: not enough disk space ({exc})") from exc


@dataclass
class FetchPlan:
    selected: pd.DataFrame
    missing: pd.DataFrame
    manifest: Path

    def describe(self) -> str:
        t, m = summary(self.selected), summary(self.missing)
        return (
            f"{t['series']} series ({t['studies']} studies, {t['patients']} patients), "
            f"{t['size_MB'] / 1000:.1f} GB in all; to download: {m['series']} series, {m['size_MB'] / 1000:.1f} GB"
        )


def plan(cfg: FetchConfig, client=None) -> FetchPlan:
    """Query, select, write the manifest and find what is not yet on disk."""
    out = Path(cfg.out)
    df = select(query_series(client), cfg.start, cfg.end, cfg.patients)
    if df.empty:
        raise ValueError("the selection is empty")
    manifest = write_manifest(df, out, {"start": cfg.start, "end": cfg.end, "patients": list(cfg.patients)})
    return FetchPlan(df, missing_series(df, out), manifest)


def download(cfg: FetchConfig, fp: FetchPlan, client=None, downloader: Downloader | None = None) -> dict[str, Any]:
    """Fetch the missing series of ``fp``, then verify every selected series' instance count.

    Raises :class:`FetchError` when the endpoint is unreachable (before touching anything) or
    when series are still incomplete afterwards; partial files stay for the next run.
    """
    out = Path(cfg.out)
    if cfg.source not in ENDPOINTS:
        raise ValueError(f"data source must be one of {sorted(ENDPOINTS)}, got {cfg.source!r}")
    todo = fp.missing
    if not todo.empty:
        check_reachable(ENDPOINTS[cfg.source], cfg.connect_timeout_s)
        client = client if client is not None else new_client()
        (downloader or idc_download)(client, todo["SeriesInstanceUID"].tolist(), out, cfg.source)
    still = missing_series(fp.selected, out)
    if not still.empty:
        worst = still.iloc[0]
        raise FetchError(
            f"{out}: {len(still)} of {len(fp.selected)} series incomplete after download (e.g. "
            f"{series_folder(out, worst)}: {worst.on_disk} of {worst.instanceCount} files); rerun to resume"
        )
    return {"downloaded_series": int(len(todo)), **summary(fp.selected)}
