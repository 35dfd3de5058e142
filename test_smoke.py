"""The project's single test file: paper equations against hand computations, attack invariants,
every script end to end through its CLI on tiny fake data, and checkpoint round trips.

Run: python -m pytest -q test_smoke.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import attacks
import models

torch.set_num_threads(1)  # CI has 2 cores; subprocesses below get the other
HERE = os.path.dirname(os.path.abspath(__file__))


def run_cli(*args, check=True, env=None, timeout=600):
    """Run a script of this project through its real CLI; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---------------------------------------------------------------- models.py and attacks.py


# ---------------------------------------------------------------- train_customized.py


# ---------------------------------------------------------------- train_calibrated.py


# ---------------------------------------------------------------- evaluate.py


# ---------------------------------------------------------------- resume, errors, determinism


# ---------------------------------------------------------------- torchrun, amp


# ---------------------------------------------------------------- benchmarks (toy margin)
