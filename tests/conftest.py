import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data); tests needing it skip when it is absent."""
    root = Path(os.environ.get("RESPMOTION_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set RESPMOTION_SHARED_DATA)")
    return root


@pytest.fixture(autouse=True)
def grad_mode_is_left_on():
    """A test (or the code it runs) that switches autograd off globally would break every later training test."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "autograd was left disabled (use `with torch.no_grad():`, not torch.set_grad_enabled(False))"
