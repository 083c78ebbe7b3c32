"""``backend="auto"``: which backend serves which request (issue 3, point 3).

The rules (documented in :mod:`qkv.backends.dispatch`) are checked on requests built
without running attention where possible (``ordered``), and end to end through
``AttentionResult.backend`` where a result is cheap.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import qkv
from qkv.backends import calibration, dispatch, make_request
from support import make_qkv


def request(L=1024, S=None, dtype=torch.float32, **kwargs):
    q, k, v = make_qkv(1, 2, L=L, S=S, d_k=8, dtype=dtype)
    return make_request(q, k, v, **kwargs)


def first(r) -> str:
    return dispatch.choose_backend(r).name


def fake_calibration(winner_by_key: dict[str, str]) -> calibration.Calibration:
    """A calibration whose every cell says ``torch`` unless ``winner_by_key`` says otherwise."""
    cells = {}
    for dt in calibration.DTYPES:
        for grad in (False, True):
            for causal in (False, True):
                for L in calibration.LENGTHS:
                    key = calibration.cell_key(dt, grad, causal, L)
                    cells[key] = {"torch_ms": 1.0, "flash_ms": 1.0, "winner": "torch"}
                    cells[key]["winner"] = winner_by_key.get(key, "torch")
    return calibration.Calibration({}, cells)


@pytest.fixture
def measured(monkeypatch):
    """Install a calibration: ``measured({"float32/fwd/full/1024": "flash"})``."""

    def install(winners: dict[str, str]) -> None:
        fake = fake_calibration(winners)
        monkeypatch.setattr(calibration, "lookup", lambda: fake)

    return install


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "torch"),  # no calibration: torch wherever it serves
        ({"is_causal": True}, "torch"),
        ({"dtype": torch.bfloat16, "L": 4096}, "torch"),
        ({"window": 128}, "flash"),  # structure: skips tiles outside the band
        ({"is_causal": True, "S": 1500}, "flash"),  # SDPA would need a dense mask
        ({"need_weights": True}, "flash"),  # exact weights, linear memory
        ({"need_weights": True, "L": 64}, "flash"),
        ({"need_weights": True, "dtype": torch.float64, "is_causal": True}, "flash"),
        ({"dropout_p": 0.1, "window": 128}, "torch"),  # dropout runs on the loops: no promotion
    ],
)
def test_structural_rules_without_calibration(kwargs, expected):
    kwargs = dict(kwargs)
    L, S, dtype = kwargs.pop("L", 1024), kwargs.pop("S", None), kwargs.pop("dtype", torch.float32)
    assert calibration.lookup() is None  # conftest turns measuring off
    assert first(request(L, S, dtype, **kwargs)) == expected


def test_calibrated_cells_decide_plain_requests(measured):
    measured({"float32/fwd/full/1024": "flash", "bfloat16/fwd+bwd/causal/4096": "flash"})
    assert first(request(1024)) == "flash"
    assert first(request(900)) == "flash"  # nearest cell in log2(L * S)
    assert first(request(256)) == "torch"
    assert first(request(1024, dtype=torch.float64)) == "flash"  # float64 reads float32's
    assert first(request(1024, is_causal=True)) == "torch"
    q, k, v = make_qkv(1, 2, L=4096, d_k=8, dtype=torch.bfloat16, requires_grad=True)
    assert first(make_request(q, k, v, is_causal=True)) == "flash"
    with torch.no_grad():
        assert first(make_request(q, k, v, is_causal=True)) == "torch"


def test_auto_result_names_the_backend():
    q, k, v = make_qkv(1, 2, L=600, d_k=8)
    res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True, weight_rows=[0])
    assert res.backend == "flash" and res.weights.shape == (1, 2, 1, 600)
    res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True, window=4)
    assert res.backend == "flash"
    small = make_qkv(1, 2, L=5, d_k=8, requires_grad=True)
    # Weights that need a gradient: flash refuses, the reference serves them.
    assert qkv.scaled_dot_product_attention(*small, need_weights=True).backend == "reference"


def test_auto_falls_back_when_flash_refuses_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    q, k, v = make_qkv(1, 2, L=600, d_k=8, dtype=torch.float32)
    mask = torch.zeros(600, 600, dtype=torch.float32, requires_grad=True)
    r = make_request(q, k, v, attn_mask=mask, window=64)  # a window puts flash first
    with caplog.at_level(logging.INFO, logger="qkv"):
        assert first(r) == "torch"
        assert first(r) == "torch"
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "qkv"]
    assert len(messages) == 1
    assert "not using 'flash'" in messages[0] and "float attn_mask" in messages[0]


def test_rules_only_reorder_the_preference_list(monkeypatch):
    monkeypatch.setattr(dispatch, "PREFERENCE", ["torch", "flash", "reference"])
    assert dispatch.ordered(request(window=8)) == ["flash", "torch", "reference"]
    monkeypatch.setattr(dispatch, "PREFERENCE", ["torch", "reference"])
    assert dispatch.ordered(request(window=8)) == ["torch", "reference"]
    assert first(request(need_weights=True)) == "reference"


def test_triton_comes_first_for_cuda_tensors():
    """ordered() reads only the request's fields, so a stand-in with a CUDA device works."""
    fake = SimpleNamespace(
        device=torch.device("cuda"), dtype=torch.bfloat16, need_weights=False, L=4096,
        S=4096, window=8, causal=False, attn_mask=None, needs_grad=False, dropout_p=0.0,
    )  # fmt: skip
    assert dispatch.ordered(fake)[0] == "triton"
    cpu = request(L=4096, dtype=torch.bfloat16, window=8)
    assert dispatch.ordered(cpu)[0] == "triton"  # the list still starts with it ...
    assert first(cpu) == "flash"  # ... but it is not even considered for CPU tensors


def test_named_flash_that_cannot_serve_raises():
    q, k, v = make_qkv(1, 2, L=5, d_k=4)
    mask = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"backend 'flash' cannot serve this request: .*mask"):
        qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="flash")


def test_backends_lists_flash():
    listed = qkv.backends()
    assert {"reference", "torch", "flash"} <= set(listed)
    assert "exact weights" in listed["flash"]


def test_use_backend_selects_for_auto_calls_only():
    q, k, v = make_qkv(1, 2, L=8, d_k=8)
    with qkv.use_backend("reference"):
        res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True)
        assert res.backend == "reference"
        named = qkv.scaled_dot_product_attention(q, k, v, need_weights=True, backend="flash")
        assert named.backend == "flash"  # an explicit name wins
        layer = qkv.MultiHeadAttention(16, 2)
        x = torch.randn(1, 8, 16)
        assert layer(x, need_weights=True).backend == "reference"
    assert qkv.scaled_dot_product_attention(q, k, v, need_weights=True).backend == "flash"
    with pytest.raises(ValueError, match="unknown backend"), qkv.use_backend("nope"):
        pass
