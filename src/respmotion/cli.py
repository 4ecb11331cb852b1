"""The ``respmotion`` command: one subcommand per pipeline stage.

Each subcommand lives in :mod:`respmotion.commands` (the CLI layer); it resolves its typed
config (defaults < ``--config FILE`` < flags < ``key=value``) and calls the stage.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand module under respmotion.commands) in pipeline order; each defines register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "phantom",
    "data",
    "register",
    "train",
    "latents",
    "synthesize",
    "render",
    "evaluate",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="respmotion",
        description="Learn breathing motion from 4D-CT and synthesize a 4D-CT from a static CT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('respmotion').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"respmotion.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .runtime import quiet_openmp_waits, use_threads

    quiet_openmp_waits()  # before the command modules import torch
    from .commands._common import run_command

    parser = build_parser()
    use_threads(0)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow flags (``data import CT --out F shape=8,32,32``); argparse stops
    # collecting positionals at the first flag, so those come back here
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
