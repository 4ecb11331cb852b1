"""Tuning candidates of the registration bench, read from ``bench/registration_candidates.yaml`` (a base and
overrides per method; the file's header says how it is laid out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from respmotion.config import from_dict
from respmotion.registration.config import FFDSettings

from .registration_methods import DeepaliSettings

CANDIDATES_FILE = Path(__file__).with_name("registration_candidates.yaml")
SETTINGS = {"ours": FFDSettings, "deepali-example": DeepaliSettings}  # methods that have tuning candidates


def load_candidates(method: str, path: Path = CANDIDATES_FILE) -> dict[str, Any]:
    """``{name: settings}`` of ``method``'s candidates in ``path`` (settings: an :class:`FFDSettings` or a
    :class:`DeepaliSettings`, each ``base`` with the candidate's changes on top), in the file's order."""
    if method not in SETTINGS:
        raise ValueError(f"tuning candidates exist for {', '.join(SETTINGS)}, not {method!r}")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get(method), dict):
        raise ValueError(f"{path}: no section {method!r}")
    base = doc[method].get("base") or {}
    return {name: from_dict(SETTINGS[method], {**base, **(changes or {})}, source=f"{path} ({method}.{name})")
            for name, changes in (doc[method].get("candidates") or {}).items()}
