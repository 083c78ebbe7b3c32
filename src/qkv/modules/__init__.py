"""nn.Module layers built on qkv's functional attention."""

from .multihead import MultiHeadAttention
from .self_attention import SelfAttention

__all__ = ["MultiHeadAttention", "SelfAttention"]
