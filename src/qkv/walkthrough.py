"""The mechanism step by step on a short text: every intermediate, as tensors.

:func:`walkthrough` computes; ``qkv walkthrough`` prints.

Embeddings come from a vocabulary lookup (:func:`embed`): a word's vector depends on
the word alone, never on the sentence around it, so "the" gets the same vector
wherever it appears and two copies of one word get identical rows at every step
(nothing here tells positions apart). The guide's two example words, "thinking" and
"machine", have the hand-written 4-wide vectors of ``docs/guide.md`` section 2; any
other word gets numbers drawn from a generator seeded by a hash of the word (rounded
to one decimal, so they are easy to redo by hand). The projections are seeded the way
the guide's section 3 seeds its head, so with the defaults ``qkv walkthrough "thinking
machine"`` prints the guide's numbers.

Shape legend: L tokens · d_model embedding width · d_k query/key width · d_v value
width · H = 2 heads of width d_model / 2 in part C.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import scaled_dot_product_attention, simple_attention
from .masks import causal_mask
from .modules import MultiHeadAttention, SelfAttention

__all__ = ["GUIDE_EMBEDDINGS", "NUM_HEADS", "Walkthrough", "embed", "walkthrough"]

#: The hand-written embeddings of docs/guide.md, section 2 (used when d_model = 4).
GUIDE_EMBEDDINGS: dict[str, tuple[float, ...]] = {
    "thinking": (1.0, 0.0, 1.0, 0.0),
    "machine": (0.0, 1.0, 1.0, 1.0),
}

#: Heads of the multi-head part (part C).
NUM_HEADS = 2


def _word_seed(word: str, seed: int) -> int:
    """A stable 63-bit seed for ``word`` (Python's ``hash`` changes between runs)."""
    digest = hashlib.blake2b(f"{seed}\0{word}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def embed(tokens: Sequence[str], d_model: int = 4, *, seed: int = 0) -> Tensor:
    """Look up each token's embedding: ``(L, d_model)`` float64, one row per token.

    A row depends only on the token (and on ``d_model`` and ``seed``), never on its
    neighbours or its position. With ``d_model=4`` the words of
    :data:`GUIDE_EMBEDDINGS` get their hand-written vectors; every other word gets
    normal numbers, rounded to one decimal, from a generator seeded by a hash of the
    word and ``seed``.

    >>> e = embed(["the", "cat", "the"])
    >>> torch.equal(e[0], e[2]), torch.equal(e[0], embed(["the"])[0])
    (True, True)
    >>> embed(["thinking", "machine"])
    tensor([[1., 0., 1., 0.],
            [0., 1., 1., 1.]], dtype=torch.float64)
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of words, not one str: use text.split()")
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    rows = []
    for tok in tokens:
        if not isinstance(tok, str):
            raise TypeError(f"tokens must hold str, got {type(tok).__name__}")
        if d_model == 4 and tok in GUIDE_EMBEDDINGS:
            rows.append(torch.tensor(GUIDE_EMBEDDINGS[tok], dtype=torch.float64))
            continue
        gen = torch.Generator().manual_seed(_word_seed(tok, seed))
        row = torch.randn(d_model, generator=gen, dtype=torch.float64)
        rows.append(torch.round(row * 10) / 10 + 0.0)  # + 0.0 turns -0.0 into 0.0
    if not rows:
        return torch.empty(0, d_model, dtype=torch.float64)
    return torch.stack(rows)  # (L, d_model)


@dataclass(frozen=True)
class Walkthrough:
    """All intermediates for one input (L tokens, float64).

    Attributes:
        tokens: the L words.
        x: input embeddings (L, d_model), from :func:`embed`.
        baseline_scores, baseline_weights: x xᵀ and its row softmax, (L, L).
        baseline_context: baseline_weights @ x, (L, d_model).
        w_q, w_k: one head's projection matrices (d_model, d_k); w_v: (d_model, d_v).
        q, k: (L, d_k); v: (L, d_v).
        scores: q kᵀ / sqrt(d_k), (L, L); weights: softmax of scores; context: (L, d_v).
        causal_weights, causal_context: the same with a causal mask.
        mh_w_q, mh_w_k, mh_w_v: the multi-head layer's projections (d_model, d_model);
            head h uses columns ``h * d_model / H`` up to ``(h + 1) * d_model / H``.
        head_weights: (H, L, L) weights of each head.
        head_context: (H, L, d_model / H) context vectors of each head.
        concat: the heads' context vectors side by side, (L, d_model).
        w_o: the output projection (d_model, d_model).
        output: concat @ w_o, (L, d_model): what ``MultiHeadAttention`` returns.
    """

    tokens: list[str]
    x: Tensor
    baseline_scores: Tensor
    baseline_weights: Tensor
    baseline_context: Tensor
    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    weights: Tensor
    context: Tensor
    causal_weights: Tensor
    causal_context: Tensor
    mh_w_q: Tensor
    mh_w_k: Tensor
    mh_w_v: Tensor
    head_weights: Tensor
    head_context: Tensor
    concat: Tensor
    w_o: Tensor
    output: Tensor

    def repeated(self) -> dict[str, list[int]]:
        """Words that occur more than once, with their positions (from 1)."""
        where: dict[str, list[int]] = {}
        for i, tok in enumerate(self.tokens, start=1):
            where.setdefault(tok, []).append(i)
        return {tok: pos for tok, pos in where.items() if len(pos) > 1}


def walkthrough(
    text: str = "thinking machine", *, seed: int = 0, d_model: int = 4, d_k: int = 2, d_v: int = 3
) -> Walkthrough:
    """Compute every step of self-attention for ``text`` (words split on whitespace).

    Part A is the untrained baseline (``q = k = v = x``), part B one head with seeded
    projections (``torch.manual_seed(seed)`` then ``SelfAttention(d_model, d_k, d_v)``,
    as in the guide's section 3), part C a two-head ``MultiHeadAttention(d_model, 2,
    bias=False)`` made right after it, with its concatenation and output projection.
    The global random state is restored afterwards.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tokens = text.split()
    if not tokens:
        raise ValueError("text is empty: give at least one word")
    for name, value in (("seed", seed), ("d_model", d_model), ("d_k", d_k), ("d_v", d_v)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    for name, value in (("d_model", d_model), ("d_k", d_k), ("d_v", d_v)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {name}={value}")
    if d_model % NUM_HEADS:
        raise ValueError(
            f"d_model must be even to split into {NUM_HEADS} heads, got d_model={d_model}"
        )
    L, H, dh = len(tokens), NUM_HEADS, d_model // NUM_HEADS
    x = embed(tokens, d_model, seed=seed)  # (L, d_model)

    base = simple_attention(x, need_weights=True)  # q = k = v = x, unscaled

    with torch.random.fork_rng(devices=[]):  # module init draws from the global generator
        torch.manual_seed(seed)
        head = SelfAttention(d_model, d_k, d_v).double()
        mha = MultiHeadAttention(d_model, H, bias=False).double()
    with torch.no_grad():
        q, k, v = head.q_proj(x), head.k_proj(x), head.v_proj(x)  # (L, d_k), (L, d_k), (L, d_v)
        out = head(x, need_weights=True)
        causal = scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=causal_mask(L), need_weights=True
        )
        mh_w_q, mh_w_k, mh_w_v = (p.weight.T for p in (mha.q_proj, mha.k_proj, mha.v_proj))
        # Head h takes its own slice of the columns: (L, d_model) -> (H, L, d_model / H).
        qh, kh, vh = ((x @ w).view(L, H, dh).transpose(0, 1) for w in (mh_w_q, mh_w_k, mh_w_v))
        heads = scaled_dot_product_attention(qh, kh, vh, need_weights=True)  # (H, L, dh)
        concat = heads.output.transpose(0, 1).reshape(L, d_model)  # (L, H * dh)
        w_o = mha.out_proj.weight.T  # (d_model, d_model)
        output = concat @ w_o  # (L, d_model)
    return Walkthrough(
        tokens=tokens,
        x=x,
        baseline_scores=x @ x.T,
        baseline_weights=base.weights,
        baseline_context=base.output,
        w_q=head.q_proj.weight.detach().T,
        w_k=head.k_proj.weight.detach().T,
        w_v=head.v_proj.weight.detach().T,
        q=q,
        k=k,
        v=v,
        scores=q @ k.T / math.sqrt(d_k),
        weights=out.weights,
        context=out.output.detach(),
        causal_weights=causal.weights[0],
        causal_context=causal.output[0],
        mh_w_q=mh_w_q.detach(),
        mh_w_k=mh_w_k.detach(),
        mh_w_v=mh_w_v.detach(),
        head_weights=heads.weights,
        head_context=heads.output,
        concat=concat,
        w_o=w_o.detach(),
        output=output,
    )
