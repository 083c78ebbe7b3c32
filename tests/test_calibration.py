"""``"auto"``'s once-per-machine measurement: bounded, cached on disk, resettable."""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from qkv.backends import calibration, dispatch, make_request
from qkv.backends.flash import compiled
from qkv.cli.app import main
from support import make_qkv

pytestmark = pytest.mark.skipif(
    not compiled.available(), reason=f"compiled kernel unavailable: {compiled.build_error()}"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_AUTO_CALIBRATION", "1")
    monkeypatch.setattr(calibration, "_loaded", {})
    monkeypatch.setattr(calibration, "_by_threads", {})
    return tmp_path


def test_calibration_is_bounded_cached_and_reset(cache, monkeypatch):
    result = calibration.calibrate(budget_s=0.3)
    assert 1 <= len(result.cells) < 60  # stopped by the budget, after at least one cell
    for cell in result.cells.values():
        assert cell["winner"] == ("flash" if cell["flash_ms"] < cell["torch_ms"] else "torch")
    path = calibration.cache_path()
    saved = json.loads(path.read_text())
    assert saved["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["cells"] == result.cells
    # A new process reads the file instead of measuring again.
    monkeypatch.setattr(calibration, "_loaded", {})
    monkeypatch.setattr(calibration, "_by_threads", {})
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("measured again"))
    assert calibration.lookup().cells == result.cells
    assert calibration.reset() == [path] and not path.exists()


def test_first_auto_call_measures_once_and_uses_the_verdict(cache, monkeypatch):
    calls = []

    def fake_calibrate(*args, **kwargs):
        calls.append(1)
        cells = {calibration.cell_key("float32", False, False, 256): {"winner": "flash"}}
        return calibration.Calibration({}, cells)

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    q, k, v = make_qkv(1, 2, L=200, d_k=8, dtype=torch.float32)
    for _ in range(3):
        assert dispatch.choose_backend(make_request(q, k, v)).name == "flash"
    assert len(calls) == 1


def test_disabled_calibration_keeps_torch(cache, monkeypatch):
    monkeypatch.setenv("QKV_AUTO_CALIBRATION", "0")
    q, k, v = make_qkv(1, 2, L=200, d_k=8, dtype=torch.float32)
    assert calibration.lookup() is None
    assert qkv.scaled_dot_product_attention(q, k, v).shape == q.shape
    assert dispatch.choose_backend(make_request(q, k, v)).name == "torch"


def test_cache_key_changes_with_the_thread_count(cache):
    a = calibration.cache_path()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(old + 1)
        assert calibration.cache_path() != a
    finally:
        torch.set_num_threads(old)


def test_calibrate_command(cache, capsys):
    assert main(["calibrate", "--budget", "0.2"]) == 0
    assert "cells measured" in capsys.readouterr().out
    assert calibration.cache_path().exists()
    assert main(["calibrate", "--reset"]) == 0
    assert not calibration.cache_path().exists()
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "CPU capability" in out and "compiled flash kernel" in out


def test_tiny_requests_never_trigger_a_measurement(cache, monkeypatch):
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("measured"))
    q, k, v = make_qkv(1, 2, L=12, d_k=8, dtype=torch.float32)
    assert dispatch.choose_backend(make_request(q, k, v)).name == "torch"
