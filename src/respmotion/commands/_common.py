"""Shared pieces of the subcommands: config arguments and clean one-line errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..config import ConfigError, load_config, save_config
from ..runtime import PRECISIONS

T = TypeVar("T")
log = logging.getLogger("respmotion")


class UserError(Exception):
    """An input problem reported to the user in one line (exit code 2)."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file (see the stage's config dataclass)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys of the config), e.g. train.steps=100 or "
                        "train.lr_max=1e-4")


DEVICE_HELP = "auto (default: cuda when torch sees it, else cpu), cpu, cuda or cuda:N"
THREADS_HELP = "torch CPU threads (default 0: the CPUs this process may run on)"


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """``--sampler/--steps/--delta-t`` of the commands that sample a diffusion bundle (choices: the one registry)."""
    from ..diffusion.config import SAMPLER_CHOICES

    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, help="diffusion sampler (default: the bundle's)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the sampler's)")
    parser.add_argument("--delta-t", type=int, help="timestep stride of the research code: T / DELTA_T steps")
    parser.add_argument("--precision", choices=PRECISIONS, help="the networks' arithmetic: fp32 (default), bf16 (about "
                        "2x faster where the device has bf16 instructions; fields within ~1 %% of fp32) or auto (bf16 "
                        "where native)")


def resolve_config(cls: type[T], args: argparse.Namespace, flags: dict[str, Any]) -> T:
    bad = [o for o in (args.overrides or []) if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument '{bad[0]}' (overrides are key=value)")
    return load_config(cls, getattr(args, "config", None), flags, args.overrides)


def save_resolved(cfg: Any, out_dir: str | Path, name: str = "config.yaml", extra: dict | None = None) -> Path:
    """Write the resolved config beside the outputs of a command."""
    return save_config(cfg, Path(out_dir) / name, extra)


def command(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int | None]) -> None:
    parser.set_defaults(func=func)


def one_line(text: str) -> str:
    """A message on one line (library messages sometimes span several)."""
    return " | ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or "(no message)"


def describe_os_error(exc: OSError) -> str:
    """One line for an OS-level failure, naming the file: permission, disk full, a file where a folder goes."""
    name = exc.filename
    if name is None:
        return str(exc)  # our own FileNotFoundError("<file>: ...") messages, or an OS error without a file
    name = os.fsdecode(name)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "no permission to write or read here" if exc.errno != errno.EROFS else "read-only file system"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device (files already there were kept; free space and rerun)"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR) and os.path.isfile(name):
        what = "is a file, not a folder"
    elif exc.errno == errno.EISDIR:
        what = "is a folder, not a file"
    else:
        what = exc.strerror or type(exc).__name__
    other = f" -> {os.fsdecode(exc.filename2)}" if exc.filename2 else ""
    return f"{name}{other}: {what}"


def _error(line: str) -> None:
    """Print on stderr on a line of its own, also while a progress bar is open (tqdm.write moves it)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Run the selected subcommand; input problems become one line on stderr and exit code 2.

    Input problems: :class:`UserError`, config and value errors (their messages name the file),
    and every ``OSError`` (permissions, disk full, a file where a folder should be) and
    ``MemoryError`` (a request larger than the machine), which a user fixes, not the code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # pydicom logs warnings about files it then fails on (or reads anyway); our errors name the file
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("nibabel").setLevel(logging.ERROR)  # e.g. "pixdim ... setting 0 dims to 1": refused in one line
    prefix = f"respmotion {args.command}: error:"
    try:
        rc = args.func(args)
    except (UserError, ConfigError, ValueError) as exc:
        # Known input errors: their message already names the file and the problem.
        _error(f"{prefix} {one_line(str(exc))}")
        return 2
    except OSError as exc:
        _error(f"{prefix} {one_line(describe_os_error(exc))}")
        return 2
    except MemoryError as exc:
        _error(f"{prefix} not enough memory ({one_line(str(exc) or 'allocation failed')}); use a smaller shape "
               f"or batch")
        return 2
    except KeyboardInterrupt:
        print(f"respmotion {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
