"""Multi-head attention with grouped-query heads, cross-attention and a KV cache."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .. import _checks as C
from ..backends import make_request
from ..backends.dispatch import run
from ..cache import KVCache
from ..config import AttentionConfig
from ..distributed.context import current_context_parallel
from ..result import AttentionResult

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch first, drop-in for ``nn.MultiheadAttention``'s math.

    H heads of width ``d_k = d_model / H`` attend in parallel; their outputs are
    concatenated and mixed by ``out_proj``. With ``num_kv_heads < num_heads`` several
    query heads share one key/value head (grouped-query; 1 = multi-query), which
    shrinks ``k_proj``, ``v_proj`` and the KV cache.

    Args: see :class:`qkv.AttentionConfig` (same names, validated there).

    Parameters: ``q_proj`` (d_model -> d_model), ``k_proj`` (kdim -> H_kv * d_k),
    ``v_proj`` (vdim -> H_kv * d_k), ``out_proj`` (d_model -> d_model).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        cfg = AttentionConfig(
            d_model, num_heads, num_kv_heads, kdim, vdim, bias, dropout, causal, backend
        )
        self.config = cfg
        kv_width = cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(cfg.kdim or d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(cfg.vdim or d_model, kv_width, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    @classmethod
    def from_config(cls, cfg: AttentionConfig) -> MultiHeadAttention:
        return cls(
            cfg.d_model,
            cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            kdim=cfg.kdim,
            vdim=cfg.vdim,
            bias=cfg.bias,
            dropout=cfg.dropout,
            causal=cfg.causal,
            backend=cfg.backend,
        )

    def _check_input(self, name: str, x: object, width: int, B: int | None) -> Tensor:
        x = C.check_float_tensor(name, x)
        if x.ndim != 3 or x.shape[-1] != width or (B is not None and x.shape[0] != B):
            want = f"({'B' if B is None else B}, length, {width})"
            raise ValueError(f"{name} must have shape {want}, got {C.shape(x)}")
        return x

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        average_weights: bool = True,
        cache: KVCache | None = None,
    ) -> Tensor | AttentionResult:
        """Attend from ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Args:
            query: ``(B, L, d_model)``.
            key: ``(B, S, kdim)``, default ``query``; value: ``(B, S, vdim)``, default ``key``.
            attn_mask: bool (True = may attend) or float, broadcastable to (B, H, L, S).
            key_padding_mask: ``(B, S)``, **True / 1 = real token that may be attended**
                (Hugging Face's convention). ``torch.nn.MultiheadAttention`` uses the
                OPPOSITE (True = padding): pass ``~mask`` when porting from it. With a
                cache, it covers all S cached + new keys.
            is_causal: override the module's ``causal`` for this call.
            need_weights: also return the weights (before dropout).
            average_weights: average them over heads, (B, L, S); else (B, H, L, S).
            cache: a :class:`qkv.KVCache`; new keys/values are appended and the query
                attends to everything cached (causal masks align bottom-right).

        Returns:
            ``(B, L, d_model)``, or an :class:`~qkv.AttentionResult` ``(output, weights)``.
        """
        cfg = self.config
        query = self._check_input("query", query, cfg.d_model, None)
        B, L, _ = query.shape
        key = query if key is None else self._check_input("key", key, cfg.kdim or cfg.d_model, B)
        if value is None:
            value = key
        value = self._check_input("value", value, cfg.vdim or cfg.d_model, B)
        C.check_same_dtype_device(query=query, key=key, value=value)
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key {C.shape(key)} and value {C.shape(value)} differ in length S")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a qkv.KVCache, got {type(cache).__name__}")
        H, H_kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim

        q = self.q_proj(query).view(B, L, H, d).transpose(1, 2)  # (B, H, L, d_k)
        k = self.k_proj(key).view(B, -1, H_kv, d).transpose(1, 2)  # (B, H_kv, S_new, d_k)
        v = self.v_proj(value).view(B, -1, H_kv, d).transpose(1, 2)  # (B, H_kv, S_new, d_v)

        causal = cfg.causal if is_causal is None else is_causal
        sharded = current_context_parallel()
        if sharded is not None:
            # Inside qkv.distributed.context_parallel: the input is this rank's shard.
            plain = key is query and value is key
            extras = attn_mask, key_padding_mask, cache
            if not plain or any(x is not None for x in extras) or need_weights:
                raise ValueError(
                    "inside qkv.distributed.context_parallel only plain self-attention runs "
                    "sharded: no key/value of its own, attn_mask, key_padding_mask, cache or "
                    "need_weights (each would need the whole sequence)"
                )
            if self.training and cfg.dropout > 0:
                raise ValueError("context parallel attention has no dropout; set dropout=0")
            from ..distributed.ring import ring_attention

            out = ring_attention(
                q,
                k,
                v,
                is_causal=causal,
                enable_gqa=True,
                group=sharded.group,
                layout=sharded.layout,
            )  # (B, H, L, d_v): this rank's shard of the whole sequence's attention
            return self.out_proj(out.transpose(1, 2).reshape(B, L, cfg.d_model))
        # Masks are checked by make_request; the cache is only committed after success.
        if cache is not None:
            # Staged, not committed: a call refused below leaves the cache unchanged.
            k, v = cache.stage(k, v)  # (B, H_kv, S, d): past + new
        request = make_request(
            q,
            k,
            v,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,  # kept structured: no dense (B, L, S) mask
            is_causal=causal,
            dropout_p=cfg.dropout if self.training else 0.0,
            enable_gqa=True,
            need_weights=need_weights,
            average_heads=need_weights and average_weights,
        )
        result = run(request, cfg.backend)
        if cache is not None:
            cache.commit()
        out = result.output.transpose(1, 2).reshape(B, L, cfg.d_model)  # (B, L, H * d_v)
        out = self.out_proj(out)  # (B, L, d_model)
        if not need_weights:
            return out
        return AttentionResult(out, result.weights, result.backend, result.lse)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c.d_model}, num_heads={c.num_heads}, num_kv_heads={c.kv_heads}, "
            f"causal={c.causal}, backend={c.backend!r}"
        )
