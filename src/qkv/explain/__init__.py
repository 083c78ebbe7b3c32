"""Looking inside a pretrained model: attention per layer and head, the untrained
baseline beside it, how far each layer moves a word, heatmaps and the HTML explorer.

These helpers back the ``qkv explain``, ``qkv compare`` and ``qkv similarity``
commands; each returns plain dataclasses and tensors, so they can be used (and
tested) without the command line. See :mod:`qkv.explain.analysis` for the
conventions (stages, word pieces, "most focused head").
"""

from .analysis import (
    CONTROL_SENTENCES,
    SPECIAL_TOKENS,
    CompareVerdict,
    ControlCosines,
    Explanation,
    Focus,
    Movement,
    StageAttention,
    WordComparison,
    WordVectors,
    compare_word,
    control_cosines,
    explain,
    find_focus,
    judge_comparison,
    most_focused_head,
    sentence_similarities,
    word_vectors,
)
from .explorer import MAX_EXPLORER_TOKENS, explorer_data, write_explorer
from .heatmaps import save_heatmaps

__all__ = [
    "CONTROL_SENTENCES",
    "MAX_EXPLORER_TOKENS",
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
    "explorer_data",
    "find_focus",
    "judge_comparison",
    "most_focused_head",
    "save_heatmaps",
    "sentence_similarities",
    "word_vectors",
    "write_explorer",
]
