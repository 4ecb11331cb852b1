"""Shared pieces of the subcommands: config arguments and clean one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..config import ConfigError, load_config, save_config

T = TypeVar("T")
log = logging.getLogger("respmotion")


class UserError(Exception):
    """An input problem reported to the user in one line (exit code 2)."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file (see the stage's config dataclass)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")


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


def run_command(args: argparse.Namespace) -> int:
    """Run the selected subcommand; input problems become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # pydicom logs warnings about files it then fails on (or reads anyway); our errors name the file
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        rc = args.func(args)
    except (UserError, ConfigError, FileNotFoundError, ValueError) as exc:
        # Known input errors: their message already names the file and the problem.
        print(f"respmotion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"respmotion {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
