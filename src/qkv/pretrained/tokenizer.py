"""WordPiece tokenisation with the ``tokenizers`` library, read from ``tokenizer.json``.

The file shipped with all-MiniLM-L6-v2 carries its own truncation (128) and fixed
padding (128) settings; they are switched off here so that qkv decides both: inputs
are padded to the longest in a batch, and cut only where the caller asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "NON_ASCII_SHARE",
    "Batch",
    "LanguageWarning",
    "TokenizedText",
    "Tokenizer",
    "language_warning",
]


@dataclass(frozen=True)
class TokenizedText:
    """One text as the model reads it (special tokens included).

    Attributes:
        text: the original text.
        tokens: the L word pieces, e.g. ``["[CLS]", "the", "bank", ..., "[SEP]"]``.
        ids: their vocabulary ids, length L.
        word_ids: for each piece, the index of the word it came from (None for specials).
        offsets: for each piece, its ``(start, end)`` characters in ``text``.
        truncated: whether pieces were dropped to fit the length limit.
    """

    text: str
    tokens: list[str]
    ids: list[int]
    word_ids: list[int | None]
    offsets: list[tuple[int, int]]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def words(self) -> list[tuple[str, list[int]]]:
        """The words of the text, each with the positions of its pieces, in order."""
        out: dict[int, list[int]] = {}
        for pos, w in enumerate(self.word_ids):
            if w is not None:
                out.setdefault(w, []).append(pos)
        return [("".join(self.tokens[p].removeprefix("##") for p in ps), ps) for ps in out.values()]


@dataclass(frozen=True)
class Batch:
    """Padded ids for the model.

    Attributes:
        input_ids: ``(B, L)`` int64, padded with ``[PAD]`` on the right.
        attention_mask: ``(B, L)`` bool, True = real token (the key-padding convention).
    """

    input_ids: Tensor
    attention_mask: Tensor


class Tokenizer:
    """The model's WordPiece tokenizer (lower-casing, [CLS] ... [SEP] template)."""

    def __init__(self, path: str | Path, *, max_length: int = 512) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{path} is not a readable tokenizer file ({err})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = max_length
        self.pad_id = self._tok.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError(f"{path}: the vocabulary has no [PAD] token")

    def normalize(self, word: str) -> str:
        """The word as the model sees it (lower-cased, accents as configured)."""
        normalizer = self._tok.normalizer
        return normalizer.normalize_str(word) if normalizer is not None else word

    def __call__(
        self, text: str, *, max_length: int | None = None, truncate: bool = False
    ) -> TokenizedText:
        """Tokenise one text.

        Args:
            text: a non-empty string.
            max_length: the limit in pieces, [CLS] and [SEP] included (default: the
                model's ``max_length``).
            truncate: cut a longer text to the limit; without it a longer text raises
                ``ValueError`` saying how long it is.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty: give at least one word")
        limit = self.max_length if max_length is None else max_length
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
            raise ValueError(f"max_length must be an integer >= 2 ([CLS] and [SEP]), got {limit!r}")
        enc = self._tok.encode(text)
        if len(enc.ids) > limit:
            if not truncate:
                raise ValueError(
                    f"text is {len(enc.ids)} tokens long ([CLS] and [SEP] included) but the "
                    f"model reads at most {limit}; shorten it or ask for truncation "
                    "(--truncate, or truncate=True)"
                )
            # Keep the first limit - 1 pieces and close with [SEP], as BERT expects.
            n = limit - 1
            return TokenizedText(
                text,
                [*enc.tokens[:n], enc.tokens[-1]],
                [*enc.ids[:n], enc.ids[-1]],
                [*enc.word_ids[:n], None],
                [*enc.offsets[:n], (0, 0)],
                truncated=True,
            )
        return TokenizedText(text, enc.tokens, enc.ids, list(enc.word_ids), list(enc.offsets))

    def batch(self, texts: list[TokenizedText]) -> Batch:
        """Pad tokenised texts to the longest: ``input_ids`` and ``attention_mask`` (B, L)."""
        L = max(len(t) for t in texts)
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(texts), L, dtype=torch.bool)  # (B, L)
        for row, t in enumerate(texts):
            ids[row, : len(t)] = torch.tensor(t.ids, dtype=torch.long)
            mask[row, : len(t)] = True
        return Batch(ids, mask)


class LanguageWarning(UserWarning):
    """A text the English model is unlikely to read well (see :func:`language_warning`)."""


#: Above this share of non-ASCII letters, a text is taken to be mostly not English.
NON_ASCII_SHARE = 0.3


def language_warning(tokenized: TokenizedText) -> str | None:
    """Why the model may read ``tokenized`` poorly, or ``None`` when nothing stands out.

    all-MiniLM-L6-v2's vocabulary and training are English. Two signs that a text is
    outside them: word pieces the vocabulary lacks (``[UNK]``, the piece stands for
    nothing), and a text whose letters are mostly not ASCII (Cyrillic, Greek, CJK ...:
    split into single characters that the model has seen little of).
    """
    unknown = tokenized.tokens.count("[UNK]")
    letters = [c for c in tokenized.text if c.isalpha()]
    share = sum(not c.isascii() for c in letters) / len(letters) if letters else 0.0
    reasons = []
    if unknown:
        real = sum(w is not None for w in tokenized.word_ids)
        verb = "is" if unknown == 1 else "are"
        reasons.append(f"{unknown} of its {real} word pieces {verb} [UNK] (not in the vocabulary)")
    if share > NON_ASCII_SHARE:
        reasons.append(f"{share:.0%} of its letters are not ASCII")
    if not reasons:
        return None
    shown = tokenized.text if len(tokenized.text) <= 40 else tokenized.text[:39] + "…"
    return (
        f"text {shown!r}: {'; '.join(reasons)}. The model was trained on English, so its "
        "vectors and attention for this text may mean little."
    )
