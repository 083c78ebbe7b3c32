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
from qkv.backends import dispatch, make_request
from support import make_qkv


def request(L=1024, S=None, dtype=torch.float32, **kwargs):
    q, k, v = make_qkv(1, 2, L=L, S=S, d_k=8, dtype=dtype)
    return make_request(q, k, v, **kwargs)


def first(r) -> str:
    return dispatch.choose_backend(r).name


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "torch"),  # float32: PyTorch's fused kernel is faster
        ({"is_causal": True}, "torch"),
        ({"dtype": torch.bfloat16, "L": 4096}, "flash"),  # half-precision matmuls
        ({"dtype": torch.float16, "L": 4096}, "flash"),  # computed in float32: SDPA's fp16 is slow
        ({"dtype": torch.bfloat16}, "torch"),  # 1024: too short to be worth it
        ({"dtype": torch.bfloat16, "L": 64}, "torch"),
        ({"dtype": torch.bfloat16, "L": 16384}, "torch"),  # SDPA ahead again
        ({"window": 128}, "flash"),  # skips tiles outside the band
        ({"is_causal": True, "S": 1500}, "flash"),  # SDPA would need a dense mask
        ({"need_weights": True}, "flash"),  # long: exact weights, linear memory
        ({"need_weights": True, "L": 64}, "reference"),  # short: the plain matmul
        ({"need_weights": True, "dtype": torch.float64, "is_causal": True}, "flash"),
    ],
)
def test_auto_rules_on_the_cpu(kwargs, expected):
    kwargs = dict(kwargs)
    L, S, dtype = kwargs.pop("L", 1024), kwargs.pop("S", None), kwargs.pop("dtype", torch.float32)
    assert first(request(L, S, dtype, **kwargs)) == expected


def test_half_precision_training_stays_on_torch():
    # flash upcasts half inputs to float32 for backward; SDPA was 1.6-1.7x faster there.
    q, k, v = make_qkv(1, 2, L=4096, d_k=8, dtype=torch.bfloat16, requires_grad=True)
    assert first(make_request(q, k, v)) == "torch"
    with torch.no_grad():
        assert first(make_request(q, k, v)) == "flash"


def test_auto_result_names_the_backend():
    q, k, v = make_qkv(1, 2, L=600, d_k=8)
    res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True, weight_rows=[0])
    assert res.backend == "flash" and res.weights.shape == (1, 2, 1, 600)
    res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True, window=4)
    assert res.backend == "flash"
    small = make_qkv(1, 2, L=5, d_k=8)
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
    monkeypatch.setattr(dispatch, "PREFERENCE", ["torch", "reference"])
    assert dispatch.ordered(request(dtype=torch.bfloat16)) == ["torch", "reference"]
    assert first(request(need_weights=True)) == "reference"


def test_triton_comes_first_for_cuda_tensors():
    """ordered() reads only the request's fields, so a stand-in with a CUDA device works."""
    fake = SimpleNamespace(
        device=torch.device("cuda"), dtype=torch.bfloat16, need_weights=False, L=4096,
        S=4096, window=None, causal=False, attn_mask=None, needs_grad=False,
    )  # fmt: skip
    assert dispatch.ordered(fake)[0] == "triton"
    cpu = request(L=4096, dtype=torch.bfloat16)
    assert dispatch.ordered(cpu)[0] == "flash"
    assert first(cpu) == "flash"  # and "triton" is not even considered for CPU tensors


def test_named_flash_that_cannot_serve_raises():
    q, k, v = make_qkv(1, 2, L=5, d_k=4)
    mask = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"backend 'flash' cannot serve this request: .*mask"):
        qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="flash")


def test_backends_lists_flash():
    listed = qkv.backends()
    assert {"reference", "torch", "flash"} <= set(listed)
    assert "exact weights" in listed["flash"]
