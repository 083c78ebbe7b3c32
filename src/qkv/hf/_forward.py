"""The attention function qkv registers with transformers' ``AttentionInterface``.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · R chosen query rows.

Models call it as ``fn(module, query, key, value, attention_mask, dropout=...,
scaling=..., **kwargs)`` with q ``(B, H, L, d_k)``, k ``(B, H_kv, S, d_k)``, v
``(B, H_kv, S, d_v)`` and expect ``(output (B, L, H, d_v), weights (B, H, L, S) or
None)``. ``attention_mask`` is whatever :func:`qkv.hf._mask.qkv_mask` returned (or a 4-D
mask the user built), so its three forms are decoded here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from ._weights import current_selection

__all__ = ["BACKEND_ATTR", "qkv_attention_forward"]

#: Attribute :func:`qkv.hf.use` sets on a model's modules to pick their backend.
BACKEND_ATTR = "qkv_backend"

# Model features qkv does not compute, by the keyword models pass them under. A value
# other than None means the model relies on it: refuse rather than drop it.
_UNSUPPORTED = {
    "softcap": "attention logit softcapping (e.g. Gemma 2's attn_logit_softcapping)",
    "s_aux": "attention sinks (s_aux, e.g. gpt-oss)",
    "sinks": "attention sinks (sinks)",
    "position_bias": "additive position biases (position_bias, e.g. T5 / relative positions)",
}


def _wants_weights(kwargs: dict) -> bool:
    """Whether the caller asked for attention weights.

    ``output_attentions`` reaches the attention function only when passed as a keyword
    *and* not removed by the model (GPT-2 pops it); transformers' output capturing
    collects the weights through a context variable it sets for the whole forward pass,
    which is the signal every model shares. Read both.
    """
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older / newer transformers: the keyword is all we have
        return False
    collected = _active_collector.get()
    return bool(collected) and any(k in collected for k in ("attentions", "cross_attentions"))


def _refuse_unsupported(module: nn.Module, kwargs: dict, dense_mask: bool) -> None:
    name = type(module).__name__
    for key, what in _UNSUPPORTED.items():
        if kwargs.get(key) is not None:
            raise NotImplementedError(
                f"qkv attention does not support {what}, which {name} uses; load the model "
                f"with attn_implementation='eager' (or 'sdpa')"
            )
    if kwargs.get("cu_seq_lens_q") is not None and not dense_mask:
        raise NotImplementedError(
            f"{name} passes variable-length packed sequences (cu_seq_lens_q) without a mask "
            f"describing them; qkv cannot honour them: pass position_ids for packed inputs "
            f"or use attn_implementation='eager'"
        )


def qkv_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    default_backend: str = "auto",
    **kwargs: object,
) -> tuple[Tensor, Tensor | None]:
    """transformers attention on qkv: structure in, exact (optionally partial) weights out.

    Args:
        module: the model's attention module (read: ``is_causal``, ``sliding_window``,
            ``layer_idx``, ``config``, and ``qkv_backend`` set by :func:`qkv.hf.use`).
        query: ``(B, H, L, d_k)``.
        key: ``(B, H_kv, S, d_k)``; never repeated to H heads (``enable_gqa``).
        value: ``(B, H_kv, S, d_v)``.
        attention_mask: ``None`` or bool key padding ``(B, S')`` with ``S' <= S`` (causal
            and window then come from the layer), or a complete 4-D mask
            ``(B or 1, 1 or H, L, >= S)``, bool or float.
        dropout: dropout on the weights (models pass 0 outside training).
        scaling: score multiplier; ``None`` = ``1 / sqrt(d_k)``.
        is_causal: overrides ``module.is_causal`` (which defaults to True, as in SDPA).
        default_backend: the backend fixed by :func:`qkv.hf.register`.

    Returns:
        ``(output (B, L, H, d_v), weights)``; weights ``(B, H, R, S)`` (``(B, 1, R, S)``
        when averaged; R = L without a row selection) when asked for, else ``None``.
    """
    dense = attention_mask is not None and attention_mask.ndim == 4
    _refuse_unsupported(module, kwargs, dense)
    H, S = query.shape[1], key.shape[-2]

    attn_mask = key_padding = None
    causal, window = False, None
    if dense:
        # Complete on its own (causal part, window and padding included); some model code
        # hands over a mask longer than the keys, as eager slices it: do the same.
        attn_mask = attention_mask[..., :S]
    elif attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            f"qkv attention expects the mask from its own mask function (None, (B, S) key "
            f"padding or a 4-D mask), got shape {tuple(attention_mask.shape)}"
        )
    else:
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        # The flash-attention contract: models pass the layer's window as a keyword (None
        # on full-attention layers); modules that only store it are read as a fallback.
        window = (
            kwargs["sliding_window"]
            if "sliding_window" in kwargs
            else getattr(module, "sliding_window", None)
        )
        if window is not None and not causal:
            raise NotImplementedError(
                f"{type(module).__name__} asks for a non-causal sliding window "
                f"(sliding_window={window}) without a mask; qkv cannot tell its exact "
                f"extent: use attn_implementation='eager'"
            )
        if attention_mask is not None:
            keep = attention_mask.shape[-1]
            if keep < S:
                # Unfilled static-cache slots no query can see (see _mask.qkv_mask).
                key, value = key[:, :, :keep], value[:, :, :keep]
            elif keep > S:
                raise ValueError(f"key padding covers {keep} keys but the layer has S={S}")
            key_padding = attention_mask.to(torch.bool)
            if bool(key_padding.all()):
                key_padding = None  # lets the kernels skip the per-key test

    need = _wants_weights(kwargs)
    selection = current_selection() if need else None
    if selection is not None:
        num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        need = selection.wants_layer(getattr(module, "layer_idx", None), num_layers)
        selection = selection if need else None

    backend = getattr(module, BACKEND_ATTR, None) or default_backend
    result = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        is_causal=causal,
        window=window,
        key_padding_mask=key_padding,
        dropout_p=float(dropout or 0.0),
        scale=scaling,
        enable_gqa=key.shape[1] != H,
        need_weights=need,
        weight_rows=None if selection is None else selection.rows,
        average_heads=selection is not None and selection.average_heads,
        backend=backend,
    )
    if not need:
        return result.transpose(1, 2).contiguous(), None

    weights = result.weights
    if selection is not None and selection.average_heads:
        weights = weights.unsqueeze(1)  # keep (B, heads, rows, keys) indexing
    if weights.shape[-1] < S:
        # Zeros for the dropped static-cache slots: the shape eager returns.
        weights = nn.functional.pad(weights, (0, S - weights.shape[-1]))
    return result.output.transpose(1, 2).contiguous(), weights
