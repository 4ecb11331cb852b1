"""Import graph of the package, read from the source with ast (nothing is imported): stages import one way.

* ``synthesis/`` imports nothing from ``evaluation/`` or ``training/`` (making motion does not depend on
  measuring it or on training code);
* ``diffusion/pipeline.py`` (inference) imports nothing from ``training/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "respmotion"


def imported_modules(path: Path, root: Path = PKG) -> set[str]:
    """Dotted ``respmotion...`` modules a source file below ``root`` (the ``respmotion`` package folder) imports,
    at module level, in functions and in branches alike."""
    package = ["respmotion", *path.relative_to(root).parent.parts]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # "from .. import training" names a package too
    return {m for m in out if m == "respmotion" or m.startswith("respmotion.")}


def forbidden_imports(path: Path, packages: tuple[str, ...]) -> list[str]:
    bad = tuple(f"respmotion.{p}" for p in packages)
    return sorted(m for m in imported_modules(path) if m in bad or m.startswith(tuple(b + "." for b in bad)))


RULES = [(p, ("evaluation", "training")) for p in sorted(PKG.glob("synthesis/*.py"))]
RULES.append((PKG / "diffusion" / "pipeline.py", ("training",)))


@pytest.mark.parametrize("path, packages", [pytest.param(p, pk, id=str(p.relative_to(PKG))) for p, pk in RULES])
def test_stage_imports_point_one_way(path, packages):
    assert forbidden_imports(path, packages) == []


def test_import_reader_sees_relative_absolute_and_local_imports(tmp_path):
    """The reader itself: relative imports of any depth, absolute ones, and imports inside functions."""
    root = tmp_path / "respmotion"
    probe = root / "synthesis" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..evaluation.metrics import x\nimport respmotion.training.engine\nimport numpy\n"
                     "def f():\n    from .. import diffusion\n    from .run import y\n")
    mods = imported_modules(probe, root)
    assert {"respmotion.evaluation.metrics", "respmotion.training.engine", "respmotion.diffusion",
            "respmotion.synthesis.run"} <= mods
    assert "numpy" not in mods
