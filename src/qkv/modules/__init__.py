"""nn.Module layers built on qkv's functional attention."""

from .intermediates import AttentionIntermediates
from .multihead import MultiHeadAttention
from .self_attention import SelfAttention

__all__ = ["AttentionIntermediates", "MultiHeadAttention", "SelfAttention"]
