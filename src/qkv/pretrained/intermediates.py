"""Typed intermediates of an encoder run: what visualisation and teaching need.

Shape legend: B batch · H heads · L tokens (queries) · S tokens (keys; S = L in an
encoder) · d_model width · d_k = d_v = d_model / H per head. Layers are indexed from 0
in Python (``layers[0]`` is the first block); the command line counts them from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenizer import TokenizedText

__all__ = ["EncoderIntermediates", "LayerIntermediates"]


@dataclass(frozen=True)
class LayerIntermediates:
    """One encoder block's attention, head by head, and the block's output.

    The attention fields are the block's :meth:`qkv.MultiHeadAttention.forward_intermediates`
    (:class:`qkv.modules.AttentionIntermediates`) under the names the explorer uses.

    Attributes:
        queries: ``(B, H, L, d_k)`` = ``q_proj(x)`` split into heads.
        keys: ``(B, H, S, d_k)``.
        values: ``(B, H, S, d_v)``.
        weights: ``(B, H, L, S)`` softmax weights; rows sum to 1 over real keys, padded
            keys get 0.
        context: ``(B, H, L, d_v)`` = ``weights @ values``, before the heads are
            concatenated and mixed by ``out_proj``.
        attention_output: ``(B, L, d_model)``, the attention module's output.
        hidden: ``(B, L, d_model)``, the block's output (after both LayerNorms).
    """

    queries: Tensor
    keys: Tensor
    values: Tensor
    weights: Tensor
    context: Tensor
    attention_output: Tensor
    hidden: Tensor


@dataclass(frozen=True)
class EncoderIntermediates:
    """Everything an encoder run computed.

    Attributes:
        input_ids: ``(B, L)`` token ids.
        attention_mask: ``(B, L)`` bool, True = real token.
        embeddings: ``(B, L, d_model)``, the input embeddings (word + position +
            token type, after the embedding LayerNorm): what the first block reads.
        layers: one :class:`LayerIntermediates` per block.
        texts: the tokenised texts, one per batch row, when the run started from text.
    """

    input_ids: Tensor
    attention_mask: Tensor
    embeddings: Tensor
    layers: tuple[LayerIntermediates, ...]
    texts: tuple[TokenizedText, ...] = ()

    @property
    def last_hidden(self) -> Tensor:
        """``(B, L, d_model)``, the final token vectors."""
        return self.layers[-1].hidden if self.layers else self.embeddings

    def hidden_states(self) -> Tensor:
        """``(n_layers + 1, B, L, d_model)``: the embeddings, then each block's output."""
        return torch.stack([self.embeddings, *(lay.hidden for lay in self.layers)])

    def attention_weights(self) -> Tensor:
        """``(n_layers, B, H, L, S)``: every block's weights."""
        return torch.stack([lay.weights for lay in self.layers])
