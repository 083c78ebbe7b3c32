"""FlashAttention-2 in Triton: forward, backward and exact weights, with qkv's masks.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width. The launchers
(:mod:`.autograd`) flatten leading batch dims into B, so kernels see q (B, H, L, d_k),
k (B, H_kv, S, d_k), v (B, H_kv, S, d_v), each with unit stride in its last dim.

**What it computes** — the same as the reference backend::

    scores = q @ kᵀ * scale  (+ float mask | bool mask -> -inf | causal | window)
    out    = softmax(scores) @ v           zeros for a row with no allowed key
    lse    = logsumexp(scores, keys)       -inf for such a row

**Supported**: float16, bfloat16 (and float32, with exact IEEE dot products, for
tests); head widths 1..256 (d_k and d_v may differ; a width that is not a power of
two is padded to the next one with masked loads, so it costs the padded width);
bottom-right causal, sliding window, bool or float masks of any broadcast shape,
grouped-query attention, any L and S (including L != S and L = 1).

**Differs from the reference**: no dropout (the backend refuses such requests);
float32 accumulation in the tiles, so half-precision results differ from the
reference's in the last bits (the tests bound this with the 2x rule); weights are
recomputed from the saved LSE and are not differentiable; a float mask gets no
gradient (the backend refuses a mask that requires one).

**Tricks**, each commented where it happens:

* exp2 instead of exp, with log2(e) folded into the score scale (one FMA per score);
  the kernels keep the LSE in base 2 and the launcher converts it.
* online softmax (running max and sum, rescaling the accumulator when the max grows);
  a row whose running max is still -inf uses 0 as its shift, so an all-masked row
  yields 0 / 0 -> 0 instead of NaN.
* block skipping: each tile loop visits only key blocks a query block can see
  (causal, window); of those, interior blocks skip the structural mask through a
  runtime branch, so only edge, diagonal and partial blocks pay for it. (One loop
  with a branch, not three loops: on sm_90 the three-loop form spilled registers in
  the backward.)
* masks are loaded tile by tile through their broadcast strides (stride 0 on a
  broadcast dim), never expanded to (B, H, L, S) in memory.
* backward recomputes the probabilities from q, k and the LSE instead of storing
  them; a preprocessing pass stores delta = rowsum(dO * O); dK/dV and dQ are
  computed by two kernels (no atomics), the dK/dV one looping over the whole group
  of query heads that share a key/value head (grouped-query attention: query head h
  reads key/value head h // group).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import config

#: Whether these kernels were built for Triton's CPU interpreter (decided at import:
#: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates).
INTERPRETED: bool = config.interpreting()

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

# Mask kinds (constexpr): no user mask, boolean (True = may attend), float (added).
MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_BOOL: tl.constexpr = tl.constexpr(1)
MASK_FLOAT: tl.constexpr = tl.constexpr(2)

_TUNE_KEY = ["TUNE_L", "TUNE_S", "BLOCK_DK", "BLOCK_DV", "CAUSAL", "WINDOWED", "MASK_KIND"]


# --------------------------------------------------------------------------- helpers

# Only Triton builtins and this module's own @triton.jit functions are used (no tl.max,
# tl.sum, tl.zeros: those are @triton.jit functions of Triton's standard library, built
# compiled or interpreted once, when Triton is first imported). So these kernels work
# in whichever mode this module was built, however Triton was first imported.


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _inner_range(
    first,
    last,
    lo_shift,
    hi_shift,
    limit,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Inner blocks to visit for the outer indices ``first..last`` (inclusive).

    Outer index x may see inner indices in ``[x + lo_shift, x + hi_shift)`` (each bound
    only if HAS_LO / HAS_HI, else 0 / ``limit``). Returns ``lo <= full_lo <= full_hi <=
    hi``: the loop visits blocks starting in ``[lo, hi)``; those in ``[full_lo, full_hi)``
    are visible to every outer index and lie inside ``[0, limit)`` (no structural mask
    needed), the others get one. Block starts are multiples of BLOCK.
    """
    if HAS_LO:
        lo = tl.maximum(first + lo_shift, 0) // BLOCK * BLOCK
        full_lo = (tl.maximum(last + lo_shift, 0) + BLOCK - 1) // BLOCK * BLOCK
    else:
        lo = 0
        full_lo = 0
    if HAS_HI:
        hi = tl.minimum(last + hi_shift, limit)
        full_hi = tl.maximum(tl.minimum(first + hi_shift, limit), 0) // BLOCK * BLOCK
    else:
        hi = limit
        full_hi = limit // BLOCK * BLOCK  # a partial last block needs bounds checks
    # No interior: run everything as boundary tiles from lo.
    empty = full_hi <= full_lo
    full_lo = tl.where(empty, lo, full_lo)
    full_hi = tl.where(empty, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _allowed(q_idx, k_idx, L, S, offset, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Structural mask for broadcastable index grids: in bounds, causal, window.

    Bottom-right alignment: query i sits on key i + offset, offset = S - L.
    """
    ok = (q_idx < L) & (k_idx < S)
    diff = k_idx - q_idx - offset  # > 0: key lies after the query's own position
    if CAUSAL:
        ok = ok & (diff <= 0)
    if WINDOWED:
        ok = ok & (diff > -window)
        if not CAUSAL:
            ok = ok & (diff < window)
    return ok


@triton.jit
def _load_rows(ptrs, idx, n, d_idx, D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; zeros past ``n`` rows (if CHECK) and past width D."""
    if CHECK:
        if D == BLOCK_D:
            x = tl.load(ptrs, mask=idx[:, None] < n, other=0.0)
        else:
            x = tl.load(ptrs, mask=(idx[:, None] < n) & (d_idx[None, :] < D), other=0.0)
    else:
        x = tl.load(ptrs) if D == BLOCK_D else tl.load(ptrs, mask=d_idx[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, x, idx, n, d_idx, D: tl.constexpr, BLOCK_D: tl.constexpr, full):
    """Store a (rows, BLOCK_D) tile, skipping rows past ``n`` and columns past D.

    ``full`` (runtime: every row < n) picks an unmasked store: a per-element mask on a
    128 x 128 tile costs enough registers to make the compiler spill (seen for sm_90).
    """
    if D == BLOCK_D:
        if full:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=idx[:, None] < n)
    else:
        tl.store(ptrs, x, mask=(idx[:, None] < n) & (d_idx[None, :] < D))


@triton.jit
def _masked_scores(
    s,
    mask_base,
    stride_ml,
    stride_ms,
    q_idx,
    k_idx,
    L,
    S,
    offset,
    window,
    qk_scale,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    boundary,
):
    """Apply every mask part to a tile of raw dot products ``q . k``.

    ``q_idx`` / ``k_idx`` are broadcastable index grids in the tile's orientation.
    Scores stay in raw dot-product units (forbidden ones become -inf): the caller
    multiplies by ``qk_scale`` inside the exp2 argument, fused with the subtraction of
    the row max or LSE (one FMA per score). ``boundary`` (runtime) adds the bounds,
    causal and window checks, which interior tiles do not need.
    """
    if MASK_KIND != MASK_NONE:
        # Per-tile mask load through broadcast strides (0 on broadcast dims). Rows/keys
        # outside the tensor read as "forbidden".
        in_bounds = (q_idx < L) & (k_idx < S)
        mptrs = mask_base + q_idx.to(tl.int64) * stride_ml + k_idx * stride_ms
    if MASK_KIND == MASK_FLOAT:
        m = tl.load(mptrs, mask=in_bounds, other=float("-inf")).to(tl.float32)
        # In raw units: (s + m / scale) * scale * log2(e) = base-2 (scaled score + m).
        m_raw = m * (LOG2E / qk_scale)
        # A finite mask near float32's limit (finfo.min) must stay finite in raw units:
        # it shifts the row (uniform weights, as in float32 arithmetic), not forbid it.
        m_raw = tl.where((m_raw == float("-inf")) & (m > float("-inf")), -3.0e38, m_raw)
        s = s + m_raw
    if MASK_KIND == MASK_BOOL:
        s = tl.where(tl.load(mptrs, mask=in_bounds, other=0) != 0, s, float("-inf"))
    if boundary:  # runtime: only edge tiles pay for the structural mask
        ok = _allowed(q_idx, k_idx, L, S, offset, window, CAUSAL, WINDOWED)
        s = tl.where(ok, s, float("-inf"))
    return s


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    mask_base,
    start_n,
    offs_m,
    offs_dk,
    offs_dv,
    stride_ks,
    stride_vs,
    stride_ml,
    stride_ms,
    L,
    S,
    offset,
    window,
    qk_scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    boundary,
):
    start_n = tl.multiple_of(start_n, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(
        k_base + offs_n[:, None] * stride_ks + offs_dk[None, :],
        offs_n,
        S,
        offs_dk,
        D_K,
        BLOCK_DK,
        True,
    )  # (BLOCK_N, BLOCK_DK)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) raw q.k
    s = _masked_scores(
        s,
        mask_base,
        stride_ml,
        stride_ms,
        offs_m[:, None],
        offs_n[None, :],
        L,
        S,
        offset,
        window,
        qk_scale,
        CAUSAL,
        WINDOWED,
        MASK_KIND,
        boundary,
    )
    # Online softmax in base 2: m is the running max of scaled scores.
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine) * qk_scale)
    # A row with nothing allowed so far keeps max -inf; shift it by 0 so that
    # exp2(-inf - shift) = 0 instead of exp2(-inf + inf) = NaN (one select per row).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])  # FMA: scale folded in
    alpha = tl.math.exp2(m_i - m_shift)  # rescales what was accumulated so far
    l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
    v = _load_rows(
        v_base + offs_n[:, None] * stride_vs + offs_dv[None, :],
        offs_n,
        S,
        offs_dv,
        D_V,
        BLOCK_DV,
        True,
    )  # (BLOCK_N, BLOCK_DV)
    acc = acc * alpha[:, None]
    # Accumulate inside the MMA (acc is its C operand): no second (BLOCK_M, BLOCK_DV) tile.
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.autotune(
    configs=config.tile_configs("fwd"),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": config.prune("fwd")},
)
@triton.jit
def attn_fwd(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_ob,
    stride_oh,
    stride_ol,
    H,
    L,
    S,
    GROUP,
    qk_scale,
    window,
    TUNE_L,
    TUNE_S,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Out (B, H, L, d_v) and base-2 Lse (B, H, L); grid (cdiv(L, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Causal blocks near the bottom see the most keys: start them first so the
        # short ones fill the tail of the schedule.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)  # grouped-query attention: kv head of query head h
    offset = S - L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h.to(tl.int64) * stride_mh

    q = _load_rows(
        q_base + offs_m[:, None] * stride_ql + offs_dk[None, :],
        offs_m,
        L,
        offs_dk,
        D_K,
        BLOCK_DK,
        True,
    )  # (BLOCK_M, BLOCK_DK)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)

    # Keys visible to query i: [i + offset - window + 1, i + offset + 1) causal,
    # [i + offset - window + 1, i + offset + window) windowed, all otherwise.
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, L) - 1
    hi_shift = offset + 1 if CAUSAL else offset + window
    lo, full_lo, full_hi, hi = _inner_range(
        first, last, offset - window + 1, hi_shift, S, WINDOWED, CAUSAL or WINDOWED, BLOCK_N
    )
    for start_n in range(lo, hi, BLOCK_N):
        # Interior tiles skip the structural mask (a runtime branch: one loop keeps the
        # pipelined loads and the register allocation simpler than three loops did).
        boundary = (start_n < full_lo) | (start_n >= full_hi)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m,
                                  offs_dk, offs_dv, stride_ks, stride_vs, stride_ml, stride_ms,
                                  L, S, offset, window, qk_scale, D_K, D_V, BLOCK_DK, BLOCK_DV,
                                  CAUSAL, WINDOWED, MASK_KIND, PRECISION, BLOCK_N, boundary)  # fmt: skip

    # A row with no allowed key has l = 0: output 0 (not 0/0) and LSE -inf.
    alive = l_i > 0.0
    acc = acc / tl.where(alive, l_i, 1.0)[:, None]
    lse = tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), float("-inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)
    o_ptrs = Out + b * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_ptrs + offs_m[:, None] * stride_ol + offs_dv[None, :]
    _store_rows(o_ptrs, acc.to(Out.dtype.element_ty), offs_m, L, offs_dv, D_V, BLOCK_DV,
                first + BLOCK_M <= L)  # fmt: skip


# --------------------------------------------------------------------------- backward


@triton.jit
def attn_bwd_preprocess(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_db,
    stride_dh,
    stride_dl,
    H,
    L,
    D_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Delta (B, H, L) = rowsum(dO * O) in float32; grid (cdiv(L, BLOCK_M), B * H).

    This is sum_j P_ij dP_ij, the term the softmax backward subtracts, computed once
    per row instead of once per key tile.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    o = _load_rows(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
        offs_m,
        L,
        offs_d,
        D_V,
        BLOCK_DV,
        True,
    )
    do = _load_rows(
        DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :],
        offs_m,
        L,
        offs_d,
        D_V,
        BLOCK_DV,
        True,
    )
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _add_combine)
    tl.store(Delta + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _bwd_kv_tile(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    mask_base,
    start_m,
    offs_n,
    offs_dk,
    offs_dv,
    stride_ql,
    stride_dol,
    stride_ml,
    stride_ms,
    L,
    S,
    offset,
    window,
    qk_scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    boundary,
):
    """One query tile's contribution to dK, dV of a resident key tile (transposed: keys
    are rows, so the tile is (BLOCK_N, BLOCK_M))."""
    start_m = tl.multiple_of(start_m, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(
        q_base + offs_m[:, None] * stride_ql + offs_dk[None, :],
        offs_m,
        L,
        offs_dk,
        D_K,
        BLOCK_DK,
        True,
    )  # (BLOCK_M, BLOCK_DK)
    do = _load_rows(
        do_base + offs_m[:, None] * stride_dol + offs_dv[None, :],
        offs_m,
        L,
        offs_dv,
        D_V,
        BLOCK_DV,
        True,
    )  # (BLOCK_M, BLOCK_DV)
    lse = tl.load(lse_base + offs_m, mask=offs_m < L, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty row: every p is exp2(-inf) = 0
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    sT = _masked_scores(
        sT,
        mask_base,
        stride_ml,
        stride_ms,
        offs_m[None, :],
        offs_n[:, None],
        L,
        S,
        offset,
        window,
        qk_scale,
        CAUSAL,
        WINDOWED,
        MASK_KIND,
        boundary,
    )
    # Recompute the probabilities from the saved LSE instead of storing P (L x S).
    pT = tl.math.exp2(sT * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # accumulate in the MMA
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    dsT = pT * (dpT - delta[None, :])  # softmax backward; scale applied once at the end
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(
    configs=config.tile_configs("dkdv"),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": config.prune("dkdv")},
)
@triton.jit
def attn_bwd_dkdv(
    Q,
    K,
    V,
    Mask,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_dob,
    stride_doh,
    stride_dol,
    H,
    H_KV,
    L,
    S,
    GROUP,
    qk_scale,
    sm_scale,
    window,
    TUNE_L,
    TUNE_S,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK (B, H_kv, S, d_k), dV (B, H_kv, S, d_v) (contiguous); grid (cdiv(S, BLOCK_N), B * H_kv).

    Each program owns one key block and sums over all query heads of its group, so
    grouped-query attention needs no atomics and no (B, H, S, d) buffer.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    offset = S - L

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(
        K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_dk[None, :],
        offs_n,
        S,
        offs_dk,
        D_K,
        BLOCK_DK,
        True,
    )  # (BLOCK_N, BLOCK_DK)
    v = _load_rows(
        V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_dv[None, :],
        offs_n,
        S,
        offs_dv,
        D_V,
        BLOCK_DV,
        True,
    )  # (BLOCK_N, BLOCK_DV)
    dk = tl.full((BLOCK_N, BLOCK_DK), 0.0, tl.float32)
    dv = tl.full((BLOCK_N, BLOCK_DV), 0.0, tl.float32)

    # Queries that see key j: [j - offset, ...) causal, [j - offset - window + 1, ...)
    # windowed (non-causal), up to j - offset + window with a window; all otherwise.
    first = pid_n * BLOCK_N
    last = tl.minimum(first + BLOCK_N, S) - 1
    lo_shift = -offset if CAUSAL else 1 - offset - window
    lo, full_lo, full_hi, hi = _inner_range(
        first, last, lo_shift, window - offset, L, CAUSAL or WINDOWED, WINDOWED, BLOCK_M
    )
    for g in range(GROUP):
        h = hk * GROUP + g  # query heads h // GROUP == hk
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        lse_base = Lse + (b * H + h) * L
        delta_base = Delta + (b * H + h) * L
        mask_base = Mask + b * stride_mb + h * stride_mh
        for start_m in range(lo, hi, BLOCK_M):
            boundary = (start_m < full_lo) | (start_m >= full_hi)
            dk, dv = _bwd_kv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                                  start_m, offs_n, offs_dk, offs_dv, stride_ql, stride_dol,
                                  stride_ml, stride_ms, L, S, offset, window, qk_scale, D_K, D_V,
                                  BLOCK_DK, BLOCK_DV, CAUSAL, WINDOWED, MASK_KIND, PRECISION,
                                  BLOCK_M, boundary)  # fmt: skip

    dk = dk * sm_scale  # d(scores)/dk = scale * q: applied once, not per tile
    full = first + BLOCK_N <= S
    dk_ptrs = DK + pid_bh.to(tl.int64) * S * D_K + offs_n[:, None] * D_K + offs_dk[None, :]
    dv_ptrs = DV + pid_bh.to(tl.int64) * S * D_V + offs_n[:, None] * D_V + offs_dv[None, :]
    _store_rows(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n, S, offs_dk, D_K, BLOCK_DK, full)
    _store_rows(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, S, offs_dv, D_V, BLOCK_DV, full)


@triton.jit
def _bwd_q_tile(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    mask_base,
    start_n,
    offs_m,
    offs_dk,
    offs_dv,
    stride_ks,
    stride_vs,
    stride_ml,
    stride_ms,
    L,
    S,
    offset,
    window,
    qk_scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    boundary,
):
    """One key tile's contribution to dQ of a resident query tile."""
    start_n = tl.multiple_of(start_n, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(
        k_base + offs_n[:, None] * stride_ks + offs_dk[None, :],
        offs_n,
        S,
        offs_dk,
        D_K,
        BLOCK_DK,
        True,
    )  # (BLOCK_N, BLOCK_DK)
    v = _load_rows(
        v_base + offs_n[:, None] * stride_vs + offs_dv[None, :],
        offs_n,
        S,
        offs_dv,
        D_V,
        BLOCK_DV,
        True,
    )  # (BLOCK_N, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    s = _masked_scores(
        s,
        mask_base,
        stride_ml,
        stride_ms,
        offs_m[:, None],
        offs_n[None, :],
        L,
        S,
        offset,
        window,
        qk_scale,
        CAUSAL,
        WINDOWED,
        MASK_KIND,
        boundary,
    )
    p = tl.math.exp2(s * qk_scale - lse[:, None])  # recomputed, as in dK/dV
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(
    configs=config.tile_configs("dq"),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": config.prune("dq")},
)
@triton.jit
def attn_bwd_dq(
    Q,
    K,
    V,
    Mask,
    DOut,
    Lse,
    Delta,
    DQ,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_dob,
    stride_doh,
    stride_dol,
    H,
    L,
    S,
    GROUP,
    qk_scale,
    sm_scale,
    window,
    TUNE_L,
    TUNE_S,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ (B, H, L, d_k) (contiguous); grid (cdiv(L, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first, as in the forward
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    offset = S - L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _load_rows(
        Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_ql
        + offs_dk[None, :],
        offs_m,
        L,
        offs_dk,
        D_K,
        BLOCK_DK,
        True,
    )  # fmt: skip
    do = _load_rows(
        DOut + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dol
        + offs_dv[None, :],
        offs_m,
        L,
        offs_dv,
        D_V,
        BLOCK_DV,
        True,
    )  # fmt: skip
    lse = tl.load(Lse + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty row: p = exp2(-inf) = 0
    delta = tl.load(Delta + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h.to(tl.int64) * stride_mh
    dq = tl.full((BLOCK_M, BLOCK_DK), 0.0, tl.float32)

    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, L) - 1
    hi_shift = offset + 1 if CAUSAL else offset + window
    lo, full_lo, full_hi, hi = _inner_range(
        first, last, offset - window + 1, hi_shift, S, WINDOWED, CAUSAL or WINDOWED, BLOCK_N
    )
    for start_n in range(lo, hi, BLOCK_N):
        boundary = (start_n < full_lo) | (start_n >= full_hi)
        dq = _bwd_q_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, start_n, offs_m,
                         offs_dk, offs_dv, stride_ks, stride_vs, stride_ml, stride_ms, L, S,
                         offset, window, qk_scale, D_K, D_V, BLOCK_DK, BLOCK_DV, CAUSAL,
                         WINDOWED, MASK_KIND, PRECISION, BLOCK_N, boundary)  # fmt: skip

    dq = dq * sm_scale
    dq_ptrs = DQ + pid_bh.to(tl.int64) * L * D_K + offs_m[:, None] * D_K + offs_dk[None, :]
    _store_rows(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m, L, offs_dk, D_K, BLOCK_DK,
                first + BLOCK_M <= L)  # fmt: skip


# --------------------------------------------------------------------------- weights


@triton.jit
def attn_weights(
    Q,
    K,
    Mask,
    Lse,
    Rows,
    W,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    H,
    L,
    S,
    R,
    GROUP,
    qk_scale,
    window,
    D_K: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
    AVERAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Exact softmax weights of the query rows ``Rows`` (R,) from the saved base-2 LSE.

    W is float32, contiguous: (B, H, R, S), or (B, R, S) averaged over heads when
    AVERAGE. Grid (cdiv(R, BLOCK_M), cdiv(S, BLOCK_N), B * H, or B when AVERAGE).
    p = exp2(score - lse) is the softmax itself, so no second pass over keys is needed.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    if AVERAGE:
        b = pid_z.to(tl.int64)
        head0 = 0
        n_heads = H
    else:
        b = (pid_z // H).to(tl.int64)
        head0 = pid_z % H
        n_heads = 1
    offset = S - L
    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < R
    rows = tl.load(Rows + offs_r, mask=r_ok, other=0)  # query index of each output row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for i in range(n_heads):
        h = (head0 + i).to(tl.int64)
        hk = h // GROUP
        q = _load_rows(
            Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_dk[None, :],
            offs_r,
            R,
            offs_dk,
            D_K,
            BLOCK_DK,
            True,
        )
        k = _load_rows(
            K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_dk[None, :],
            offs_n,
            S,
            offs_dk,
            D_K,
            BLOCK_DK,
            True,
        )
        lse = tl.load(Lse + (b * H + h) * L + rows, mask=r_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = _masked_scores(
            s,
            Mask + b * stride_mb + h * stride_mh,
            stride_ml,
            stride_ms,
            rows[:, None],
            offs_n[None, :],
            L,
            S,
            offset,
            window,
            qk_scale,
            CAUSAL,
            WINDOWED,
            MASK_KIND,
            True,
        )
        acc += tl.math.exp2(s * qk_scale - lse[:, None])
    if AVERAGE:
        acc = acc / H
    w_rows = pid_z.to(tl.int64) * R + offs_r
    w_ptrs = W + w_rows[:, None] * S + offs_n[None, :]
    tl.store(w_ptrs, acc, mask=r_ok[:, None] & (offs_n[None, :] < S))
