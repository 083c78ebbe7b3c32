"""torch.autograd.gradcheck in float64 (issue 2, acceptance 3).

gradcheck compares the analytic gradients with finite differences for q, k, v (and a
float mask, which is differentiable too). The case grid runs on every registered backend
that serves float64 with gradients (a backend registered later joins automatically);
the module and second-derivative checks use the reference. Sizes are tiny: gradcheck
costs one forward per input element.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from support import make_qkv, registry_backends, skip_if_refused

# Registered backends usable in float64 on the CPU (+ "auto"); the others are skipped.
BACKENDS = registry_backends(dtype=torch.float64)


def _attn(backend="reference", **kwargs):
    return lambda q, k, v: qkv.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)


def _bool_mask(L: int, S: int, dead_row: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    m = torch.rand(1, 1, L, S, generator=g) > 0.4
    m[..., 0] = True  # every row keeps a key ...
    if dead_row is not None:
        m[..., dead_row, :] = False  # ... except this one
    return m


CASES = {
    "unmasked": ({}, {}),
    "scaled": ({"scale": 0.7}, {}),
    "bool_mask": ({"attn_mask": _bool_mask(4, 5)}, {}),
    "causal_square": ({"is_causal": True}, {"S": 4}),
    "causal_rect": ({"is_causal": True}, {"S": 6}),
    "window": ({"is_causal": True, "window": 2}, {"S": 4}),
    "gqa": ({"enable_gqa": True}, {"H_kv": 1}),
    "gqa_causal": ({"enable_gqa": True, "is_causal": True}, {"H_kv": 1, "S": 4}),
    "d_v_differs": ({}, {"d_v": 2}),
    "dead_row_bool": ({"attn_mask": _bool_mask(4, 5, dead_row=2)}, {}),
    # L > S causal: the first L - S queries have no key at all (bottom-right alignment)
    "dead_rows_causal": ({"is_causal": True}, {"S": 2}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_backend(case, backend):
    kwargs, sizes = CASES[case]
    shape = {"B": 1, "H": 2, "L": 4, "S": 5, "d_k": 3} | sizes
    q, k, v = make_qkv(**shape, requires_grad=True)
    skip_if_refused(backend, q, k, v, **kwargs)
    fn = _attn(backend, **kwargs)
    out = fn(q, k, v)
    out.sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"{case}: non-finite d{name}"
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_dead_row_has_zero_output_and_no_gradient():
    q, k, v = make_qkv(1, 2, L=4, S=5, d_k=3, requires_grad=True)
    mask = _bool_mask(4, 5, dead_row=1)
    out = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    out.sum().backward()
    # the dead query does not influence anything, so its gradient is exactly zero
    assert torch.equal(q.grad[..., 1, :], torch.zeros_like(q.grad[..., 1, :]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dead_row", [None, 3])
def test_gradcheck_float_mask_is_differentiable(dead_row, backend):
    """A float (additive) mask gets gradients too, like any other score bias."""
    q, k, v = make_qkv(1, 2, L=4, S=5, d_k=3, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    mask = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64)
    mask[..., 1, 2] = float("-inf")  # a forbidden position inside a live row
    if dead_row is not None:
        mask[..., dead_row, :] = float("-inf")
    # gradcheck perturbs every input entry; -inf entries stay -inf, so they pass through
    # a fixed mask and only the finite part is perturbed as an input
    finite = torch.isfinite(mask)
    base = mask.masked_fill(finite, 0.0)
    values = mask.masked_fill(~finite, 0.0).requires_grad_(True)
    skip_if_refused(backend, q, k, v, attn_mask=base + values)  # a mask with a gradient

    def fn(q, k, v, values):
        return qkv.scaled_dot_product_attention(q, k, v, attn_mask=base + values, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, values), eps=1e-6, atol=1e-8)
    fn(q, k, v, values).sum().backward()
    assert torch.isfinite(values.grad).all()
    if dead_row is not None:
        assert torch.equal(values.grad[..., dead_row, :], torch.zeros(1, 2, 5, dtype=torch.float64))


def test_gradcheck_multihead_module():
    """The module path (projections, GQA heads, padding, causal) also differentiates correctly."""
    torch.manual_seed(0)
    layer = qkv.MultiHeadAttention(8, 4, num_kv_heads=2, backend="reference").double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    real = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)  # row 0 of batch 1 is dead

    def fn(x):
        return layer(x, key_padding_mask=real, is_causal=True)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


def test_gradgradcheck_reference():
    """Second derivatives (e.g. for gradient penalties) are exact too."""
    q, k, v = make_qkv(1, 1, L=3, S=3, d_k=2, requires_grad=True)
    assert torch.autograd.gradgradcheck(_attn(is_causal=True), (q, k, v), eps=1e-6, atol=1e-7)
