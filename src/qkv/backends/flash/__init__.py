"""The ``"flash"`` backend: qkv's own tiled attention, linear memory, exact weights.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.

The folder holds two implementations of one schedule (FlashAttention-2's), which
compute exactly the reference (:mod:`..reference`):

* ``csrc/`` + :mod:`.compiled` + :mod:`.native`: a C++ kernel on ATen, built on first
  use into a cache folder, used for CPU tensors without dropout. See
  ``csrc/flash_attention.cpp`` for its tiles, threads and half-precision rules.
* :mod:`.loops` + :mod:`.tiles` + :mod:`.pool`: the same tiles written with PyTorch
  ops, used on other devices, with dropout, and wherever the C++ kernel could not be
  built (one warning is logged; ``QKV_NO_COMPILE=1`` forces it, and CI runs the flash
  tests on both). :class:`FlashConfig` tunes this path only.

The PyTorch-level loops, per tile of ``block_q`` query rows x ``block_k`` keys::

    s = (q_tile * scale) @ k_tileᵀ           (h, g * block_q, block_k)
    s = mask(s)                             slices of the caller's mask; band if cut
    p = softmax(s) in place                 m = rowmax(s), 1/Z = rowmax(p)
    o_tile = p @ v_tile,  lse_tile = m + log Z

and the tiles of a row are merged by their log-sum-exp (the online softmax, done once
per group of up to 32 tiles instead of once per tile, which saves small ops):
``lse = logsumexp_t(lse_t)``, ``o = sum_t exp(lse_t - lse) * o_tile``. When one tile
holds every key a row sees, ``p @ v`` is already the answer.

* **Backward** (its own ``torch.autograd.Function``) recomputes each tile's
  probabilities ``exp(s - lse)`` from the saved ``lse`` instead of storing them
  (FlashAttention-2: ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``), so training memory
  is linear in length too. See :func:`.loops.backward`.
* **Weights** (``need_weights=True``) are recomputed tile by tile against ``lse`` for
  the requested rows only, averaged over heads inside each tile when asked: the result
  tensor is the only ``S``-wide thing allocated.
* **Masks**: bool or float, any broadcastable shape; each tile slices the caller's
  tensor (a broadcast view stays a view). Causal and sliding-window masks are bottom-right
  aligned; tiles entirely outside them are skipped, tiles entirely inside them get no
  mask at all. Rows with no allowed key give zero output, zero weights, zero gradients.
* **Grouped-query attention**: the ``g = H // H_kv`` query heads of a group are stacked
  as rows of one matmul against their shared key/value head; K/V are never repeated.
* **Dtypes**: float64 computes in float64, float32 in float32; bfloat16 and float16
  inputs are upcast to float32 (scores, softmax and products), like the reference's
  float32 scores, and the output is rounded back once. Float masks are added in the
  compute dtype (:mod:`qkv.masks`).
* **Threads**: on the CPU, tiles are handed to ``torch.get_num_threads()`` worker
  threads whose ops each run on one core (:mod:`.pool`). Backward sums its per-thread
  dK/dV partials in a fixed order, so results are bitwise reproducible.
* **Dropout** is applied tile by tile with masks drawn from a generator seeded by the
  call's seed and the tile position, so backward regenerates them; the seed comes from
  PyTorch's global generator (``torch.manual_seed`` makes runs repeatable). The dropout
  pattern differs from the reference's (a different random stream), not its law.

Limits: no gradient for a float ``attn_mask`` (such requests are refused, so ``"auto"``
uses another backend); no double backward. ``AttentionResult.lse`` is returned when
weights or gradients are requested (``None`` otherwise: inference with one tile per row
skips the statistics); in float32 it is accurate to about 1e-6, because the tile
softmax uses PyTorch's fast vectorised ``exp``. Weights are renormalised with an
accurate ``exp`` and match the reference to float32 rounding.

Tile sizes and threads come from :class:`FlashConfig` (``None``: chosen from the request,
see :func:`tile_sizes`); override them with :func:`flash_config`::

    with qkv.backends.flash.flash_config(block_q=128, block_k=256):
        out = qkv.scaled_dot_product_attention(q, k, v, backend="flash")
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ...result import AttentionResult
from ..registry import register_backend
from ..request import AttentionRequest
from . import compiled
from . import loops as kernels
from .native import native_attention
from .tiles import Tiling

__all__ = [
    "FlashConfig",
    "TileSizes",
    "flash_attention",
    "flash_config",
    "get_flash_config",
    "tile_sizes",
]


@dataclass(frozen=True)
class FlashConfig:
    """Tiling and threading of the ``"flash"`` backend (``None``: chosen per request).

    Attributes:
        block_q: query rows per tile (per head); default 256, fewer (down to 64) when
            the tiles are long rows of more than 2048 keys.
        block_k: keys per tile; default: for inference without a causal or window band
            and ``S <= 4096``, all ``S`` keys (one tile per row needs no online-softmax
            statistics at all), else 512.
        heads: key/value heads per tile; default: as many as keep a tile near
            ``tile_elements`` scores (each head brings its ``g = H // H_kv`` query heads).
        tile_elements: target scores per tile, so that one tile stays in a core's cache
            while each matmul stays large.
        threads: worker threads on the CPU (each runs its ops on one core); default
            ``torch.get_num_threads()``. 1 runs everything in the calling thread.
        compiled: use the compiled CPU kernel (``None``: whenever it can serve the
            request; ``False``: always the PyTorch-level loops, which the other fields
            tune; ``True``: require it, raising if it is unavailable).
    """

    block_q: int | None = None
    block_k: int | None = None
    heads: int | None = None
    tile_elements: int = 1 << 18
    threads: int | None = None
    compiled: bool | None = None

    def __post_init__(self) -> None:
        if self.compiled is not None and not isinstance(self.compiled, bool):
            raise ValueError(f"FlashConfig.compiled must be None or a bool, got {self.compiled!r}")
        for name in ("block_q", "block_k", "heads", "tile_elements", "threads"):
            value = getattr(self, name)
            if value is None and name != "tile_elements":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FlashConfig.{name} must be a positive integer, got {value!r}")


_FIELDS = ("block_q", "block_k", "heads", "tile_elements", "threads", "compiled")
_DEFAULT = FlashConfig()
_CONFIG: contextvars.ContextVar[FlashConfig | None] = contextvars.ContextVar(
    "qkv_flash_config", default=None
)


def get_flash_config() -> FlashConfig:
    """The configuration in effect (the default, or the innermost :func:`flash_config`)."""
    return _CONFIG.get() or _DEFAULT


@contextlib.contextmanager
def flash_config(
    config: FlashConfig | None = None, **overrides: int | None
) -> Iterator[FlashConfig]:
    """Use another configuration inside a ``with`` block: a :class:`FlashConfig`, or fields
    of the current one to override (``flash_config(block_q=64, threads=1)``)."""
    if config is not None and not isinstance(config, FlashConfig):
        raise TypeError(f"config must be a FlashConfig, got {type(config).__name__}")
    unknown = set(overrides) - set(_FIELDS)
    if unknown:
        raise TypeError(f"flash_config got unknown fields {sorted(unknown)}; known: {_FIELDS}")
    base = config or get_flash_config()
    new = FlashConfig(**{**{f: getattr(base, f) for f in _FIELDS}, **overrides})
    token = _CONFIG.set(new)
    try:
        yield new
    finally:
        _CONFIG.reset(token)


class TileSizes(NamedTuple):
    """The tiling of one request: see :class:`FlashConfig` for each field."""

    block_q: int
    block_k: int
    heads: int
    threads: int


def tile_sizes(request: AttentionRequest, config: FlashConfig | None = None) -> TileSizes:
    """The tiling ``"flash"`` uses for a request under ``config`` (default: the current one).

    Defaults, measured on this project's 2-core AVX-512 CPU: tiles of 256 query rows x
    512 keys, or of all keys for inference (up to 4096 keys and no causal or window band;
    then up to 2**19 scores per tile: 128 rows x 4096 keys), with as many
    key/value heads as keep a tile near ``tile_elements`` scores, on
    ``torch.get_num_threads()`` threads for CPU tensors with at least 2**20 scores in
    all (one thread otherwise: handing out tiny items costs more than it saves).
    """
    c = config or get_flash_config()
    r = request
    # One tile per row pays off for inference (no statistics, no merging); training
    # needs the statistics anyway and its backward runs faster on 512-key tiles.
    one_tile = not r.needs_grad and not r.causal and r.window is None and r.S <= _ONE_TILE_MAX_KEYS
    block_k = min(c.block_k or (r.S if one_tile else 512), r.S)
    # Long one-tile rows get fewer of them per tile: a tile stays near 2**19 scores
    # (2 MiB in float32) per thread, which keeps peak memory within 2x of SDPA's.
    default_q = max(64, min(256, _ONE_TILE_SCORES // (r.group * block_k)))
    block_q = min(c.block_q or default_q, r.L)
    heads = c.heads or max(1, c.tile_elements // (r.group * block_q * block_k))
    heads = min(heads, r.H_kv)
    threads = c.threads
    if threads is None:
        big = math.prod(r.batch_shape) * r.H * r.L * r.S >= _THREADED_MIN_SCORES
        threads = torch.get_num_threads() if r.device.type == "cpu" and big else 1
    return TileSizes(block_q, block_k, heads, threads)


#: Up to this many keys, a row's keys share one tile by default (no band).
_ONE_TILE_MAX_KEYS = 4096
#: Scores in a default tile when query rows are chosen to fit it (one tile per row).
_ONE_TILE_SCORES = 1 << 19
#: Below this many scores in all, one thread beats handing work to several.
_THREADED_MIN_SCORES = 1 << 20


class _FlashFunction(torch.autograd.Function):
    """Autograd for the tiled kernels: saves q, k, v, output and lse — nothing of size L x S.

    Half-precision inputs are upcast to float32 for training (linear memory): scores,
    probabilities and every gradient product are then float32, so gradients are more
    accurate than the half-precision reference's rather than merely as good, at float32
    speed. (Half-precision scores would make the error of the recomputed probabilities,
    not the kernel, dominate the gradients.)
    """

    @staticmethod
    def forward(ctx, q, k, v, tiling, scale, dropout_p, seed):
        dtype = q.dtype
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out, lse = kernels.forward(tiling, q, k, v, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiling, ctx.scale, ctx.dropout_p, ctx.seed = tiling, scale, dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out.to(dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = kernels.backward(
            ctx.tiling, q, k, v, out, lse, dout.to(q.dtype), ctx.scale, ctx.dropout_p, ctx.seed
        )
        dtype = dout.dtype
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None


def _supports(request: AttentionRequest) -> str | None:
    r = request
    m = r.attn_mask
    if m is not None and m.requires_grad and torch.is_grad_enabled():
        return "flash computes no gradient for a float attn_mask that requires grad"
    if r.need_weights and r.needs_grad:
        # The weights are recomputed from the saved log-sum-exp outside autograd; a loss
        # on them would silently lose its gradient, so such requests go elsewhere.
        return "flash weights are not differentiable; weights with gradients need 'reference'"
    return None


@register_backend(
    "flash",
    supports=_supports,
    description=(
        "qkv's tiled kernel (compiled C++ on the CPU, PyTorch loops elsewhere); any mask, "
        "linear memory, exact weights on demand"
    ),
)
def flash_attention(request: AttentionRequest) -> AttentionResult:
    r = request
    want = get_flash_config().compiled
    if want is not False and r.device.type == "cpu" and r.dropout_p == 0:
        if compiled.available():
            return native_attention(r)
        if want:
            raise RuntimeError(
                f"the compiled flash kernel is unavailable: {compiled.build_error()}"
            )
    # Elsewhere, with dropout, or where the kernel could not be built (compiled.load()
    # logged why, once): the PyTorch-level loops below compute the same thing.
    tiling = Tiling(r, *tile_sizes(r))
    seed = 0
    if r.dropout_p > 0:
        # One draw from the global generator per call: torch.manual_seed makes it repeatable.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    args = (tiling, r.scale, r.dropout_p, seed)
    q, k, v = r.q, r.k, r.v
    if q.dtype in (torch.float16, torch.bfloat16):
        # Scores of half inputs are float32 products, as in the reference: a half-precision
        # q·k can overflow float16 and rounds every score, and CPUs without bf16/fp16
        # instructions emulate half-precision matmuls ~100x slower than float32 ones.
        q, k, v = q.float(), k.float(), v.float()
    if r.needs_grad:
        out, lse = _FlashFunction.apply(r.q, r.k, r.v, *args)  # upcasts inside autograd
    else:
        with torch.no_grad():
            # The log-sum-exp is only worth computing when the weights need it.
            out, lse = kernels.forward(tiling, q, k, v, *args[1:], need_lse=r.need_weights)
        out = out.to(r.dtype)
    weights = None
    if r.need_weights:
        with torch.no_grad():
            weights = kernels.attention_weights(
                tiling, q, k, lse, r.scale, r.weight_rows, r.average_heads
            ).to(r.dtype)
    return AttentionResult(output=out, weights=weights, backend="flash", lse=lse)
