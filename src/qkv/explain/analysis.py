"""What the explain, compare and similarity commands compute, as tensors and dataclasses.

Shape legend: H heads · L tokens (queries) · S tokens (keys, S = L) · d_model width.

Conventions (the command line and the explorer follow them):

* **Stages.** ``stages[0]`` is the seeds' untrained baseline, ``stages[1..n]`` the
  trained layers 1..n. The baseline is :func:`qkv.simple_attention` on the model's own
  input embeddings (word + position + token type, after the embedding LayerNorm):
  query = key = value = those vectors, no projections, unscaled dot products, one head.
* **A word split into several word pieces** (``muddy`` -> ``mud ##dy``) is represented
  by the mean of its pieces: the mean of their attention rows (still a distribution
  over keys) and the mean of their vectors. Keys stay individual pieces.
* **A word that occurs several times**: the first occurrence is used unless the
  caller asks for another (``occurrence=2`` is the second; 1-based, as people count).
* **The most focused head** of a layer, for the focus word, is the head whose largest
  weight on one *other* word (not the focus word's own pieces, not [CLS] or [SEP], and
  in a causal decoder not the first token, its attention sink) is the highest of all
  heads. Plain "lowest entropy" would nearly always pick a head that
  parks its attention on [CLS] or [SEP], which BERT heads do when they have nothing to
  look up; the question here is which head links the word to its context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import simple_attention
from ..pretrained import EncoderIntermediates, SentenceEncoder, TokenizedText

__all__ = [
    "SPECIAL_TOKENS",
    "Explanation",
    "Focus",
    "Movement",
    "StageAttention",
    "WordComparison",
    "WordVectors",
    "compare_word",
    "explain",
    "find_focus",
    "most_focused_head",
    "sentence_similarities",
    "word_vectors",
]

#: Tokens the tokenizer adds; excluded when looking for a head's strongest link.
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]"})


@dataclass(frozen=True)
class Focus:
    """The word under study, located in a tokenised text.

    Attributes:
        word: the word as written in the text.
        positions: positions of its word pieces (several when it was split), in the
            chosen occurrence.
        occurrences: how many times the word occurs in the text.
        occurrence: which of them this is, from 1.
    """

    word: str
    positions: tuple[int, ...]
    occurrences: int = 1
    occurrence: int = 1

    @property
    def first(self) -> int:
        return self.positions[0]

    @property
    def label(self) -> str:
        """How to name the word to a reader: ``'bank'``, or ``the 2nd 'the'`` when the
        word occurs more than once (so nobody wonders which one is meant)."""
        if self.occurrences == 1:
            return repr(self.word)
        return f"the {ordinal(self.occurrence)} {self.word!r}"


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``21st``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def find_focus(
    text: TokenizedText,
    word: str | None,
    normalize: Callable[[str], str] = str.lower,
    *,
    occurrence: int = 1,
    what: str = "focus word",
    where: str = "the text",
) -> Focus:
    """Locate ``word`` in ``text``, comparing as the tokenizer normalises (lower case);
    ``None`` picks the first word of the text.

    ``occurrence`` (from 1) picks among repeated words: ``2`` is the second ``bank``.
    ``what`` and ``where`` name the word and the text in error messages.
    """
    if isinstance(occurrence, bool) or not isinstance(occurrence, int):
        raise TypeError(f"occurrence must be an int, got {type(occurrence).__name__}")
    if occurrence < 1:
        raise ValueError(f"occurrence counts from 1, got {occurrence}")
    words = []  # (normalised word, written word, piece positions)
    groups: dict[int, list[int]] = {}
    for pos, w in enumerate(text.word_ids):
        if w is not None:
            groups.setdefault(w, []).append(pos)
    for positions in groups.values():
        start, end = text.offsets[positions[0]][0], text.offsets[positions[-1]][1]
        written = text.text[start:end]
        words.append((normalize(written), written, tuple(positions)))
    if not words:
        raise ValueError(f"{where} has no words to look at")
    if word is None:
        word = words[0][1]
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"{what} is empty")
    wanted = normalize(word.strip())
    matches = [(written, pos) for norm, written, pos in words if norm == wanted]
    if not matches:
        listed = ", ".join(dict.fromkeys(written for _, written, _ in words))
        pieces = " ".join(text.tokens)
        raise ValueError(
            f"{what} {word!r} is not in {where}; its words are: {listed} (word pieces: {pieces})"
        )
    if occurrence > len(matches):
        times = "once" if len(matches) == 1 else f"{len(matches)} times"
        raise ValueError(
            f"occurrence {occurrence} of {what} {word!r} asked for, but it occurs {times} "
            f"in {where}"
        )
    written, positions = matches[occurrence - 1]
    return Focus(written, positions, len(matches), occurrence)


def most_focused_head(rows: Tensor, exclude: set[int]) -> tuple[int, int]:
    """``rows`` (H, S): the head with the largest weight on one allowed key, and that key.

    Keys in ``exclude`` (the focus word's pieces and special tokens) do not count; if
    every key is excluded, all keys count.
    """
    keep = torch.ones(rows.shape[-1], dtype=torch.bool)
    keep[list(exclude)] = False
    if not keep.any():
        keep[:] = True
    masked = rows.masked_fill(~keep, -1.0)  # (H, S); weights are >= 0, so -1 never wins
    best = masked.max(dim=-1)  # values and argmax per head, (H,)
    head = int(best.values.argmax())
    return head, int(best.indices[head])


@dataclass(frozen=True)
class StageAttention:
    """Where the focus word looks in one stage (the baseline or one trained layer).

    Attributes:
        label: ``"baseline"`` or ``"layer N"`` (N from 1).
        head_rows: ``(H, S)`` the focus row of every head (H = 1 for the baseline).
        mean_row: ``(S,)`` their average over heads.
        focused_head: index (from 0) of the most focused head (see module docs).
        focused_key: the key position that head weights most.
    """

    label: str
    head_rows: Tensor
    mean_row: Tensor
    focused_head: int
    focused_key: int


@dataclass(frozen=True)
class Movement:
    """How far a stage has moved the focus word's vector.

    Attributes:
        label: ``"input"``, ``"baseline"`` or ``"layer N"``.
        cos_from_input: cosine distance (1 - cosine) from the input embedding.
        cos_from_previous: cosine distance from the previous trained stage (layer N-1,
            or the input for layer 1 and the baseline).
        relative_shift: ``|h - x| / |x|``, x the input embedding.
        norm: ``|h|``.
    """

    label: str
    cos_from_input: float
    cos_from_previous: float
    relative_shift: float
    norm: float


@dataclass(frozen=True)
class Explanation:
    """Everything ``qkv explain`` shows, for one text.

    Attributes:
        text: the tokenised text (L pieces).
        focus: the focus word.
        run: the model's intermediates (batch of one).
        baseline_weights: ``(L, S)`` the untrained baseline's weights.
        baseline_context: ``(L, d_model)`` its context vectors.
        stages: baseline, then layers 1..n.
        movement: input, baseline, then layers 1..n.
        causal: True for a causal decoder: row i sees keys 0..i (the baseline too).
    """

    text: TokenizedText
    focus: Focus
    run: EncoderIntermediates
    baseline_weights: Tensor
    baseline_context: Tensor
    stages: tuple[StageAttention, ...]
    movement: tuple[Movement, ...]
    causal: bool = False

    @property
    def tokens(self) -> list[str]:
        return self.text.tokens

    def stage_weights(self, stage: int) -> Tensor:
        """``(H, L, S)`` weights of a stage (0 = baseline with H = 1, n = layer n)."""
        if stage == 0:
            return self.baseline_weights.unsqueeze(0)
        return self.run.layers[stage - 1].weights[0]

    def _repr_html_(self) -> str:
        # Jupyter shows an Explanation as the explorer (see qkv.explain.notebook).
        from .notebook import show

        return show(self)._repr_html_()


def _focus_vector(h: Tensor, focus: Focus) -> Tensor:
    """``h`` (L, d_model) -> (d_model,): mean over the focus word's pieces."""
    return h[list(focus.positions)].mean(0)


def _cos_distance(a: Tensor, b: Tensor) -> float:
    # Clamped: rounding can make 1 - cos of a vector with itself a hair below zero.
    return max(0.0, float(1.0 - F.cosine_similarity(a.double(), b.double(), dim=0)))


def explain(
    model: SentenceEncoder,
    text: str,
    focus: str | None = None,
    *,
    truncate: bool = False,
    baseline_scale: float = 1.0,
    occurrence: int = 1,
) -> Explanation:
    """Run ``text`` through ``model`` and gather what ``qkv explain`` shows about ``focus``.

    ``baseline_scale`` multiplies the baseline's dot products (1 = the seeds' plain
    dot product; smaller values soften its softmax). ``occurrence`` (from 1) picks a
    repeated focus word (see :func:`find_focus`). ``model`` is a
    :class:`~qkv.pretrained.SentenceEncoder` or a :class:`qkv.hf.explain_model.HFModel`;
    for a causal decoder (``model.causal``) the baseline is causal too, so that it
    answers the same question as the layers: what each token looks back at.
    """
    run = model.run(text, truncate=truncate)
    tokenized = run.texts[0]
    where = find_focus(tokenized, focus, model.tokenizer.normalize, occurrence=occurrence)
    causal = bool(getattr(model, "causal", False))
    x = run.embeddings[0]  # (L, d_model)
    base = simple_attention(x, need_weights=True, scale=baseline_scale, is_causal=causal)
    base_ctx, base_w = base  # (L, d_model), (L, S)
    pos = list(where.positions)
    exclude = set(pos) | {i for i, t in enumerate(tokenized.tokens) if t in SPECIAL_TOKENS}
    if causal and len(tokenized.tokens) > 1:
        # Decoder heads with nothing to look up park their weight on the first token
        # (an "attention sink"), as BERT heads park it on [CLS]/[SEP].
        exclude.add(0)

    stages = []
    for label, w in [("baseline", base_w.unsqueeze(0))] + [
        (f"layer {n + 1}", layer.weights[0]) for n, layer in enumerate(run.layers)
    ]:  # w: (H, L, S)
        rows = w[:, pos].mean(1)  # (H, S): mean over the focus word's pieces
        head, key = most_focused_head(rows, exclude)
        stages.append(StageAttention(label, rows, rows.mean(0), head, key))

    x_f = _focus_vector(x, where)  # (d_model,)
    moves = [Movement("input", 0.0, 0.0, 0.0, float(x_f.norm()))]
    b_f = _focus_vector(base_ctx, where)
    moves.append(
        Movement(
            "baseline",
            _cos_distance(b_f, x_f),
            _cos_distance(b_f, x_f),
            float((b_f - x_f).norm() / x_f.norm()),
            float(b_f.norm()),
        )
    )
    prev = x_f
    for n, layer in enumerate(run.layers):
        h_f = _focus_vector(layer.hidden[0], where)
        moves.append(
            Movement(
                f"layer {n + 1}",
                _cos_distance(h_f, x_f),
                _cos_distance(h_f, prev),
                float((h_f - x_f).norm() / x_f.norm()),
                float(h_f.norm()),
            )
        )
        prev = h_f
    return Explanation(tokenized, where, run, base_w, base_ctx, tuple(stages), tuple(moves), causal)


@dataclass(frozen=True)
class WordVectors:
    """The vectors of one word in one text, stage by stage.

    Attributes:
        focus: the word located in the text.
        labels: ``["input", "baseline", "layer 1", ...]``.
        vectors: ``(n_stages, d_model)``, in the order of ``labels``.
    """

    focus: Focus
    labels: tuple[str, ...]
    vectors: Tensor


def word_vectors(
    model: SentenceEncoder,
    text: str,
    word: str,
    *,
    truncate: bool = False,
    baseline_scale: float = 1.0,
    name: str = "the text",
    occurrence: int = 1,
) -> WordVectors:
    """The word's input embedding, baseline context vector, and each layer's output.

    ``occurrence`` (from 1) picks a repeated word (see :func:`find_focus`)."""
    run = model.run(text, truncate=truncate)
    where = find_focus(
        run.texts[0],
        word,
        model.tokenizer.normalize,
        occurrence=occurrence,
        what="word",
        where=name,
    )
    x = run.embeddings[0]  # (L, d_model)
    causal = bool(getattr(model, "causal", False))
    base_ctx = simple_attention(x, scale=baseline_scale, is_causal=causal)  # (L, d_model)
    per_stage = [x, base_ctx, *(layer.hidden[0] for layer in run.layers)]
    labels = ("input", "baseline", *(f"layer {n + 1}" for n in range(len(run.layers))))
    vectors = torch.stack([_focus_vector(h, where) for h in per_stage])  # (n_stages, d_model)
    return WordVectors(where, labels, vectors)


@dataclass(frozen=True)
class WordComparison:
    """One word in two texts: cosine similarity of its vectors, stage by stage.

    Attributes:
        a, b: the word's vectors in each text.
        cosines: ``(n_stages,)`` float64, in the order of ``a.labels``.
    """

    a: WordVectors
    b: WordVectors
    cosines: Tensor

    @property
    def labels(self) -> tuple[str, ...]:
        return self.a.labels


def compare_word(
    model: SentenceEncoder,
    text_a: str,
    text_b: str,
    word: str,
    *,
    truncate: bool = False,
    baseline_scale: float = 1.0,
    occurrences: tuple[int, int] = (1, 1),
) -> WordComparison:
    """Cosine similarity of ``word``'s vectors in ``text_a`` and ``text_b`` at every stage.

    Each text runs on its own (no padding), so each vector is exactly what the model
    computes for that sentence. ``occurrences`` picks a repeated word in each text
    (from 1, see :func:`find_focus`).
    """
    kw = {"truncate": truncate, "baseline_scale": baseline_scale}
    occ_a, occ_b = occurrences
    a = word_vectors(model, text_a, word, name="TEXT_A", occurrence=occ_a, **kw)
    b = word_vectors(model, text_b, word, name="TEXT_B", occurrence=occ_b, **kw)
    cos = F.cosine_similarity(a.vectors.double(), b.vectors.double(), dim=-1)  # (n_stages,)
    return WordComparison(a, b, cos)


def sentence_similarities(
    model: SentenceEncoder, sentences: list[str], *, truncate: bool = False
) -> Tensor:
    """``(N, N)`` cosine similarities of the sentences' embeddings (up to 512 tokens each)."""
    limit = model.config.max_position_embeddings
    emb = model.encode(sentences, max_length=limit, truncate=truncate).double()  # (N, d_model)
    emb = F.normalize(emb, dim=-1)  # a no-op for a normalising model; keeps cosines exact
    return emb @ emb.T
