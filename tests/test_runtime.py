import os
import subprocess
import sys

import pytest
import torch

from respmotion.runtime import available_cpus, use_threads


def test_threads_follow_the_affinity_mask():
    before = torch.get_num_threads()
    try:
        assert use_threads(0) == available_cpus() == torch.get_num_threads()
        assert use_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_cli_sets_passive_openmp_waits_unless_the_user_chose():
    code = ("import os, respmotion.cli as c\n"
            "try:\n    c.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "ACTIVE"


def test_one_device_rule():
    """``auto`` is CUDA when torch sees it, else the CPU; other names are refused in one line."""
    from respmotion.runtime import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda:1")


def test_one_precision_rule():
    """fp32 is no autocast, bf16 is bfloat16, auto is bf16 exactly where the device has it natively; other names
    are refused in one line naming the flag."""
    from respmotion.runtime import native_bf16, resolve_precision

    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, auto"):
        resolve_precision("fp16", "cpu")
