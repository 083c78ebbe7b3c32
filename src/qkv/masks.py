"""Attention masks: what they mean in qkv, and helpers to build and combine them.

Shape legend (used throughout qkv): B batch · H query heads · H_kv key/value heads ·
L query length · S key/value length · d_k query/key width · d_v value width.

Two kinds of mask are accepted wherever a mask is:

* **Boolean** — ``True`` means *may attend*. This is the convention of
  ``torch.nn.functional.scaled_dot_product_attention`` and of Hugging Face's
  ``attention_mask``.
* **Float** — added to the scores before the softmax; ``-inf`` forbids a position.

A mask broadcasts to ``(..., H, L, S)``: its last dimension must be exactly ``S``
(qkv never broadcasts over keys, because a ``(B, S)`` padding mask passed where a
``(L, S)`` mask is expected would otherwise line up ``B`` with ``L``), its
second-to-last is ``L`` or ``1``, and leading dimensions follow torch's broadcasting.

.. warning::
   **Key-padding masks use the same rule: True marks a real token.** This is the
   *opposite* of ``torch.nn.MultiheadAttention``'s ``key_padding_mask``, where True
   marks padding to ignore. Port code from torch with ``~mask``.

Causal masks with ``L != S`` are aligned to the **bottom-right** corner, so that the
last query sits on the last key. This is what decoding with a cache needs: the ``L``
new queries are the last ``L`` positions of a sequence whose ``S`` keys are all known::

    L = 2, S = 5 (offset S - L = 3)      L = 5, S = 2 (offset -3)
              keys 0 1 2 3 4                       keys 0 1
    query 0        x x x x .             query 0        . .   <- no key: zero output
    query 1        x x x x x             query 1        . .
                                         query 2        . .
                                         query 3        x .
                                         query 4        x x

Query ``i`` may attend key ``j`` when ``j <= i + (S - L)``. Causal and sliding-window
masks are both :class:`qkv.Band` objects; the builders below materialise one. A query row with no
allowed key (top rows above, or a fully padded row) produces a zero context vector
and zero weights in every qkv backend; gradients stay finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .band import Band

__all__ = [
    "causal_mask",
    "combine_masks",
    "key_padding_mask",
    "lengths_to_padding_mask",
    "sliding_window_mask",
    "to_additive",
]


def _check_sizes(L: object, S: object) -> None:
    if not isinstance(L, int) or not isinstance(S, int) or L < 1 or S < 1:
        raise ValueError(f"mask sizes must be positive integers, got L={L!r}, S={S!r}")


def causal_mask(L: int, S: int | None = None, *, device=None) -> Tensor:
    """Boolean causal mask, bottom-right aligned: ``(L, S)``, True = may attend.

    >>> causal_mask(2, 4).int()
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    S = L if S is None else S
    _check_sizes(L, S)
    return Band.from_flags(True, None).allowed(L, S, device)


def sliding_window_mask(
    L: int, S: int | None = None, *, window: int, causal: bool = True, device=None
) -> Tensor:
    """Boolean local-attention mask: ``(L, S)``, True = may attend.

    With ``causal=True`` each query sees itself and the ``window - 1`` keys before it
    (bottom-right aligned, like :func:`causal_mask`). With ``causal=False`` it sees
    the keys at distance less than ``window`` on either side.

    >>> sliding_window_mask(4, window=2).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    S = L if S is None else S
    _check_sizes(L, S)
    return Band.from_flags(bool(causal), window).allowed(L, S, device)


def lengths_to_padding_mask(lengths: Tensor | list[int], S: int | None = None) -> Tensor:
    """``(B,)`` sequence lengths to a ``(B, S)`` boolean mask, True = real token.

    >>> lengths_to_padding_mask([2, 3]).int()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    lengths = torch.as_tensor(lengths)
    if lengths.ndim != 1 or lengths.is_floating_point():
        raise ValueError(f"lengths must be a 1-D integer tensor, got shape {tuple(lengths.shape)}")
    S = int(lengths.max()) if S is None else S
    if (lengths < 0).any() or (lengths > S).any():
        raise ValueError(f"lengths must lie in [0, S={S}], got {lengths.tolist()}")
    return torch.arange(S, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def key_padding_mask(mask: Tensor) -> Tensor:
    """Turn a ``(B, S)`` key-padding mask into a ``(B, 1, 1, S)`` attention mask.

    **True (or 1) marks a real token that may be attended** — Hugging Face's
    convention, and the opposite of ``torch.nn.MultiheadAttention``. Integer 0/1
    masks (as tokenizers return them) are accepted; float masks are refused because
    their meaning (additive or 0/1?) cannot be told from the values.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a tensor, got {type(mask).__name__}")
    if mask.ndim != 2:
        raise ValueError(f"key_padding_mask must have shape (B, S), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                f"key_padding_mask must be bool or 0/1 integers (True = real token), got {mask.dtype}"
            )
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("key_padding_mask integer values must be 0 or 1 (1 = real token)")
        mask = mask.bool()
    return mask[:, None, None, :]  # (B, 1, 1, S)


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A boolean mask as a float mask: 0 where allowed, ``-inf`` where not."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    zeros = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zeros, torch.tensor(float("-inf"), dtype=dtype, device=mask.device))


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Combine masks so that a position is allowed only if every mask allows it.

    Boolean masks are AND-ed; if any mask is a float mask, the result is a float
    mask (booleans become 0 / ``-inf``) and the float masks are added. ``None``
    entries are skipped; the result broadcasts like the inputs.

    >>> combine_masks(causal_mask(2), torch.tensor([True, False])).int()
    tensor([[1, 0],
            [1, 0]], dtype=torch.int32)
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    if all(m.dtype == torch.bool for m in present):
        out = present[0]
        for m in present[1:]:
            out = out & m
        return out
    dtype = next(m.dtype for m in present if m.dtype != torch.bool)
    out = to_additive(present[0], dtype)
    for m in present[1:]:
        out = out + to_additive(m, dtype)
    return out
