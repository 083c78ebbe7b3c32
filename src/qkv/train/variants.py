"""The three attention variants compared by the experiment.

Shape legend: B batch · H heads · L query length · S key/value length ·
d_model embedding width · d_k = d_v = d_model / H width per head.

Every variant is a :class:`qkv.MultiHeadAttention`; they differ only in which of its
four projections are learned, which the layer's own ``projections`` setting
(:class:`qkv.AttentionConfig`) says: a variant's name *is* that setting. A projection
that is not learned is ``nn.Identity``, so the input is split into heads as it is, and everything else
(head count, the ``1 / sqrt(d_k)`` scale, masks, the KV cache, the backend) is the
same code path::

    variant     queries      keys         values (and output mixing)   parameters
    fixed       x            x            x                            0
    qk          x W_Q        x W_K        x                            2 d_model²
    trainable   x W_Q        x W_K        x W_V, then W_O              4 d_model²

``fixed`` is the seeds' untrained baseline applied per head: each token's query, key
and value are slices of the block input itself, so the weights only reuse the
similarity already present in the (learned) residual stream. ``trainable`` is the
standard layer. ``W_O`` is counted with the value path: without ``W_V``, an output
projection alone would already give each head a learned value map
(``W_O · concat(heads) = Σ_h W_O^h · head_h``), so ``qk`` must drop both to keep its
values unchanged.

The models feed attention a LayerNorm *without* a learned gain, in every variant:
a gain would act as a shared diagonal ``W_Q = W_K = W_V`` and leak a projection into
``fixed``.
"""

from __future__ import annotations

from ..config import LEARNED_PROJECTIONS, PROJECTIONS, AttentionConfig, Projections
from ..modules import MultiHeadAttention

__all__ = ["VARIANTS", "Variant", "check_variant", "make_attention", "projection_names"]

#: A variant is an :class:`qkv.AttentionConfig` ``projections`` setting.
Variant = Projections

#: Attention variants, from no learned projection to all of them.
VARIANTS: tuple[str, ...] = PROJECTIONS


def check_variant(variant: object) -> str:
    """Return ``variant`` if it names a variant, else raise ``ValueError`` listing them."""
    # Checked here too (not only by AttentionConfig) for the message: the training
    # configs and the CLI call the setting "attention variant".
    if not isinstance(variant, str) or variant not in LEARNED_PROJECTIONS:
        raise ValueError(f"attention variant must be one of {list(VARIANTS)}, got {variant!r}")
    return str(variant)


def projection_names(variant: str) -> tuple[str, ...]:
    """Names of the projections that ``variant`` learns (``()`` for ``fixed``)."""
    return LEARNED_PROJECTIONS[check_variant(variant)]


def make_attention(
    variant: str, d_model: int, num_heads: int, *, causal: bool, backend: str = "auto"
) -> MultiHeadAttention:
    """A multi-head attention layer ``(B, L, d_model) -> (B, L, d_model)`` of the given variant.

    Args:
        variant: ``"fixed"``, ``"qk"`` or ``"trainable"`` (see the module docstring).
        d_model: embedding width, divisible by ``num_heads``.
        num_heads: H; each head sees ``d_k = d_model / H`` of the width.
        causal: whether the layer masks future positions by default.
        backend: attention backend name or ``"auto"``.

    >>> [sum(p.numel() for p in make_attention(v, 8, 2, causal=True).parameters())
    ...  for v in VARIANTS]
    [0, 128, 256]
    """
    projections = check_variant(variant)
    # Biases off: they would be extra learned terms outside the projections compared.
    kw = dict(bias=False, causal=causal, backend=backend, projections=projections)
    return MultiHeadAttention.from_config(AttentionConfig(d_model, num_heads, **kw))
