"""IDC 4D-Lung: offline query figures, subset selection, manifest and the download path up to the
network boundary (the downloader and the endpoint are replaced; nothing here touches the network)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from respmotion.cli import main
from respmotion.data import idc
from respmotion.io.layout import PHASES


@pytest.fixture(scope="session")
def idc_client():
    return idc.new_client()  # loads the packaged index (a few seconds, offline)


@pytest.fixture(scope="session")
def series_df(idc_client):
    return idc.query_series(idc_client)


def test_offline_query_figures(series_df):
    s = idc.summary(series_df)
    assert (s["patients"], s["studies"], s["series"]) == (20, 585, 5850)
    assert series_df["PatientID"].str.match(r"^1(0\d|1\d)_").all()
    phases = series_df.groupby("StudyInstanceUID")["phase"].apply(lambda p: sorted(p.astype(int)))
    assert all(p == list(PHASES) for p in phases)
    for suffix in idc.EXCLUDED_STUDY_SUFFIXES:
        assert not series_df["StudyInstanceUID"].str.endswith(suffix).any()
    assert (series_df["instanceCount"] > idc.MIN_INSTANCES).all()
    assert 170_000 < s["size_MB"] < 190_000


def test_start_end_select_studies_in_order(series_df):
    studies = list(dict.fromkeys(series_df["StudyInstanceUID"]))
    sub = idc.select(series_df, 5, 8)
    assert list(dict.fromkeys(sub["StudyInstanceUID"])) == studies[5:8]
    assert len(sub) == 30
    assert idc.summary(idc.select(series_df, end=10))["studies"] == 10
    with pytest.raises(ValueError, match="past the last study"):
        idc.select(series_df, start=585)


def test_patients_select_what_they_say(series_df):
    sub = idc.select(series_df, patients=["100", "105_HM10395"])
    assert sorted(sub["PatientID"].unique()) == ["100_HM10395", "105_HM10395"]
    want = series_df[series_df["PatientID"].isin(["100_HM10395", "105_HM10395"])]
    assert len(sub) == len(want)
    first = idc.select(series_df, start=0, end=1, patients=["105"])
    assert first["PatientID"].unique().tolist() == ["105_HM10395"] and len(first) == 10
    with pytest.raises(ValueError, match="unknown patient.*999"):
        idc.select(series_df, patients=["999"])


def _fill(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:04d}.dcm").write_bytes(b"x")


def _one_study_cfg(tmp_path, **kw):
    return idc.FetchConfig(out=str(tmp_path / "dl"), start=0, end=1, patients=["101"], **kw)


def test_manifest_resume_and_verify(tmp_path, idc_client, monkeypatch):
    cfg = _one_study_cfg(tmp_path)
    fp = idc.plan(cfg, idc_client)
    man = json.loads(fp.manifest.read_text())
    assert man["totals"]["series"] == 10 and len(man["series"]) == 10
    assert all(s["url"].startswith("s3://") for s in man["series"])
    rows = list(fp.selected.itertuples())
    out = tmp_path / "dl"
    _fill(idc.series_folder(out, rows[0]), rows[0].instanceCount)  # complete
    _fill(idc.series_folder(out, rows[1]), 3)  # partial from an earlier run
    fp = idc.plan(cfg, idc_client)
    assert len(fp.missing) == 9
    calls = []

    def fake_downloader(client, uids, dest, source):
        calls.append(list(uids))
        for r in fp.selected.itertuples():
            if r.SeriesInstanceUID in uids:
                _fill(idc.series_folder(dest, r), r.instanceCount)

    monkeypatch.setattr(idc, "check_reachable", lambda url, timeout: None)
    result = idc.download(cfg, fp, idc_client, fake_downloader)
    assert rows[0].SeriesInstanceUID not in calls[0] and rows[1].SeriesInstanceUID in calls[0]
    assert len(calls[0]) == 9 and result["series"] == 10
    # rerun: nothing left to fetch, downloader not called
    fp = idc.plan(cfg, idc_client)
    assert fp.missing.empty
    idc.download(cfg, fp, idc_client, fake_downloader)
    assert len(calls) == 1


def test_incomplete_download_is_reported_and_kept(tmp_path, idc_client, monkeypatch):
    cfg = _one_study_cfg(tmp_path)
    fp = idc.plan(cfg, idc_client)
    monkeypatch.setattr(idc, "check_reachable", lambda url, timeout: None)

    def short_downloader(client, uids, dest, source):
        for r in fp.selected.itertuples():
            _fill(idc.series_folder(dest, r), r.instanceCount - (1 if r.Index == 4 else 0))

    with pytest.raises(idc.FetchError, match="1 of 10 series incomplete") as err:
        idc.download(cfg, fp, idc_client, short_downloader)
    folder = idc.series_folder(tmp_path / "dl", fp.selected.iloc[4])
    assert str(folder) in str(err.value)
    assert idc.count_on_disk(folder) == fp.selected.iloc[4].instanceCount - 1  # nothing deleted


def test_unreachable_endpoint_fails_before_download_and_keeps_files(tmp_path, idc_client, monkeypatch):
    cfg = _one_study_cfg(tmp_path, connect_timeout_s=2.0)
    fp = idc.plan(cfg, idc_client)
    partial = idc.series_folder(tmp_path / "dl", fp.selected.iloc[0])
    _fill(partial, 7)
    monkeypatch.setitem(idc.ENDPOINTS, "aws", "https://127.0.0.1:9")  # closed local port: refused at once

    def never(*a):
        raise AssertionError("downloader must not run when the endpoint is unreachable")

    with pytest.raises(idc.FetchError, match="cannot reach 127.0.0.1:9"):
        idc.download(cfg, fp, idc_client, never)
    assert idc.count_on_disk(partial) == 7


def test_reachability_check_gives_up_at_its_deadline(monkeypatch):
    release = threading.Event()

    class _Conn:
        def close(self):
            pass

    def hanging_connect(addr, timeout=None):
        release.wait(5.0)  # a lookup that hangs; it "succeeds" only after the deadline
        return _Conn()

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    try:
        with pytest.raises(idc.FetchError, match="within 0.2 s"):
            idc.check_reachable("https://example.invalid", 0.2)
    finally:
        release.set()


@pytest.fixture
def cli_client(idc_client, monkeypatch):
    monkeypatch.setattr(idc, "new_client", lambda: idc_client)
    return idc_client


def _one_line_error(capsys, text):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err
    return err[0]


def test_cli_unknown_patient(tmp_path, cli_client, capsys):
    rc = main(["data", "fetch", "--out", str(tmp_path), "--patients", "999", "--yes"])
    assert rc == 2
    _one_line_error(capsys, "unknown patient(s) 999")


def test_cli_needs_yes_without_terminal(tmp_path, cli_client, capsys):
    rc = main(["data", "fetch", "--out", str(tmp_path / "dl"), "--patients", "102", "--end", "1"])
    assert rc == 2
    _one_line_error(capsys, "pass --yes")
    assert (tmp_path / "dl" / "manifest.json").exists()


def test_cli_unreachable_network(tmp_path, cli_client, capsys, monkeypatch):
    monkeypatch.setitem(idc.ENDPOINTS, "aws", "https://127.0.0.1:9")
    rc = main(["data", "fetch", "--out", str(tmp_path / "dl"), "--patients", "102", "--end", "1", "--yes"])
    assert rc == 2
    _one_line_error(capsys, "cannot reach")


def test_cli_dry_run_prints_plan(tmp_path, cli_client, capsys):
    rc = main(["data", "fetch", "--out", str(tmp_path / "dl"), "--end", "3", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "30 series (3 studies" in out
    assert (tmp_path / "dl" / "fetch_config.yaml").exists()
