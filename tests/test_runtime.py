import os
import subprocess
import sys

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
