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
    "CONTROL_SENTENCES",
    "SPECIAL_TOKENS",
    "CompareVerdict",
    "ControlCosines",
    "Explanation",
    "Focus",
    "Movement",
    "StageAttention",
    "WordComparison",
    "WordVectors",
    "compare_word",
    "control_cosines",
    "explain",
    "find_focus",
    "judge_comparison",
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


# --- Control pairs for `qkv compare`: what a cosine between two uses of a word means ---
#
# The cosine of a word's contextual vectors in two sentences falls through the layers
# whenever the sentences differ, whether or not the word's sense does. Control pairs
# give it a scale: the same cosine for pairs that use the word in one sense, and (for
# the built-in words) for pairs that use it in two different senses.

#: Built-in control sentences: for each word, two senses with four sentences each.
CONTROL_SENTENCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bank": (
        (
            "I paid the cash in at the bank.",
            "The bank approved my loan.",
            "She opened a savings account at the bank.",
            "The bank charges a fee for every transfer.",
        ),
        (
            "We had a picnic on the bank of the river.",
            "The boat drifted towards the muddy bank.",
            "Reeds grew along the bank of the stream.",
            "He sat fishing on the grassy bank.",
        ),
    ),
    "bat": (
        (
            "A bat flew out of the cave at dusk.",
            "The bat hung upside down from the branch.",
            "Every bat in the colony hunts insects at night.",
            "The injured bat was taken to a wildlife rescue.",
        ),
        (
            "He swung the bat and hit the ball.",
            "She bought a new cricket bat.",
            "The bat cracked when it struck the ball.",
            "Hold the bat with both hands before the pitch.",
        ),
    ),
    "plant": (
        (
            "Water the plant on the windowsill every week.",
            "The plant grew new leaves in the spring sunshine.",
            "This plant needs plenty of light and little water.",
            "She repotted the plant into a larger pot.",
        ),
        (
            "The power plant supplies electricity to the city.",
            "Workers at the plant assemble car engines.",
            "The chemical plant was closed after the leak.",
            "The company built a new plant to make steel.",
        ),
    ),
    "spring": (
        (
            "The flowers bloom in spring.",
            "We plan to travel in the spring.",
            "Spring brings longer days and warmer weather.",
            "The lambs were born early this spring.",
        ),
        (
            "The spring in the mattress is broken.",
            "The clock stopped because its spring snapped.",
            "Press the button to release the spring.",
            "A steel spring holds the door shut.",
        ),
    ),
}


@dataclass(frozen=True)
class ControlCosines:
    """Cosines of one word's vectors in control pairs, stage by stage.

    Attributes:
        word: the word, as the tokenizer normalises it.
        source: ``"built-in"`` (:data:`CONTROL_SENTENCES`) or ``"given"`` (the caller's
            same-sense sentences, paired with each other and with the anchor text).
        labels: the stages, as in :class:`WordVectors`.
        same: ``(n_same, n_stages)`` float64, pairs that use the word in one sense.
        different: ``(n_different, n_stages)`` float64, pairs across two senses
            (no rows when only same-sense sentences were given).
    """

    word: str
    source: str
    labels: tuple[str, ...]
    same: Tensor
    different: Tensor


def _pair_cosines(vectors: list[Tensor], pairs: list[tuple[int, int]]) -> Tensor:
    if not pairs:
        return torch.empty(0, vectors[0].shape[0], dtype=torch.float64)
    return torch.stack(
        [F.cosine_similarity(vectors[i].double(), vectors[j].double(), dim=-1) for i, j in pairs]
    )  # (n_pairs, n_stages)


def control_cosines(
    model: SentenceEncoder,
    word: str,
    *,
    same_sense: list[str] | tuple[str, ...] = (),
    anchor: str | None = None,
    truncate: bool = False,
    baseline_scale: float = 1.0,
) -> ControlCosines | None:
    """Control pairs for ``word``: the caller's, else the built-in ones, else ``None``.

    With ``same_sense`` (sentences that use ``word`` in one sense, the sense it has in
    ``anchor`` when that is given), every pair among them and ``anchor`` is a
    same-sense pair. Otherwise a word of :data:`CONTROL_SENTENCES` gets its built-in
    sentences: pairs within a sense are same-sense pairs, pairs across the two senses
    different-sense pairs.
    """
    if isinstance(same_sense, str):
        raise TypeError("same_sense must be a list of sentences, not one str")
    key = model.tokenizer.normalize(word.strip()) if isinstance(word, str) else word
    kw = {"truncate": truncate, "baseline_scale": baseline_scale}
    if same_sense:
        texts = ([anchor] if anchor is not None else []) + list(same_sense)
        if len(texts) < 2:
            raise ValueError("give at least two same-sense sentences (or one and an anchor)")
        names = (["TEXT_A"] if anchor is not None else []) + [
            f"same-sense sentence {i + 1}" for i in range(len(same_sense))
        ]
        found = [
            word_vectors(model, t, word, name=n, **kw) for t, n in zip(texts, names, strict=True)
        ]
        vectors = [v.vectors for v in found]
        pairs = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))]
        return ControlCosines(
            key, "given", found[0].labels, _pair_cosines(vectors, pairs), _pair_cosines(vectors, [])
        )
    if key not in CONTROL_SENTENCES:
        return None
    first, second = CONTROL_SENTENCES[key]
    found = [word_vectors(model, t, key, name="a control sentence", **kw) for t in first + second]
    vectors = [v.vectors for v in found]
    n = len(first)
    same = [(i, j) for grp in (range(n), range(n, len(found))) for i in grp for j in grp if i < j]
    different = [(i, j) for i in range(n) for j in range(n, len(found))]
    return ControlCosines(
        key,
        "built-in",
        found[0].labels,
        _pair_cosines(vectors, same),
        _pair_cosines(vectors, different),
    )


@dataclass(frozen=True)
class CompareVerdict:
    """Where a comparison's last-stage cosine falls among its control pairs.

    Attributes:
        kind: ``"identical"`` (the two vectors agree at every stage), ``"no-controls"``,
            ``"like-same"`` (within the same-sense range only), ``"like-different"``
            (below every same-sense pair, within the different-sense range),
            ``"overlap"`` (within both ranges), ``"between"`` (below every same-sense
            pair, above every different-sense pair), ``"below-same"`` (below every
            same-sense pair, no different-sense pairs to compare with), ``"below-all"``
            (below every control pair), ``"above-all"`` (above every control pair).
        stage: the stage judged (the last one).
        cosine: the comparison's cosine at that stage.
        same_range, different_range: (lowest, highest) cosine of the control pairs at
            that stage, or ``None`` when there are none.
        summary: one or two sentences saying the above in words.
    """

    kind: str
    stage: str
    cosine: float
    same_range: tuple[float, float] | None
    different_range: tuple[float, float] | None
    summary: str


def _span(t: Tensor, stage: int) -> tuple[float, float] | None:
    return (float(t[:, stage].min()), float(t[:, stage].max())) if t.shape[0] else None


def judge_comparison(
    cmp: WordComparison, controls: ControlCosines | None, *, atol: float = 1e-6
) -> CompareVerdict:
    """Compare ``cmp``'s cosine after the last layer with the control pairs' cosines.

    This places one number on a scale; it does not classify senses. Identical vectors
    at every stage (identical inputs) are reported as such, with no scale needed.
    """
    stage, c = cmp.labels[-1], float(cmp.cosines[-1])
    word = repr(cmp.a.focus.word)
    if torch.allclose(cmp.a.vectors, cmp.b.vectors, rtol=0.0, atol=atol):
        summary = (
            f"Identical inputs: the two {word} vectors are the same at every stage "
            "(cosine 1.0000), so there is nothing to compare."
        )
        return CompareVerdict("identical", stage, c, None, None, summary)
    if controls is None:
        summary = (
            f"No control pairs for {word} (built in: {', '.join(CONTROL_SENTENCES)}; or "
            "give sentences with --same-sense). Without them the numbers cannot say whether "
            "the senses differ: cosines fall through the layers for same-sense pairs too."
        )
        return CompareVerdict("no-controls", stage, c, None, None, summary)
    same, diff = _span(controls.same, -1), _span(controls.different, -1)
    at = f"After {stage} the cosine is {c:.4f}"

    def r(span: tuple[float, float]) -> str:
        return f"{span[0]:.2f}-{span[1]:.2f}"

    in_same = same is not None and same[0] <= c <= same[1]
    in_diff = diff is not None and diff[0] <= c <= diff[1]
    lowest = min(s[0] for s in (same, diff) if s is not None)
    highest = max(s[1] for s in (same, diff) if s is not None)
    if in_same and in_diff:
        kind = "overlap"
        text = (
            f"{at}: within the range of both the same-sense pairs ({r(same)}) and the "
            f"different-sense pairs ({r(diff)}). For this word the two ranges overlap, so "
            "the cosine cannot tell whether the senses differ."
        )
    elif in_same:
        kind = "like-same"
        text = f"{at}: about as similar as the same-sense control pairs ({r(same)})."
        if diff is not None:
            text += f" Different-sense pairs: {r(diff)}."
    elif in_diff:
        kind = "like-different"
        text = (
            f"{at}: less similar than every same-sense control pair ({r(same)}), about as "
            f"similar as the different-sense pairs ({r(diff)})."
        )
    elif c > highest:
        kind = "above-all"
        text = f"{at}: more similar than every control pair (highest {highest:.2f})."
    elif c < lowest and diff is not None:
        kind = "below-all"
        text = f"{at}: less similar than every control pair (lowest {lowest:.2f})."
    elif diff is None:
        kind = "below-same"
        text = (
            f"{at}: less similar than every same-sense control pair ({r(same)}). The two "
            "contexts change the vector more than those pairs do; a different sense would "
            "do that, and so can a very different sentence."
        )
    else:
        kind = "between"
        text = (
            f"{at}: below every same-sense control pair ({r(same)}) and above every "
            f"different-sense pair ({r(diff)}): in between, so inconclusive."
        )
    return CompareVerdict(kind, stage, c, same, diff, text)
