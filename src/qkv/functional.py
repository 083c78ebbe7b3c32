"""Functional attention: the seeds' untrained baseline and scaled dot-product attention.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.
"""

from __future__ import annotations

from torch import Tensor

from . import _checks as C
from .backends import make_request
from .backends.dispatch import run
from .result import AttentionResult

__all__ = ["scaled_dot_product_attention", "simple_attention"]


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    enable_gqa: bool = False,
    need_weights: bool = False,
    backend: str = "auto",
    window: int | None = None,
    weight_rows: Tensor | list[int] | None = None,
    average_heads: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor | AttentionResult:
    """Scaled dot-product attention: ``softmax(q kᵀ * scale + mask) v``.

    Args:
        q: queries ``(..., H, L, d_k)``.
        k: keys ``(..., H_kv, S, d_k)``; same leading dims as ``q``.
        v: values ``(..., H_kv, S, d_v)``; ``d_v`` may differ from ``d_k``.
        attn_mask: bool ``True = may attend`` or float (added to the scores),
            broadcastable to ``(..., H, L, S)``; see :mod:`qkv.masks`.
        is_causal: query ``i`` sees keys ``j <= i + (S - L)`` (bottom-right aligned)::

                L=2, S=4:  x x x .
                           x x x x

            With an ``attn_mask`` too, a position must be allowed by both. When
            ``L != S`` that combination raises ``ValueError``: code ported from torch
            (where ``is_causal`` is a hint about a top-left mask) would silently get
            a different mask, so qkv asks for the causal part to be put in the mask.
        dropout_p: dropout on the weights, in ``[0, 1)``; applied whenever > 0 (the
            modules pass 0 in eval mode).
        scale: score multiplier, > 0; default ``1 / sqrt(d_k)``.
        enable_gqa: allow ``H`` to be a multiple of ``H_kv`` (grouped-query attention).
        need_weights: also return the softmax weights (before dropout).
        backend: ``"auto"`` or a name from :func:`qkv.backends`; a named backend that
            cannot serve the request raises ``ValueError`` (nothing is dropped).
        window: sliding window; with ``is_causal`` each query sees itself and the
            ``window - 1`` previous keys, without it keys at distance ``< window``.
        weight_rows: with ``need_weights``, only these query rows' weights.
        average_heads: with ``need_weights``, average the weights over heads.
        key_padding_mask: ``(B, S)``, True / 1 = a real key (q must be (B, H, L, d_k)).
            Kept apart from ``attn_mask``: fast backends read it per key, and it
            combines with ``is_causal`` for any L, S.

    Returns:
        the output ``(..., H, L, d_v)``; with ``need_weights=True`` an
        :class:`~qkv.AttentionResult` that unpacks as ``(output, weights)``, weights
        ``(..., H, L, S)`` (``R`` rows instead of ``L`` with ``weight_rows``; no ``H``
        with ``average_heads``). A query row with no allowed key gets zeros.

    The reference backend computes exactly this (``repeat_kv`` expands GQA heads)::

        scores = q @ repeat_kv(k).transpose(-2, -1) * scale
        scores = scores.masked_fill(~mask, -inf)     # or: + float mask
        weights = softmax(scores, dim=-1)            # zeros for an empty row
        output = dropout(weights) @ repeat_kv(v)
    """
    request = make_request(
        q,
        k,
        v,
        attn_mask=attn_mask,
        is_causal=is_causal,
        window=window,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=enable_gqa,
        need_weights=need_weights,
        weight_rows=weight_rows,
        average_heads=average_heads,
        key_padding_mask=key_padding_mask,
    )
    result = run(request, backend)
    return result if need_weights else result.output


def simple_attention(
    x: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
    need_weights: bool = False,
) -> Tensor | AttentionResult:
    """The untrained baseline: every token is its own query, key and value.

    ``scores = x @ xᵀ * scale`` (plain dot products; ``scale=1`` by default, as in
    the baseline, which has no ``d_k`` to scale by), softmax over keys, and each
    context vector is the weighted sum of the input vectors. No parameters.

    Args:
        x: input embeddings ``(..., L, d_model)``.
        attn_mask: bool or float, broadcastable to ``(..., L, L)``.
        is_causal: token ``i`` only looks at tokens ``0..i``.
        scale: score multiplier, > 0.
        need_weights: also return the ``(..., L, L)`` weights.

    Returns:
        context vectors ``(..., L, d_model)``, or ``(context, weights)`` as an
        :class:`~qkv.AttentionResult` when ``need_weights``.
    """
    x = C.check_float_tensor("x", x)
    if x.ndim < 2 or 0 in x.shape:
        raise ValueError(
            f"x must have shape (..., L, d_model) with L, d_model > 0, got {C.shape(x)}"
        )
    if scale is None:
        raise TypeError("scale must be a positive number (the baseline is unscaled: 1.0)")
    if attn_mask is not None:
        attn_mask = C.check_mask("attn_mask", attn_mask, (*C.shape(x)[:-1], x.shape[-2]), x.device)
    xh = x.unsqueeze(-3)  # (..., 1, L, d_model): one "head" whose q = k = v = x
    result = scaled_dot_product_attention(
        xh,
        xh,
        xh,
        attn_mask=None if attn_mask is None else attn_mask.unsqueeze(-3),
        is_causal=is_causal,
        scale=scale,
        need_weights=need_weights,
        backend="reference" if need_weights else "auto",
    )
    if not need_weights:
        return result.squeeze(-3)
    return AttentionResult(
        output=result.output.squeeze(-3), weights=result.weights.squeeze(-3), backend=result.backend
    )
