"""Output folders with an owner: who made them (config and input fingerprints) and who writes now.

A command that fills a folder calls :func:`claim` (a context manager) before writing::

    with claim(out, "phantom", {"seed": 3, "shape": [50, 256, 256]}, overwrite=args.overwrite):
        ...write...

* ``<folder>/owner.json`` (the manifest) records the command and its *identity*: the settings and
  input fingerprints that decide what the folder holds.  A later run with the
  same identity resumes (finished parts are skipped by the stage); another identity is refused with
  one line naming the first differing key and ``--overwrite`` (and ``--resume`` where the command
  has it).  ``overwrite=True`` empties a folder that holds our manifest and takes it over; a
  non-empty folder without a manifest is never emptied.
* ``<folder>/.owner.lock`` is held (``fcntl.flock``) while the process writes: exclusively, or
  ``shared=True`` for the shards of one sharded run (same identity).  A second writer is refused at
  once.  The kernel releases the lock when the process dies (even ``kill -9``), so a rerun resumes.
* ``<folder>/.owner.check`` serialises the brief manifest check of concurrent starts.

Errors are :class:`OwnershipError` (a ``ValueError``: one line, exit code 2 in the CLI).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .atomic import TMP_PREFIX, read_json, write_json

MANIFEST = "owner.json"
LOCK = ".owner.lock"
CHECK_LOCK = ".owner.check"
FORMAT = "respmotion.owner/1"
_OURS = {MANIFEST, LOCK, CHECK_LOCK}


class OwnershipError(ValueError):
    """The folder belongs to another run or is being written by another process."""


def holds_data(folder: Path) -> bool:
    """True when ``folder`` holds anything besides the ownership files and temporary files."""
    return any(p.name not in _OURS and not p.name.startswith(TMP_PREFIX) for p in folder.iterdir())


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    """``"settings.reference=0 (this run: 50)"``: the first differing (dotted) key."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            return _first_difference(a, b, f"{prefix}{key}.")
        return f"{prefix}{key}={json.dumps(a, default=str)} (this run: {json.dumps(b, default=str)})"
    return "identity"


def _flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name in (LOCK, CHECK_LOCK):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def claim(folder: str | os.PathLike, command: str, identity: dict[str, Any], *, overwrite: bool = False,
          shared: bool = False, resume_flag: str | None = None, adopt: bool = False) -> Iterator[Path]:
    """Own ``folder`` for ``command`` with ``identity`` while the block runs (see the module docstring).

    Args:
        identity: JSON-able settings and input fingerprints; equal identity = the same outputs.
        overwrite: replace a folder made with another identity (only one that holds our manifest).
        shared: shards of one run write together (same identity); other writers are still refused.
        resume_flag: the flag that continues the folder's own run (e.g. ``"--resume"``), named in errors.
        adopt: take a non-empty folder without a manifest (a run of an older version being resumed).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"{folder}: is a file, not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    how = f"pass {resume_flag} to continue it, " if resume_flag else ""
    check_fd = os.open(folder / CHECK_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    lock_fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    wrote = False
    try:
        fcntl.flock(check_fd, fcntl.LOCK_EX)  # brief: concurrent starts check the manifest one at a time
        try:
            if not _flock(lock_fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
                raise OwnershipError(f"{folder}: another respmotion process is writing here ({LOCK} is locked); "
                                     f"wait for it to finish or choose another output folder")
            manifest = folder / MANIFEST
            record = {"format": FORMAT, "command": command, "identity": identity}
            if manifest.exists():
                old = read_json(manifest)
                same = old.get("command") == command and old.get("identity") == identity
                if not same and not overwrite:
                    what = (_first_difference(old.get("identity") or {}, identity)
                            if old.get("command") == command else f"command={old.get('command')!r}")
                    raise OwnershipError(f"{folder}: made by another `respmotion {old.get('command')}` run "
                                         f"({what}); {how}pass --overwrite to replace it, or choose another "
                                         f"output folder")
                if not same:
                    _empty(folder)
            elif holds_data(folder) and not adopt:
                raise OwnershipError(f"{folder}: not empty and has no {MANIFEST} (not made by this version of "
                                     f"respmotion {command}); {how}empty it or choose another output folder")
            if not manifest.exists() or read_json(manifest) != record:
                write_json(manifest, record)
                wrote = True
        finally:
            fcntl.flock(check_fd, fcntl.LOCK_UN)
        yield folder
    except BaseException:
        # failed before any data was written (and no other writer holds the folder): leave no trace
        if not holds_data(folder) and _flock(lock_fd, fcntl.LOCK_EX):
            for name in ((MANIFEST,) if wrote else ()) + (LOCK, CHECK_LOCK):
                (folder / name).unlink(missing_ok=True)
            if created and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        os.close(lock_fd)
        os.close(check_fd)
