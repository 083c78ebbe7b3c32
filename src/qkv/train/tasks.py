"""Tasks for the learning experiment, generated offline from a seed.

Shape legend: B batch · L target length · S source length · V vocabulary size.

Every task works on characters. Sequence tasks turn a ``source`` string into a
``target`` string; their examples fall into the train, validation or test split by a
hash of the source, so no source (and hence no example) appears in two splits:

* ``recall``      associative recall: ``"a3k7m1?k" -> "7"`` (key-value pairs, then a key).
* ``reverse``     ``"qwerty" -> "ytrewq"``.
* ``sort``        ``"dbcab" -> "abbcd"``.
* ``date-to-iso`` ``"twelfth of march nineteen eighty-four" -> "1984-03-12"``.
* ``iso-to-date`` the same pairs the other way round.

``charlm`` is character-level language modelling on a text file: the text is cut
into chunks, and each chunk belongs to one split (again by hash).
:func:`agreement_text` writes a default text whose verbs agree with a subject that
can lie several words back.

A :class:`Batch` is built either for a decoder-only model (prompt and answer in one
sequence, loss on the answer only) or for an encoder-decoder (source into the
encoder, answer into the decoder). Training batches are a pure function of
``(seed, step)``, which is what makes resuming and multi-process training exact.
"""

from __future__ import annotations

import datetime
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "IGNORE",
    "TASKS",
    "Batch",
    "CharLMTask",
    "Example",
    "SeqTask",
    "Vocab",
    "agreement_text",
    "date_in_words",
    "make_task",
    "split_of",
]

SPLITS = ("train", "val", "test")
IGNORE = -100  # label of positions that carry no loss (torch's cross_entropy default)
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class Vocab:
    """Characters <-> ids; ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``."""

    def __init__(self, chars: str | list[str]) -> None:
        chars = sorted(set(chars))
        self.itos: list[str] = [PAD, BOS, EOS, *chars]
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    pad, bos, eos = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ValueError(f"characters {unknown} are not in this task's vocabulary")
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        """Ids to text, special tokens left out."""
        return "".join(self.itos[i] for i in ids if i > self.eos)

    def chars(self) -> list[str]:
        return self.itos[3:]


def split_of(task: str, key: str) -> str:
    """The split of an example: 80 % train, 10 % val, 10 % test, by a hash of its key."""
    h = int.from_bytes(hashlib.blake2b(f"{task}|{key}".encode(), digest_size=8).digest(), "big")
    r = h % 10
    return "test" if r == 0 else "val" if r == 1 else "train"


@dataclass(frozen=True)
class Example:
    """One source -> target pair.

    ``scored`` lists the target positions that carry loss and count for accuracy
    (``None``: all of them); the others are given to the model (teacher forcing).
    The end-of-answer token is always scored.
    """

    source: str
    target: str
    scored: tuple[int, ...] | None = None

    def answer_labels(self, vocab: Vocab) -> list[int]:
        """Target ids plus ``<eos>``, with ``IGNORE`` at unscored positions."""
        ids = vocab.encode(self.target)
        if self.scored is not None:
            keep = set(self.scored)
            ids = [t if i in keep else IGNORE for i, t in enumerate(ids)]
        return [*ids, vocab.eos]


@dataclass
class Batch:
    """Token ids for one step; ``IGNORE`` marks labels without loss.

    Attributes:
        inputs: ``(B, L)`` decoder input ids (right-padded with ``<pad>``).
        labels: ``(B, L)`` next-token targets, ``IGNORE`` where there is no loss.
        src: ``(B, S)`` encoder input (encoder-decoder only).
        src_padding: ``(B, S)`` bool, True = real source token.
    """

    inputs: Tensor
    labels: Tensor
    src: Tensor | None = None
    src_padding: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` (one process's shard of a global batch)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Batch(cut(self.inputs), cut(self.labels), cut(self.src), cut(self.src_padding))

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.inputs), move(self.labels), move(self.src), move(self.src_padding))


def _pad(rows: list[list[int]], value: int) -> Tensor:
    """Right-pad lists of ids to a ``(B, max length)`` int64 tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


class SeqTask:
    """A source -> target task; subclasses define :meth:`generate` and the alphabet.

    Args:
        seed: seeds the validation/test sets and the training stream.
    """

    name = ""
    default_model = "encdec"
    alphabet = ""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.vocab = Vocab(self.alphabet)

    # -- what a subclass provides ------------------------------------------------
    def generate(self, rng: random.Random) -> Example:
        """One random example from the whole space (any split)."""
        raise NotImplementedError

    def answer(self, source: str) -> str:
        """The correct target for ``source`` (the specification tests check)."""
        raise NotImplementedError

    def check(self, ex: Example) -> bool:
        """Whether ``ex`` is correct: its target is the answer to its source."""
        return ex.target == self.answer(ex.source)

    # -- sampling ----------------------------------------------------------------
    def key(self, ex: Example) -> str:
        """What identifies an example for the split (its source, unless said otherwise)."""
        return ex.source

    @property
    def split_salt(self) -> str:
        """Tasks with the same salt put the same keys in the same split."""
        return self.name

    def split(self, ex: Example) -> str:
        return split_of(self.split_salt, self.key(ex))

    def sample(self, rng: random.Random, split: str) -> Example:
        """A random example of ``split`` (rejection sampling on the hash split)."""
        while True:
            ex = self.generate(rng)
            if self.split(ex) == split:
                return ex

    def examples(self, split: str, n: int) -> list[Example]:
        """A fixed set of up to ``n`` distinct examples of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        rng = random.Random(f"{self.name}/{self.seed}/{split}")
        seen: dict[str, Example] = {}
        tries = 0
        while len(seen) < n and tries < 50 * n:
            ex = self.sample(rng, split)
            seen.setdefault(self.key(ex), ex)
            tries += 1
        return list(seen.values())

    def train_examples(self, step: int, n: int) -> list[Example]:
        """The ``n`` training examples of step ``step``: a pure function of (seed, step)."""
        rng = random.Random(f"{self.name}/{self.seed}/train/{step}")
        return [self.sample(rng, "train") for _ in range(n)]

    # -- batches -----------------------------------------------------------------
    def collate(self, examples: list[Example], model: str) -> Batch:
        """Examples -> :class:`Batch` for a ``"decoder"`` or ``"encdec"`` model."""
        v = self.vocab
        if model == "decoder":
            inputs, labels = [], []
            for ex in examples:
                prompt = [v.bos, *v.encode(ex.source)]
                ids = prompt + v.encode(ex.target) + [v.eos]
                inputs.append(ids[:-1])
                # Position i predicts token i + 1: only answer tokens carry loss.
                labels.append([IGNORE] * (len(prompt) - 1) + ex.answer_labels(v))
            return Batch(_pad(inputs, v.pad), _pad(labels, IGNORE))
        if model == "encdec":
            src = [v.encode(ex.source) for ex in examples]
            tgt = [v.encode(ex.target) for ex in examples]
            src_t = _pad(src, v.pad)
            return Batch(
                inputs=_pad([[v.bos, *t] for t in tgt], v.pad),
                labels=_pad([ex.answer_labels(v) for ex in examples], IGNORE),
                src=src_t,
                src_padding=_pad([[1] * len(s) for s in src], 0).bool(),
            )
        raise ValueError(f"model must be 'decoder' or 'encdec', got {model!r}")

    def train_batch(self, step: int, batch_size: int, model: str) -> Batch:
        return self.collate(self.train_examples(step, batch_size), model)

    def eval_batches(self, split: str, n: int, batch_size: int, model: str) -> list[Batch]:
        exs = self.examples(split, n)
        return [
            self.collate(exs[i : i + batch_size], model) for i in range(0, len(exs), batch_size)
        ]

    def max_length(self, model: str) -> int:
        """Longest sequence a model of kind ``model`` sees (for its position table)."""
        src, tgt = self.longest()
        return src + tgt + 2 if model == "decoder" else max(src, tgt + 1)

    def longest(self) -> tuple[int, int]:
        """Longest source and target, in characters."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed}


# ---------------------------------------------------------------------------------
class RecallTask(SeqTask):
    """In-context associative recall: a stream of key-value pairs in which keys recur.

    Each sequence draws its own table of ``n_keys`` keys with random values, then
    writes ``n_pairs`` pairs ``key value`` with keys drawn from that table, e.g.
    ``"a3k7a3m1k7m1a3"``. A value can only be predicted when its key appeared before,
    and then only by finding that earlier occurrence and passing on the token *after*
    it (the induction pattern); those values are scored, the rest is context. The
    whole stream is the target (the source is empty), so a decoder-only model reads
    it left to right.
    """

    name = "recall"
    default_model = "decoder"
    KEYS = "abcdefghijklmnop"
    VALUES = "0123456789"
    alphabet = KEYS + VALUES

    def __init__(self, seed: int = 0, n_pairs: int = 12, n_keys: int = 4) -> None:
        super().__init__(seed)
        if not 1 <= n_keys <= len(self.KEYS):
            raise ValueError(f"n_keys must lie in [1, {len(self.KEYS)}], got {n_keys}")
        if not isinstance(n_pairs, int) or n_pairs < 2:
            raise ValueError(f"n_pairs must be an integer >= 2, got {n_pairs!r}")
        self.n_pairs, self.n_keys = n_pairs, n_keys

    def generate(self, rng: random.Random) -> Example:
        table = {k: rng.choice(self.VALUES) for k in rng.sample(self.KEYS, self.n_keys)}
        keys = [rng.choice(list(table)) for _ in range(self.n_pairs)]
        target = "".join(k + table[k] for k in keys)
        return Example("", target, scored=self.scored_positions(target))

    @staticmethod
    def scored_positions(target: str) -> tuple[int, ...]:
        """Positions of values whose key occurred earlier in the stream."""
        seen, scored = set(), []
        for i in range(0, len(target), 2):
            if target[i] in seen:
                scored.append(i + 1)
            seen.add(target[i])
        return tuple(scored)

    def key(self, ex: Example) -> str:
        return ex.target

    def check(self, ex: Example) -> bool:
        t = ex.target
        table: dict[str, str] = {}
        for k, v in zip(t[0::2], t[1::2], strict=True):
            if table.setdefault(k, v) != v:
                return False
        return ex.source == "" and ex.scored == self.scored_positions(t)

    def collate(self, examples: list[Example], model: str) -> Batch:
        if model != "decoder":
            raise ValueError("the recall task is a stream: it needs model='decoder'")
        return super().collate(examples, model)

    def longest(self) -> tuple[int, int]:
        return 0, 2 * self.n_pairs

    def describe(self) -> dict:
        return {**super().describe(), "n_pairs": self.n_pairs, "n_keys": self.n_keys}


class _StringTask(SeqTask):
    """Random strings of ``min_len..max_len`` letters, mapped by :meth:`answer`."""

    alphabet = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, seed: int = 0, min_len: int = 4, max_len: int = 10) -> None:
        super().__init__(seed)
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.min_len, self.max_len = min_len, max_len

    def generate(self, rng: random.Random) -> Example:
        n = rng.randint(self.min_len, self.max_len)
        source = "".join(rng.choice(self.alphabet) for _ in range(n))
        return Example(source, self.answer(source))

    def longest(self) -> tuple[int, int]:
        return self.max_len, self.max_len

    def describe(self) -> dict:
        return {**super().describe(), "min_len": self.min_len, "max_len": self.max_len}


class ReverseTask(_StringTask):
    name = "reverse"

    def answer(self, source: str) -> str:
        return source[::-1]


class SortTask(_StringTask):
    name = "sort"

    def answer(self, source: str) -> str:
        return "".join(sorted(source))


# -- dates ------------------------------------------------------------------------
_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORD = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
_MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
_FIRST_DAY = datetime.date(1900, 1, 1).toordinal()
_LAST_DAY = datetime.date(2099, 12, 31).toordinal()


def _number(n: int) -> str:
    """0..99 in words: ``42 -> "forty-two"``."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _ordinal(n: int) -> str:
    """1..31 as an ordinal: ``21 -> "twenty-first"``, ``30 -> "thirtieth"``."""
    words = _number(n).split("-")
    last = words[-1]
    if last in _ORD:
        last = _ORD[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return "-".join([*words[:-1], last])


def _year(y: int) -> str:
    """1900..2099 as spoken: ``1905 -> "nineteen oh five"``, ``2007 -> "two thousand seven"``."""
    hi, lo = divmod(y, 100)
    if y == 1900:
        return "nineteen hundred"
    if 2000 <= y < 2010:
        return "two thousand" + ("" if y == 2000 else " " + _ONES[lo])
    return _number(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else _number(lo))


def date_in_words(d: datetime.date) -> str:
    """``date(1984, 3, 12) -> "twelfth of march nineteen eighty-four"``.

    >>> date_in_words(datetime.date(2021, 11, 30))
    'thirtieth of november twenty twenty-one'
    """
    return f"{_ordinal(d.day)} of {_MONTHS[d.month - 1]} {_year(d.year)}"


class _DateTask(SeqTask):
    """Dates between 1900 and 2099; each date belongs to one split in both directions."""

    alphabet = "0123456789- abcdefghijklmnopqrstuvwxyz"
    to_iso = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._words = {}

    def generate(self, rng: random.Random) -> Example:
        d = datetime.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
        iso, words = d.isoformat(), date_in_words(d)
        return Example(words, iso) if self.to_iso else Example(iso, words)

    def key(self, ex: Example) -> str:
        return ex.target if self.to_iso else ex.source

    @property
    def split_salt(self) -> str:
        return "date"  # one split per date, shared by both directions

    def answer(self, source: str) -> str:
        if not self.to_iso:
            return date_in_words(datetime.date.fromisoformat(source))
        if not self._words:
            for day in range(_FIRST_DAY, _LAST_DAY + 1):
                d = datetime.date.fromordinal(day)
                self._words[date_in_words(d)] = d.isoformat()
        return self._words[source]

    def longest(self) -> tuple[int, int]:
        words = len("twenty-seventh of september nineteen seventy-seven")
        return (words, 10) if self.to_iso else (10, words)


class DateToIsoTask(_DateTask):
    name = "date-to-iso"


class IsoToDateTask(_DateTask):
    name = "iso-to-date"
    to_iso = False


# -- character-level language modelling -------------------------------------------
class CharLMTask:
    """Next-character prediction on a text file.

    The text is cut into chunks of ``4 * (block + 1)`` characters; each chunk falls in
    one split by hash. Training windows of ``block + 1`` characters start anywhere
    inside a training chunk; validation and test use each chunk's non-overlapping
    windows. Loss is reported per character (bits per character = loss / ln 2).
    """

    name = "charlm"
    default_model = "decoder"

    def __init__(self, seed: int = 0, text: str | Path | None = None, block: int = 64) -> None:
        if text is None:
            raise ValueError("the charlm task needs a text file: pass --text FILE")
        self.path = str(text)
        try:
            data = Path(text).read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read the text file {str(text)!r}: {err}") from err
        self.seed = int(seed)
        self.block = block
        chunk = 4 * (block + 1)
        if len(data) < 20 * chunk:
            raise ValueError(
                f"text file {self.path!r} has {len(data)} characters; charlm with block={block} "
                f"needs at least {20 * chunk}"
            )
        self.vocab = Vocab(data)
        ids = torch.tensor(self.vocab.encode(data), dtype=torch.int64)
        n = len(ids) // chunk
        self.chunks = {s: [] for s in SPLITS}
        for i in range(n):
            self.chunks[split_of("charlm", str(i))].append(ids[i * chunk : (i + 1) * chunk])
        for s in SPLITS:
            if not self.chunks[s]:
                raise ValueError(f"text file {self.path!r} is too short to fill the {s} split")

    def windows(self, split: str, n: int) -> Tensor:
        """Up to ``n`` non-overlapping windows ``(N, block + 1)`` of ``split``."""
        w = self.block + 1
        rows = [c[i : i + w] for c in self.chunks[split] for i in range(0, len(c) - w + 1, w)]
        return torch.stack(rows[:n])

    def train_batch(self, step: int, batch_size: int, model: str = "decoder") -> Batch:
        rng = random.Random(f"charlm/{self.seed}/train/{step}")
        w = self.block + 1
        rows = []
        for _ in range(batch_size):
            c = rng.choice(self.chunks["train"])
            i = rng.randint(0, len(c) - w)
            rows.append(c[i : i + w])
        x = torch.stack(rows)  # (B, block + 1)
        return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous())

    def eval_batches(self, split: str, n: int, batch_size: int, model: str = "decoder"):
        x = self.windows(split, n)
        return [
            Batch(x[i : i + batch_size, :-1].contiguous(), x[i : i + batch_size, 1:].contiguous())
            for i in range(0, len(x), batch_size)
        ]

    def max_length(self, model: str = "decoder") -> int:
        return self.block

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed, "text": self.path, "block": self.block}


# -- a default text for charlm ------------------------------------------------------
_NOUNS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("child", "children"),
    ("fox", "foxes"),
    ("teacher", "teachers"),
    ("robot", "robots"),
    ("farmer", "farmers"),
]
_VERBS = [
    ("runs", "run"),
    ("sleeps", "sleep"),
    ("sings", "sing"),
    ("waits", "wait"),
    ("laughs", "laugh"),
    ("is here", "are here"),
    ("has gone", "have gone"),
]
_TRANSITIVE = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("helps", "help")]
_PREPS = ["near", "behind", "with", "under", "beside"]
_ADJS = ["small", "old", "quiet", "clever", "tired", "happy"]
_ENDS = ["", " today", " again", " at night", " in the garden", " every morning"]


def agreement_text(seed: int = 0, n_chars: int = 200_000) -> str:
    """Sentences whose verb agrees in number with a subject several words back.

    ``"the old dogs near the cat run today."`` — the noun right before the verb
    (``cat``) is a distractor; only the subject (``dogs``) decides ``run``/``runs``.

    >>> text = agreement_text(0, 2000)
    >>> len(text), text.count(".") > 20
    (2000, True)
    """
    rng = random.Random(f"agreement/{seed}")

    def noun_phrase(plural: bool) -> str:
        adj = rng.choice(_ADJS) + " " if rng.random() < 0.4 else ""
        return "the " + adj + rng.choice(_NOUNS)[plural]

    out: list[str] = []
    size = 0
    while size < n_chars:
        plural = rng.random() < 0.5
        subject = noun_phrase(plural)
        other = noun_phrase(rng.random() < 0.5)
        r = rng.random()
        if r < 0.4:
            middle = f" {rng.choice(_PREPS)} {other}"
        elif r < 0.7:
            middle = f" that {other} {rng.choice(_TRANSITIVE)[other.split()[-1] in _PLURALS]}"
        else:
            middle = ""
        verb = rng.choice(_VERBS)[plural]
        sentence = f"{subject}{middle} {verb}{rng.choice(_ENDS)}.\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


_PLURALS = {p for _, p in _NOUNS}

TASKS: dict[str, type] = {
    t.name: t for t in (RecallTask, ReverseTask, SortTask, DateToIsoTask, IsoToDateTask, CharLMTask)
}


def make_task(name: str, seed: int = 0, **options) -> SeqTask | CharLMTask:
    """The task called ``name`` (see :data:`TASKS`), seeded; options go to its constructor.

    >>> t = make_task("reverse", seed=1)
    >>> ex = t.examples("test", 1)[0]
    >>> ex.target == ex.source[::-1]
    True
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return TASKS[name](seed, **options)
    except TypeError as err:
        raise ValueError(f"task {name!r} does not take these options: {options}: {err}") from err
