"""Looking inside a pretrained model: attention per layer and head, the untrained
baseline beside it, how far each layer moves a word, heatmaps, the HTML explorer
(also inline in Jupyter: :func:`show`) and the weights saved to a file.

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
from .colour import ColourScale, colour_scale
from .explorer import (
    MAX_EXPLORER_TOKENS,
    ExplorerInput,
    ExplorerStage,
    explorer_data,
    explorer_html,
    explorer_input,
    write_explorer,
)
from .export import load_weights, save_weights
from .heatmaps import save_heatmaps
from .notebook import ExplorerView, show

__all__ = [
    "CONTROL_SENTENCES",
    "MAX_EXPLORER_TOKENS",
    "SPECIAL_TOKENS",
    "ColourScale",
    "CompareVerdict",
    "ControlCosines",
    "Explanation",
    "ExplorerInput",
    "ExplorerStage",
    "ExplorerView",
    "Focus",
    "Movement",
    "StageAttention",
    "WordComparison",
    "WordVectors",
    "colour_scale",
    "compare_word",
    "control_cosines",
    "explain",
    "explorer_data",
    "explorer_html",
    "explorer_input",
    "find_focus",
    "judge_comparison",
    "load_weights",
    "most_focused_head",
    "save_heatmaps",
    "save_weights",
    "sentence_similarities",
    "show",
    "word_vectors",
    "write_explorer",
]
