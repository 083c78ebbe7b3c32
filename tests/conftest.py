"""Test configuration: make tests/support.py importable and keep runs deterministic."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# "auto" would otherwise time torch against flash on the first call (tens of seconds,
# machine-dependent choices); tests that need a calibration inject one
# (tests/test_dispatch.py, tests/test_calibration.py).
os.environ.setdefault("QKV_AUTO_CALIBRATION", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
