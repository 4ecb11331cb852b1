"""Checkpoints and tensors load without arbitrary pickle: ``torch.load(..., weights_only=True)`` everywhere.

1. Static: every ``torch.load`` call in ``src/`` passes ``weights_only=True`` literally (AST, so
   comments and docstrings do not count and a ``weights_only=False`` or a missing keyword is
   caught); no ``pickle``/``dill`` loading, no ``np.load(..., allow_pickle=True)``.
2. Dynamic: a real training checkpoint (optimizer, scheduler, RNG states, history, config) and
   the final ``model.pt`` of a tiny autoencoder run load with plain ``torch.load(weights_only=True)``
   and rebuild the model; a checkpoint carrying a pickled object is refused by the loaders
   without running the object's code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "respmotion"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _torch_load_aliases(tree: ast.AST) -> set[str]:
    """Names under which ``torch.load`` is called in a module (``torch.load``, ``from torch import load``)."""
    names = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.Import):
            names |= {f"{a.asname}.load" for a in node.names if a.name == "torch" and a.asname}
    return names


def _violations() -> tuple[list[str], int]:
    bad, n_loads = [], 0
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        aliases = _torch_load_aliases(tree)
        rel = path.relative_to(SRC.parents[1])
        for call in _calls(tree):
            name = _dotted(call.func)
            where = f"{rel}:{call.lineno}"
            if name in aliases:
                n_loads += 1
                if not _is_true(_kw(call, "weights_only")):
                    bad.append(f"{where}: {name}(...) without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
                          "joblib.load", "torch.serialization.load"):
                bad.append(f"{where}: {name}(...) unpickles arbitrary objects")
            elif name in ("np.load", "numpy.load"):
                v = _kw(call, "allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{where}: {name}(..., allow_pickle={ast.unparse(v)})")
    return bad, n_loads


def test_every_torch_load_in_src_is_weights_only():
    bad, n_loads = _violations()
    assert n_loads == 1, f"expected one torch.load (io/torchfile.py, shared by every loader), found {n_loads}"
    assert not bad, "unsafe deserialisation in src/:\n" + "\n".join(bad)


def test_ast_check_catches_unsafe_calls(tmp_path):
    """The checker itself: it flags a missing keyword, False, a variable, and an import alias."""
    code = (
        "import torch\nfrom torch import load as tl\nimport numpy as np\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\nflag = True\ntorch.load('a', weights_only=flag)\n"
        "tl('a')\nnp.load('x', allow_pickle=True)\ntorch.load('ok', weights_only=True)\n"
    )
    tree = ast.parse(code)
    aliases = _torch_load_aliases(tree)
    flagged = [c.lineno for c in _calls(tree) if _dotted(c.func) in aliases and not _is_true(_kw(c, "weights_only"))]
    assert flagged == [4, 5, 7, 8]


# ---------------------------------------------------------------------------- round trip
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step image-autoencoder run on a 3-patient 16x64x64 phantom cohort (a few seconds)."""
    from respmotion.data.phantom import write_cohort
    from respmotion.training.autoencoder import AutoencoderRunConfig, train_autoencoder

    root = tmp_path_factory.mktemp("wo")
    write_cohort(root / "cohort", 3, seed=3, shape=(16, 64, 64))
    cfg = AutoencoderRunConfig(kind="image")
    cfg.data.root = str(root / "cohort")
    cfg.data.phases = [0, 50]
    cfg.data.patient_split.ratios = (0.67, 0.33, 0.0)
    cfg.model.base_channels = 8
    cfg.model.channel_mults = (1, 2)
    cfg.model.norm_groups = 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum = 3, 1, 1
    cfg.train.num_workers, cfg.train.warmup_steps = 0, 1
    cfg.train.ckpt_every, cfg.train.val_every, cfg.train.image_every, cfg.train.log_every = 2, 0, 0, 1
    cfg.train.device = "cpu"
    cfg.latent_scale_items = 2
    cfg.run_dir = str(root / "run")
    return train_autoencoder(cfg)


def test_training_checkpoint_round_trip_weights_only(trained_run):
    from respmotion.models.autoencoder import Autoencoder, AutoencoderNetConfig

    ckpts = sorted(p for p in trained_run.run_dir.glob("*.pt") if p.name != "model.pt")
    assert [p.name for p in ckpts] == ["00000002.pt", "00000003.pt"]
    full = torch.load(ckpts[-1], map_location="cpu", weights_only=True)  # plain torch, no allow-listing
    for key in ("model", "model_config", "optimizer", "scheduler", "scaler", "rng", "step", "config", "history"):
        assert key in full, key
    assert full["step"] == 3
    assert isinstance(full["rng"][0]["torch"], torch.Tensor)
    final = torch.load(trained_run.model_path, map_location="cpu", weights_only=True)
    assert "optimizer" not in final
    model = Autoencoder(AutoencoderNetConfig.from_dict(final["model_config"]))
    model.load_state_dict(final["model"])  # strict: every tensor came back
    # the same weights as the run's last training checkpoint
    for k, v in full["model"].items():
        if k != "latent_scale":
            assert torch.equal(v, final["model"][k]), k
    x = torch.zeros(1, 1, 16, 64, 64)
    assert model.eval().encode_latent(x).shape == (1, 3, 16, 16, 16)


def _evil_checkpoint(tmp_path: Path, trained_run) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained_run.model_path, map_location="cpu", weights_only=True)
    ckpt["extra"] = {"payload": _Payload(str(marker))}
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    return evil, marker


def test_pickled_object_in_checkpoint_never_runs(tmp_path, trained_run):
    """A checkpoint with an arbitrary object inside is refused and the object's code never runs."""
    from respmotion.models.autoencoder import load_autoencoder
    from respmotion.io.checkpoint import load_checkpoint

    evil, marker = _evil_checkpoint(tmp_path, trained_run)
    for loader in (load_checkpoint, lambda p: load_autoencoder(str(p))):
        with pytest.raises(Exception):
            loader(evil)
    assert not marker.exists()


def test_pickled_object_in_checkpoint_is_a_one_line_input_error(tmp_path, trained_run):
    """...and the refusal is the loaders' usual ``ValueError`` naming the file (CLI: one line, exit 2).

    torch signals it with ``pickle.UnpicklingError``, which is not a RuntimeError/OSError/ValueError.
    """
    from respmotion.models.autoencoder import load_autoencoder
    from respmotion.io.checkpoint import load_checkpoint

    evil, _ = _evil_checkpoint(tmp_path, trained_run)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_autoencoder(str(evil))


def test_numpy_files_are_read_without_pickle(tmp_path):
    from respmotion.io.atomic import read_npy

    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        read_npy(p)


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
