"""Multi-head attention with grouped-query heads, cross-attention and a KV cache."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, TypedDict

import torch.nn as nn
from torch import Tensor

from .. import _checks as C
from ..backends import make_request
from ..backends.dispatch import run
from ..cache import KVCache
from ..config import AttentionConfig, Projections
from ..distributed.context import current_context_parallel
from ..result import AttentionResult
from .intermediates import AttentionIntermediates

if TYPE_CHECKING:  # typing.Unpack is 3.11+; annotations are not evaluated at run time
    from typing_extensions import Unpack

__all__ = ["AttendOptions", "MultiHeadAttention"]


class AttendOptions(TypedDict, total=False):
    """The per-call options :meth:`MultiHeadAttention.forward` and
    :meth:`~MultiHeadAttention.forward_intermediates` share (see ``forward``)."""

    attn_mask: Tensor | None
    key_padding_mask: Tensor | None
    is_causal: bool | None
    cache: KVCache | None


def _projection(learned: bool, d_in: int, d_out: int, bias: bool) -> nn.Module:
    """``nn.Linear(d_in, d_out)`` if ``learned``, else ``nn.Identity`` (then d_in == d_out)."""
    # Built even when not learned: the layer's construction then draws the same random
    # numbers whatever ``projections`` says, so models seeded alike start with the same
    # weights everywhere else and differ only in the projections compared.
    linear = nn.Linear(d_in, d_out, bias=bias)
    return linear if learned else nn.Identity()


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch first, drop-in for ``nn.MultiheadAttention``'s math.

    H heads of width ``d_k = d_model / H`` attend in parallel; their outputs are
    concatenated and mixed by ``out_proj``. With ``num_kv_heads < num_heads`` several
    query heads share one key/value head (grouped-query; 1 = multi-query), which
    shrinks ``k_proj``, ``v_proj`` and the KV cache.

    Every setting lives in one :class:`qkv.AttentionConfig` (:attr:`config`). Build from
    one with :meth:`from_config`, or pass its fields as keywords (same names, validated
    there): ``MultiHeadAttention(64, 4, causal=True)`` equals
    ``MultiHeadAttention.from_config(AttentionConfig(64, 4, causal=True))``.

    Parameters: ``q_proj`` (d_model -> d_model), ``k_proj`` (kdim -> H_kv * d_k),
    ``v_proj`` (vdim -> H_kv * d_k), ``out_proj`` (d_model -> d_model). With
    ``projections="qk"`` the value and output projections, with ``"fixed"`` all four,
    are ``nn.Identity`` (see :attr:`projections`).
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
        projections: Projections = "trainable",
    ) -> None:
        super().__init__()
        self._build(
            AttentionConfig(
                d_model=d_model,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                kdim=kdim,
                vdim=vdim,
                bias=bias,
                dropout=dropout,
                causal=causal,
                backend=backend,
                projections=projections,
            )
        )

    @classmethod
    def from_config(cls, cfg: AttentionConfig) -> MultiHeadAttention:
        """The layer ``cfg`` describes (``cfg`` becomes its :attr:`config`)."""
        if not isinstance(cfg, AttentionConfig):
            raise TypeError(f"cfg must be a qkv.AttentionConfig, got {type(cfg).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(cfg)
        return layer

    def _build(self, cfg: AttentionConfig) -> None:
        self._config = cfg
        learned = cfg.learned_projections
        d, kv_width = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.q_proj = _projection("q_proj" in learned, d, d, cfg.bias)
        self.k_proj = _projection("k_proj" in learned, cfg.kdim or d, kv_width, cfg.bias)
        self.v_proj = _projection("v_proj" in learned, cfg.vdim or d, kv_width, cfg.bias)
        self.out_proj = _projection("out_proj" in learned, d, d, cfg.bias)

    @property
    def config(self) -> AttentionConfig:
        """The layer's settings (frozen; change the backend with :meth:`set_backend`)."""
        return self._config

    @property
    def projections(self) -> Projections:
        """Which projections are learned: ``"fixed"`` (none), ``"qk"`` (W_Q and W_K)
        or ``"trainable"`` (all four); the others are ``nn.Identity``."""
        return self._config.projections

    @property
    def backend(self) -> str:
        """The attention backend name, or ``"auto"``."""
        return self._config.backend

    def set_backend(self, backend: str) -> MultiHeadAttention:
        """Run later calls on ``backend`` (a registered name or ``"auto"``); returns self.

        The name is validated (``ValueError`` listing the known ones); the weights and
        every other setting stay as they are.
        """
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self._config = dataclasses.replace(self._config, backend=backend)
        return self

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
        _, _, _, heads = self._attend(
            query,
            key,
            value,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            need_weights=need_weights,
            average_weights=average_weights,
            cache=cache,
        )
        out = self._merge_heads(heads.output)  # (B, L, d_model)
        if not need_weights:
            return out
        return AttentionResult(out, heads.weights, heads.backend, heads.lse)

    def forward_intermediates(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        **options: Unpack[AttendOptions],
    ) -> AttentionIntermediates:
        """Like :meth:`forward`, keeping every head's queries, keys, values, weights
        ``(B, H, L, S)`` and context vectors ``(B, H, L, d_v)`` next to the output
        ``(B, L, d_model)``; see :class:`~qkv.modules.AttentionIntermediates`.

        Takes ``forward``'s arguments and checks (``attn_mask``, ``key_padding_mask``,
        ``is_causal``, ``cache``: :class:`AttendOptions`) except the weights flags:
        the weights are always kept, per head. The output equals ``forward``'s with
        ``need_weights=True``.
        """
        unknown = sorted(set(options) - set(AttendOptions.__annotations__))
        if unknown:
            raise TypeError(f"forward_intermediates got unexpected arguments {unknown}")
        q, k, v, heads = self._attend(
            query, key, value, need_weights=True, average_weights=False, **options
        )
        out = self._merge_heads(heads.output)  # (B, L, d_model)
        return AttentionIntermediates(q, k, v, heads.weights, heads.output, out, heads.backend)

    def _merge_heads(self, context: Tensor) -> Tensor:
        """``(B, H, L, d_v)`` -> concatenate heads -> ``out_proj`` -> ``(B, L, d_model)``."""
        B, _, L, _ = context.shape
        return self.out_proj(context.transpose(1, 2).reshape(B, L, self._config.d_model))

    def _attend(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        *,
        need_weights: bool,
        average_weights: bool,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, AttentionResult]:
        """Check, project, split into heads and attend: ``(q, k, v, heads)`` with
        q ``(B, H, L, d_k)``, k/v ``(B, H_kv, S, d)`` (past + new with a cache) and the
        heads' result (output ``(B, H, L, d_v)``), before the heads are merged."""
        cfg = self._config
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
            # No weights were asked for (refused above), so only the output is read.
            return q, k, v, AttentionResult(out, None, "ring")
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
        result = run(request, cfg.backend)  # output (B, H, L, d_v)
        if cache is not None:
            cache.commit()
        return q, k, v, result

    def extra_repr(self) -> str:
        c = self._config
        text = (
            f"d_model={c.d_model}, num_heads={c.num_heads}, num_kv_heads={c.kv_heads}, "
            f"causal={c.causal}, backend={c.backend!r}"
        )
        # Only when it differs from the standard layer, so existing reprs read as before.
        return text if c.projections == "trainable" else f"{text}, projections={c.projections!r}"
