"""qkv: self-attention, from the untrained baseline to fast exact kernels.

Shape legend used in every docstring: B batch · H query heads · H_kv key/value
heads · L query length · S key/value length · d_model embedding width · d_k
query/key width per head · d_v value width per head. Boolean masks: True = may
attend; float masks are added to the scores.
"""

from . import backends, masks
from .backends import AttentionRequest, get_backend, register_backend
from .backends.dispatch import use_backend
from .band import Band
from .cache import KVCache
from .config import AttentionConfig
from .functional import scaled_dot_product_attention, simple_attention
from .modules import MultiHeadAttention, SelfAttention
from .result import AttentionResult

__version__ = "0.1.0"


__all__ = [
    "AttentionConfig",
    "AttentionRequest",
    "AttentionResult",
    "Band",
    "KVCache",
    "MultiHeadAttention",
    "SelfAttention",
    "backends",
    "get_backend",
    "masks",
    "register_backend",
    "scaled_dot_product_attention",
    "simple_attention",
    "use_backend",
]
