"""Shared pieces of the benchmarks: environment record, timing, peak memory, isolated runs.

Every benchmark result carries :func:`environment` (device, torch threads, torch version, load
average before/after) so numbers taken on a busy or a different machine are recognisable.

Isolation: ``python -m bench`` runs each benchmark in a fresh child process
(``python -m bench.common MODULE FUNC KWARGS_JSON OUT_JSON``) so that

* peak memory is the benchmark's own (``ru_maxrss`` of a process that ran nothing else; the
  resident size after imports is recorded beside it as ``rss_baseline_mb``);
* a crash, an out-of-memory kill or a hang of one benchmark is recorded as
  ``{"error": ...}`` and the others still run (with a per-benchmark time limit).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from respmotion.runtime import quiet_openmp_waits, resolve_device

ROOT = Path(__file__).resolve().parents[1]
quiet_openmp_waits()  # every benchmark imports this module before torch: OpenMP threads sleep, not spin


# ---------------------------------------------------------------------------- environment
def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a timing depends on: device, torch threads and version, CPU count, load average."""
    import torch

    env: dict[str, Any] = {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg": loadavg(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def device_name(device: str) -> str:
    """The device a benchmark's ``device`` setting names, as a string (``cuda:0``, ``cpu``) that the child
    processes and the records carry; one rule for every entry point (:func:`respmotion.runtime.resolve_device`)."""
    return str(resolve_device(device))


# ---------------------------------------------------------------------------- timing & memory
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu", repeats: int = 1, warmup: int = 0) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds of each timed run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": [round(t, 4) for t in times], "seconds_min": round(min(times), 4),
            "seconds_mean": round(sum(times) / len(times), 4), "repeats": len(times), "warmup": warmup}


def rss_mb() -> float:
    """Current resident set size of this process (MB); psutil when installed, else /proc."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_cuda_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mb(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


class PeakRSS:
    """Peak resident size (MB) of this process while the ``with`` block runs (sampled every 20 ms).

    ``ru_maxrss`` only gives the peak of the whole process life; this isolates one section.
    ``.peak_mb`` and ``.start_mb`` are set on exit.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = float("nan")

    def __enter__(self) -> "PeakRSS":
        import threading

        gc.collect()
        self.start_mb = self.peak_mb = rss_mb()
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, rss_mb())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    def to_dict(self) -> dict[str, float]:
        return {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
                "rss_peak_increase_mb": round(self.peak_mb - self.start_mb, 1)}


# ---------------------------------------------------------------------------- inputs
def phantom_cycle(shape: tuple[int, int, int], cache_dir: str | None = None, seed: int = 0):
    """Phantom CT of every phase and its exact pull field vs phase 00: ``(geometry, {k: hu}, {k: dvf})``.

    Building the phantom takes ~15-40 s at 50x256x256 on 2 cores; with ``cache_dir`` the arrays
    are kept there as .npy for the next benchmark process.
    """
    import numpy as np

    from respmotion.core.geometry import Geometry
    from respmotion.io.layout import PHASES

    tag = f"phantom_s{seed}_{'x'.join(map(str, shape))}"
    d = Path(cache_dir) / tag if cache_dir else None
    if d is not None and (d / "done").exists():
        geom = Geometry.from_dict(json.loads((d / "geometry.json").read_text()))
        return (geom, {k: np.load(d / f"ct_{k:02d}.npy") for k in PHASES},
                {k: np.load(d / f"dvf_{k:02d}.npy") for k in PHASES})
    from respmotion.data.phantom import Phantom

    ph = Phantom(seed, shape)
    cts, dvfs = {}, {}
    for k in PHASES:
        ph_k = ph.phase(k)
        cts[k] = ph_k["image"].astype(np.float32)
        dvfs[k] = ph_k["dvf"].astype(np.float32)
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        for k in PHASES:
            np.save(d / f"ct_{k:02d}.npy", cts[k])
            np.save(d / f"dvf_{k:02d}.npy", dvfs[k])
        (d / "geometry.json").write_text(json.dumps(ph.geometry.to_dict()))
        (d / "done").write_text("")
    return ph.geometry, cts, dvfs


def build_cache(device: str = "cpu", shape: tuple[int, int, int] = (50, 256, 256), cache_dir: str | None = None,
                **_: Any) -> dict[str, Any]:
    """Build the shared phantom cycle once (``python -m bench`` runs this before the benchmarks)."""
    t0 = time.perf_counter()
    phantom_cycle(tuple(shape), cache_dir)
    return {"seconds": round(time.perf_counter() - t0, 2), "shape_zyx": list(shape)}


@contextlib.contextmanager
def quiet_stdout():
    """Send anything a benchmark prints to stderr: stdout carries the one JSON document."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------------------- child process
def call_run(module: str, func: str, kwargs: dict[str, Any]) -> Any:
    """Import ``module`` and call ``func`` with the keyword arguments it accepts."""
    mod = importlib.import_module(module)
    fn = getattr(mod, func, None)
    if fn is None:
        raise AttributeError(f"{module} has no function {func}()")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kw = {k: (tuple(v) if k == "shape" and isinstance(v, list) else v) for k, v in kwargs.items()}
    return fn(**{k: v for k, v in kw.items() if takes_any or k in params})


def child_main(argv: list[str]) -> int:
    """``python -m bench.common MODULE FUNC KWARGS_JSON OUT_JSON``: run one benchmark, write its record."""
    module, func, kwargs_json, out = argv
    kwargs = json.loads(kwargs_json)
    device = kwargs.get("device", "cpu")
    env0 = environment(device)  # imports torch: the baseline below includes it
    gc.collect()
    base = rss_mb()
    t0 = time.perf_counter()
    record: dict[str, Any]
    try:
        reset_cuda_peak(device)
        with quiet_stdout():
            result = call_run(module, func, kwargs)
        record = {"result": result}
    except BaseException as exc:  # recorded in the JSON (with the traceback on stderr), not swallowed
        traceback.print_exc()
        record = {"error": f"{type(exc).__name__}: {exc}"}
    record.update({
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_baseline_mb": round(base, 1),
        "cuda_peak_mb": cuda_peak_mb(device),
        "env": {**env0, "loadavg_after": loadavg()},
    })
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, default=_json_default)
    os.replace(tmp, out)
    return 0 if "error" not in record else 1


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    return repr(obj)


def run_isolated(module: str, func: str = "run", kwargs: dict[str, Any] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """Run ``module.func(**kwargs)`` in a fresh interpreter; its record, or ``{"error": ...}``."""
    kwargs = dict(kwargs or {})
    with tempfile.TemporaryDirectory(prefix="respmotion-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.common", module, func, json.dumps(kwargs), out]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": _tail(tail),
                    "wall_s": round(time.perf_counter() - t0, 2), "env": environment(kwargs.get("device", "cpu"))}
        if os.path.exists(out):
            with open(out) as fh:
                record = json.load(fh)
            if "error" in record:
                record["stderr_tail"] = _tail(proc.stderr)
            return record
        return {"error": f"benchmark process exited with code {proc.returncode} without a result "
                         f"(killed for memory?)", "stderr_tail": _tail(proc.stderr),
                "wall_s": round(time.perf_counter() - t0, 2), "env": environment(kwargs.get("device", "cpu"))}


def _tail(text: str | None, lines: int = 8) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def commit() -> str:
    """The checkout's commit (``+dirty`` when files differ from it)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def emit(record: dict[str, Any], path: str | os.PathLike | None = None) -> None:
    """Print a benchmark's JSON record and, with ``path``, write it there too (temp file, then rename)."""
    text = json.dumps(record, indent=1)
    print(text)
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{out.name}")
        tmp.write_text(text + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
