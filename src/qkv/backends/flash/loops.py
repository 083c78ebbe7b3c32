"""The loops of the ``"flash"`` backend: tiled forward, recomputing backward, exact weights.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · g = H // H_kv ·
N = (batch size) * H_kv · h key/value heads in one tile · G = g * bq rows of one tile
(see :mod:`.flash_tiles`).

One tile's scores ``s`` (h, G, bk) go through ``torch.softmax`` in place rather than
``exp``: PyTorch's CPU softmax kernel uses a fast vectorised exponential and keeps each
row in cache, which makes it several times cheaper than ``s.sub_(m).exp_()``. The
softmax normalises by the tile's own sum ``Z``; merging tiles needs the tile's
log-sum-exp ``m + log Z``, which two cheap reductions recover exactly::

    m     = max_j s_j                    (before the softmax)
    p_j   = exp(s_j - m) / Z             (the softmax, in place)
    max p = exp(0) / Z = 1 / Z           (after it: the entry at the row max)

Rows with no allowed key in a tile (``m = -inf``) are set to 0 before the softmax, so it
never divides 0 by 0; their log-sum-exp is ``-inf``, so they weigh nothing in the merge.
Statistics and merges run in the compute dtype (float32 for half inputs, float64 stays
float64).

Work is cut into independent items (a few key/value heads of one batch element x one
query block) and spread over :mod:`.flash_pool`'s threads, each running its ops on one
core: like PyTorch's own CPU kernel, every core works through whole tiles that stay in
its cache, instead of every op being split across cores and synchronised.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from .pool import run_items
from .tiles import Tiling

__all__ = ["attention_weights", "backward", "forward"]

_HALF = (torch.float16, torch.bfloat16)
_NEG_INF = float("-inf")
_GROUP = 32  # key tiles whose partial results are kept before merging (memory bound)


class _Scratch:
    """Reusable flat buffers, one set per thread: big tiles are allocated once per call and
    thread, not once per tile (fresh large allocations cost page faults on every tile)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[tuple[int, str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = math.prod(shape)
        key = (threading.get_ident(), name, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._bufs[key] = buf
        return buf[:n].view(shape)


def _by_group(t: Tiling, x: Tensor) -> Tensor:
    """(..., H, L, d) -> (N, g, L, d): query heads grouped by their key/value head."""
    return x.reshape(t.N, t.g, x.shape[-2], x.shape[-1])


def _by_head(t: Tiling, x: Tensor) -> Tensor:
    """(..., H_kv, S, d) -> (N, S, d)."""
    return x.reshape(t.N, x.shape[-2], x.shape[-1])


def _rows(x4: Tensor, rows: slice | Tensor) -> Tensor:
    """Rows of a (h, g, L, d) tensor as (h, g * bq, d): the group's heads stacked."""
    x = x4[:, :, rows] if isinstance(rows, slice) else x4.index_select(2, rows)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _chunks(t: Tiling) -> Iterator[tuple[int, slice]]:
    """(batch element b, key/value heads) of each tile column; flat problems b * H_kv + h."""
    for b in range(t.N // t.H_kv):
        for h0 in range(0, t.H_kv, t.heads):
            yield b, slice(h0, min(h0 + t.heads, t.H_kv))


def _problems(t: Tiling, b: int, heads: slice) -> slice:
    return slice(b * t.H_kv + heads.start, b * t.H_kv + heads.stop)


def _scores(qs: Tensor, k_blk: Tensor, cdt: torch.dtype, scratch: _Scratch) -> Tensor:
    """Scaled scores of one tile: (h, G, bk), in a reused buffer (``cdt`` is q's dtype)."""
    shape = (qs.shape[0], qs.shape[1], k_blk.shape[1])
    return torch.bmm(qs, k_blk.transpose(1, 2), out=scratch.get("s", shape, cdt))


def _softmax_tile(
    s: Tensor, masked: bool, stats: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """Softmax over keys in place; returns the row max ``m`` (h, G, 1) and ``1 / Z``.

    Afterwards ``s`` holds ``p`` with ``exp(scores - m) == p / inv_z``; ``m = -inf`` marks
    rows with no allowed key in this tile (their ``p`` is finite and must be ignored).
    ``1 / Z`` is the largest ``p`` (the one at the row max, ``exp(0) / Z``): a second
    ``amax`` is much cheaper than ``max`` with indices plus a gather. Without ``stats``
    (and without a mask) neither reduction is run and both are ``None``.
    """
    if not (stats or masked):
        torch.ops.aten._softmax.out(s, -1, False, out=s)
        return None, None
    m = s.amax(dim=-1, keepdim=True)
    if masked:
        dead = m == _NEG_INF
        if bool(dead.any()):
            s.masked_fill_(dead, 0.0)  # a row of -inf would make the softmax 0 / 0
    torch.ops.aten._softmax.out(s, -1, False, out=s)
    return m, (s.amax(dim=-1, keepdim=True) if stats else None)


def _keep_scale(
    seed: int,
    b: int,
    heads: slice,
    i0: int,
    j0: int,
    shape: tuple[int, ...],
    p: float,
    t: Tiling,
    dtype: torch.dtype,
) -> Tensor:
    """Dropout factors of one tile, 0 or 1 / (1 - p): (h, G, bk), in ``dtype`` (the tile's).

    Drawn from a generator seeded by (call seed, tile position), so backward regenerates
    exactly the tiles forward used without storing them, in any order, on any thread.
    The factor is built in the tile's own dtype: a float32 1 / (1 - p) would make float64
    dropout only float32-accurate.
    """
    gen = torch.Generator(device=t.device)
    gen.manual_seed(hash((seed, b, heads.start, i0, j0)) & (2**63 - 1))
    keep = torch.rand(shape, generator=gen, device=t.device) >= p
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


def forward(
    t: Tiling,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    need_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Tiled attention with an online softmax.

    Returns ``output`` (..., H, L, d_v) in the input dtype and ``lse`` (..., H, L) in the
    compute dtype (``-inf`` for a row with no allowed key), or ``None`` when not
    ``need_lse`` and every row's keys fit in one tile (then no statistics are computed).

    Inputs are float32 or float64: the backend upcasts half inputs before calling (see
    :func:`qkv.backends.flash.flash_attention`), so every tile computes in q's dtype.
    """
    assert q.dtype not in _HALF, "the flash backend upcasts half inputs first"  # invariant
    cdt = q.dtype
    q4, k3, v3 = _by_group(t, q), _by_head(t, k), _by_head(t, v)
    d_v = v.shape[-1]
    out4 = torch.zeros(t.N, t.g, t.L, d_v, dtype=q.dtype, device=q.device)  # (N, g, L, d_v)
    one_tile = all(len(t.key_blocks(i0, i1)) == 1 for i0, i1 in t.query_blocks())
    need_lse = need_lse or not one_tile
    lse3 = None
    if need_lse:
        lse3 = torch.full((t.N, t.g, t.L), _NEG_INF, dtype=cdt, device=q.device)  # (N, g, L)
    scratch = _Scratch(q.device)

    def item(b: int, heads: slice, i0: int, i1: int) -> None:
        n = _problems(t, b, heads)
        rows = slice(i0, i1)
        blocks = t.key_blocks(i0, i1)
        qs = _rows(q4[n], rows) * scale  # (h, G, d_k), scale folded into q once
        h, G = qs.shape[0], qs.shape[1]
        if len(blocks) == 1:
            # One tile holds every key these rows see: p is already the final softmax.
            kb = blocks[0]
            s = _scores(qs, k3[n, kb.j0 : kb.j1], cdt, scratch)  # (h, G, bk)
            masked = t.apply_masks(s, b, heads, rows, kb.j0, kb.j1, kb.band)
            m, inv_z = _softmax_tile(s, masked, stats=need_lse)  # s is now p
            if dropout_p > 0:
                s.mul_(
                    _keep_scale(seed, b, heads, i0, kb.j0, tuple(s.shape), dropout_p, t, s.dtype)
                )
            pv = torch.bmm(s, v3[n, kb.j0 : kb.j1])  # (h, G, d_v)
            out4[n, :, i0:i1] = (pv.masked_fill(m == _NEG_INF, 0.0) if masked else pv).view(
                h, t.g, i1 - i0, d_v
            )
            if need_lse:
                lse = m.to(cdt) - torch.log(inv_z.to(cdt))  # m + log Z; -inf stays -inf
                lse3[n, :, i0:i1] = lse.view(h, t.g, i1 - i0)
            return
        # Several key tiles: each tile's normalised p @ V and its statistics go into
        # stacks (a handful of ops per tile), merged by log-sum-exp once per group.
        size = min(len(blocks), _GROUP)
        PV = scratch.get("PV", (size, h, G, d_v), cdt)
        M = scratch.get("M", (size, h, G, 1), cdt)
        Z = scratch.get("Z", (size, h, G, 1), cdt)
        acc = lse_run = None
        for start in range(0, len(blocks), _GROUP):
            chunk = blocks[start : start + _GROUP]
            for slot, kb in enumerate(chunk):
                s = _scores(qs, k3[n, kb.j0 : kb.j1], cdt, scratch)  # (h, G, bk)
                masked = t.apply_masks(s, b, heads, rows, kb.j0, kb.j1, kb.band)
                torch.amax(s, dim=-1, keepdim=True, out=M[slot])
                if masked:
                    dead = M[slot] == _NEG_INF
                    if bool(dead.any()):
                        s.masked_fill_(dead, 0.0)  # a row of -inf would make it 0 / 0
                torch.ops.aten._softmax.out(s, -1, False, out=s)  # s is now p
                torch.amax(s, dim=-1, keepdim=True, out=Z[slot])  # 1 / Z
                if dropout_p > 0:
                    s.mul_(
                        _keep_scale(
                            seed, b, heads, i0, kb.j0, tuple(s.shape), dropout_p, t, s.dtype
                        )
                    )
                torch.bmm(s, v3[n, kb.j0 : kb.j1], out=PV[slot])
            used = len(chunk)
            lse_t = M[:used].to(cdt).sub_(torch.log(Z[:used].to(cdt)))  # (used, h, G, 1)
            pv_t = PV[:used]
            if lse_run is not None:  # the earlier groups enter as one more tile
                lse_t = torch.cat([lse_run.unsqueeze(0), lse_t])
                pv_t = torch.cat([acc.unsqueeze(0), pv_t.to(cdt)])
            lse_run = torch.logsumexp(lse_t, dim=0)  # (h, G, 1); -inf: no key at all
            shift = lse_run.masked_fill(lse_run == _NEG_INF, 0.0)
            acc = (pv_t * lse_t.sub_(shift).exp_()).sum(dim=0)  # (h, G, d_v), compute dtype
        out4[n, :, i0:i1] = acc.view(h, t.g, i1 - i0, d_v)
        if need_lse:
            lse3[n, :, i0:i1] = lse_run.view(h, t.g, i1 - i0)

    items = [(b, heads, i0, i1) for i0, i1 in t.query_blocks_by_cost() for b, heads in _chunks(t)]
    run_items(item, items, t.threads)
    lse = None if lse3 is None else lse3.view(q.shape[:-1])
    return out4.view(*q.shape[:-1], d_v), lse


def backward(
    t: Tiling,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), recomputing each tile from ``lse`` (float32 or float64 inputs).

    FlashAttention-2's recurrences, with ``P = exp(s - lse)``, ``D = rowsum(dO * O)``::

        dV += Pᵀ dO        dP = dO Vᵀ        dS = P * (dP - D)
        dQ += dS K scale   dK += dSᵀ Q scale

    The per-row factor ``c`` with ``P = p * c`` (p the tile's softmax) is folded into
    ``dO`` and ``D`` (small) instead of into the tile. Items that share keys (same heads,
    different query blocks) run on different threads only when there are too few head
    chunks to keep every thread busy; each part of the query blocks then adds into its
    own dK, dV, and the parts are summed in a fixed order (deterministic).
    """
    cdt = q.dtype
    q4, k3, v3 = _by_group(t, q), _by_head(t, k), _by_head(t, v)
    d_k, d_v = q.shape[-1], v.shape[-1]
    o4, do4 = _by_group(t, out), _by_group(t, dout)  # (N, g, L, d_v)
    # A row with no allowed key has lse = -inf; +inf makes its P exactly 0.
    lse4 = lse.reshape(t.N, t.g, t.L, 1)
    lse4 = lse4.masked_fill(lse4 == _NEG_INF, math.inf)  # (N, g, L, 1)
    dq4 = torch.zeros(t.N, t.g, t.L, d_k, dtype=cdt, device=q.device)  # (N, g, L, d_k)
    dk3 = torch.zeros(t.N, t.S, d_k, dtype=cdt, device=q.device)  # (N, S, d_k)
    dv3 = torch.zeros(t.N, t.S, d_v, dtype=cdt, device=q.device)  # (N, S, d_v)
    chunks = list(_chunks(t))
    q_blocks = list(t.query_blocks_by_cost())
    shared = t.threads <= 1 or len(chunks) >= 2 * t.threads
    # With too few head chunks to keep every thread busy, query blocks are dealt into
    # ``t.threads`` fixed parts, each with its own dK/dV, summed below in part order:
    # which thread runs a part never changes the result (bitwise reproducible).
    parts = 1 if shared else min(t.threads, len(q_blocks))
    private = [(torch.zeros_like(dk3), torch.zeros_like(dv3)) for _ in range(parts - 1)]
    scratch = _Scratch(q.device)

    def accumulators(part: int) -> tuple[Tensor, Tensor]:
        return (dk3, dv3) if part == 0 else private[part - 1]

    def item(b: int, heads: slice, blocks_q: list[tuple[int, int]], part: int) -> None:
        n = _problems(t, b, heads)
        dk_acc, dv_acc = accumulators(part)
        dk_n, dv_n = dk_acc[n], dv_acc[n]  # (h, S, d)
        for i0, i1 in blocks_q:
            rows = slice(i0, i1)
            qs = _rows(q4[n], rows) * scale  # (h, G, d_k)
            d_o = _rows(do4[n], rows)  # (h, G, d_v)
            D = (d_o * _rows(o4[n], rows)).sum(-1, keepdim=True)  # (h, G, 1)
            row_lse = _rows(lse4[n], rows)  # (h, G, 1)
            dq_acc = torch.zeros(qs.shape, dtype=cdt, device=q.device)
            for kb in t.key_blocks(i0, i1):
                j0, j1 = kb.j0, kb.j1
                s = _scores(qs, k3[n, j0:j1], cdt, scratch)  # (h, G, bk)
                masked = t.apply_masks(s, b, heads, rows, j0, j1, kb.band)
                m_b, inv_z = _softmax_tile(s, masked)  # s is now p
                c = torch.exp(m_b - row_lse).div_(inv_z)  # (h, G, 1): P = p * c
                d_oc = d_o * c  # (h, G, d_v)
                dp = scratch.get("dp", tuple(s.shape), cdt)
                torch.bmm(d_oc, v3[n, j0:j1].transpose(1, 2), out=dp)  # dP / c
                p = s
                if dropout_p > 0:
                    keep = _keep_scale(seed, b, heads, i0, j0, tuple(s.shape), dropout_p, t, cdt)
                    p = s * keep  # the dropped weights that multiplied V
                    dp.mul_(keep)
                # baddbmm_ into a strided slice would run one small matmul per head;
                # a batched product plus an add is faster.
                dv_n[:, j0:j1] += torch.bmm(p.transpose(1, 2), d_oc)  # (h, bk, d_v)
                ds = dp.sub_(D * c).mul_(s)  # (h, G, bk): P * (dP - D), c folded in
                dq_acc.baddbmm_(ds, k3[n, j0:j1])  # contiguous accumulator
                dk_n[:, j0:j1] += torch.bmm(ds.transpose(1, 2), qs)  # (h, bk, d_k)
            dq4[n, :, i0:i1] = dq_acc.mul_(scale).view(-1, t.g, i1 - i0, d_k)

    # Each item owns its heads' dK/dV in its part; parts split the query blocks.
    items = [(b, heads, q_blocks[p::parts], p) for p in range(parts) for b, heads in chunks]
    run_items(item, items, t.threads)
    for dk_p, dv_p in private:  # fixed order
        dk3 += dk_p
        dv3 += dv_p
    return dq4.view(q.shape), dk3.view(k.shape), dv3.view(v.shape)


def attention_weights(
    t: Tiling,
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    scale: float,
    rows: Tensor | None = None,
    average_heads: bool = False,
) -> Tensor:
    """Exact softmax weights, recomputed tile by tile; only what is asked is allocated.

    Returns (..., H, R, S), or (..., R, S) with ``average_heads`` (R = len(rows), or L).
    A first pass sums ``exp(s - lse)`` with an accurate ``exp`` (the forward's fast softmax
    leaves ``lse`` ~1e-6 off in float32); a second pass writes ``exp(s - lse) / sum``, so
    rows sum to 1 to rounding. Each tile holds every head of one batch element, so the
    average over heads is taken inside the tile. Rows with no allowed key are zero.
    """
    cdt = lse.dtype
    q4, k3 = _by_group(t, q), _by_head(t, k)
    R = t.L if rows is None else rows.numel()
    H = t.H_kv * t.g
    NB = t.N // t.H_kv
    shape = (NB, R, t.S) if average_heads else (NB, H, R, t.S)
    weights = torch.zeros(shape, dtype=cdt, device=q.device)
    lse4 = lse.reshape(t.N, t.g, t.L, 1)  # (N, g, L, 1)
    lse4 = lse4.masked_fill(lse4 == _NEG_INF, math.inf)  # empty rows: weights 0
    heads = slice(0, t.H_kv)
    scratch = _Scratch(q.device)

    def item(b: int, r0: int, r1: int) -> None:
        n = _problems(t, b, heads)
        sel = slice(r0, r1) if rows is None else rows[r0:r1]
        lo, hi = (r0, r1) if rows is None else (int(sel.min()), int(sel.max()) + 1)
        blocks = t.key_blocks(lo, hi)
        qs = _rows(q4[n], sel) * scale  # (H_kv, G, d_k)
        row_lse = _rows(lse4[n], sel)  # (H_kv, G, 1)
        total = torch.zeros_like(row_lse)
        for kb in blocks:  # pass 1: sum_j exp(s - lse), 1 up to the forward's rounding
            s = _scores(qs, k3[n, kb.j0 : kb.j1], cdt, scratch)
            t.apply_masks(s, b, heads, sel, kb.j0, kb.j1, t.has_band)
            total += s.sub_(row_lse).exp_().sum(-1, keepdim=True)
        # Divide by the sum rather than fold log(total) into the lse: next to an lse near
        # float32's limit (a float mask of finfo.min) the correction would be absorbed.
        inv_total = torch.where(total > 0, 1 / total, torch.zeros_like(total))
        for kb in blocks:  # pass 2: the weights themselves
            s = _scores(qs, k3[n, kb.j0 : kb.j1], cdt, scratch)
            t.apply_masks(s, b, heads, sel, kb.j0, kb.j1, t.has_band)
            w = s.sub_(row_lse).exp_().mul_(inv_total).view(H, r1 - r0, kb.j1 - kb.j0)
            if average_heads:
                weights[b, r0:r1, kb.j0 : kb.j1] = w.mean(dim=0)
            else:
                weights[b, :, r0:r1, kb.j0 : kb.j1] = w

    items = [(b, r0, min(r0 + t.block_q, R)) for r0 in range(0, R, t.block_q) for b in range(NB)]
    run_items(item, items, t.threads)
    return weights.view(*t.batch_shape, *shape[1:])
