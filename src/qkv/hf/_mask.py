"""The mask function qkv registers with transformers' ``AttentionMaskInterface``.

Shape legend: B batch · L query length · S key/value length.

transformers builds one mask per forward pass (``create_causal_mask`` and friends) by
calling the function registered under the model's ``attn_implementation`` with sizes,
offsets, the 2-D padding mask and a *mask function* describing the pattern. qkv's kernels
do best with structure, not a dense (B, 1, L, S) tensor, so this function returns, in the
spirit of the flash-attention contract:

* ``None`` — nothing to mask beyond the pattern the layer itself knows (causal from
  ``is_causal``, sliding window from ``sliding_window``), and query/key positions are
  aligned bottom-right, as qkv's ``is_causal`` / ``window`` assume;
* a bool ``(B, S')`` tensor, ``S' <= S`` — key padding (True = real key) for the first
  ``S'`` keys. ``S' < S`` says the keys after ``S'`` are unfilled static-cache slots that no
  query can see: the attention function drops them, which also turns the cache's
  top-left geometry into qkv's bottom-right one;
* a bool ``(B, 1, L, S)`` tensor — the complete mask, whenever the pattern is not one qkv
  can express structurally (chunked attention, packed sequences, block overlays, custom
  ``and``/``or`` mask functions, two-sided sliding windows) or the caller asked for a
  materialised mask (``allow_is_causal_skip=False``: some models concatenate masks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import masking_utils as mu

__all__ = ["Pattern", "qkv_mask", "recognise"]

# Code objects of the closures transformers builds for a causal sliding window; comparing
# code (not names) means a change in transformers makes recognition fail, and a failed
# recognition only costs a dense mask, never a wrong one.
_AND_CODE = mu.and_masks(mu.causal_mask_function).__code__
_SLIDING_CODE = mu.sliding_window_overlay(1).__code__


@dataclass(frozen=True)
class Pattern:
    """A mask pattern qkv can pass as structure: causal or not, optional causal window."""

    causal: bool
    window: int | None = None


def recognise(mask_function: Callable) -> Pattern | None:
    """The :class:`Pattern` of one of transformers' plain mask functions, else ``None``."""
    if mask_function is mu.causal_mask_function:
        return Pattern(causal=True)
    if mask_function is mu.bidirectional_mask_function:
        return Pattern(causal=False)
    window = _sliding_window(mask_function)
    return None if window is None else Pattern(causal=True, window=window)


def _sliding_window(fn: Callable) -> int | None:
    """``w`` when ``fn`` is ``sliding_window_causal_mask_function(w)``, else ``None``."""
    if getattr(fn, "__code__", None) is not _AND_CODE:
        return None
    parts = inspect.getclosurevars(fn).nonlocals.get("mask_functions", ())
    if len(parts) != 2 or parts[1] is not mu.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__code__", None) is not _SLIDING_CODE:
        return None
    window = inspect.getclosurevars(overlay).nonlocals.get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None


def _tracing(*tensors: object) -> bool:
    """Under torch.compile / export reading mask values or offsets would break the graph."""
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(t, Tensor) and mu.is_tracing(t) for t in tensors)


def qkv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = mu.causal_mask_function,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: object,
) -> Tensor | None:
    """Structure where possible, the dense bool mask where not (see the module docstring).

    Args mirror transformers' ``sdpa_mask``: ``attention_mask`` is the 2-D padding mask
    ``(B, kv_offset + S)`` or shorter (True = real token); ``q_offset`` / ``kv_offset``
    are the absolute positions of the first query / key.

    Returns:
        ``None``, bool ``(B, S')`` key padding with ``S' <= S``, or bool ``(B, 1, L, S)``.
    """

    def dense() -> Tensor:
        return mu.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=use_vmap,
            device=device,
        )

    pattern = recognise(mask_function)
    if pattern is None or _tracing(attention_mask, q_offset):
        return dense()
    # The model asked for a tensor it can build on (e.g. concatenate): give it one.
    skip_allowed = allow_is_causal_skip if pattern.causal else allow_is_bidirectional_skip
    if not skip_allowed:
        return dense()

    q_offset = int(q_offset)  # static caches hand over a 0-d tensor
    if pattern.causal:
        # Absolute positions: query i at q_offset + i, key j at kv_offset + j. Keys past the
        # last query's position are never visible to a causal query; keeping only the
        # S' = q_offset - kv_offset + L keys before them makes S' - L equal the true
        # diagonal offset, which is exactly qkv's bottom-right alignment.
        keep = q_offset - kv_offset + q_length
        if not 0 < keep <= kv_length:
            return dense()  # a geometry we do not know; the dense mask is always right
    else:
        keep = kv_length  # no band: nothing to align

    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset : kv_offset + keep].to(device=device, dtype=torch.bool)
        if padding.shape[-1] != keep:  # a 2-D mask shorter than the keys it must cover
            return dense()
        if keep == kv_length and bool(padding.all()):
            padding = None
    if padding is None:
        if keep == kv_length:
            return None
        padding = torch.ones(batch_size, keep, dtype=torch.bool, device=device)
    return padding
