"""``qkv.hf.weights(...)``: ask transformers' ``output_attentions`` for less.

Shape legend: B batch · H query heads · L query length · S key/value length ·
R chosen query rows.

Eager attention can only return every weight of every layer, (B, H, L, S) each. qkv's
kernels compute exact weights for chosen rows, averaged over heads if wanted, without the
rest: the selection is a context variable read by the attention function, so it works
for any model and is per thread / async task.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["WeightSelection", "current_selection", "weights"]


@dataclass(frozen=True)
class WeightSelection:
    """Which attention weights ``output_attentions=True`` returns.

    Attributes:
        rows: query indices of each forward call (negatives count from the end:
            ``[-1]`` is the newest token); ``None`` = all L rows.
        layers: layer indices (``module.layer_idx``; negatives count from
            ``config.num_hidden_layers``); ``None`` = every layer. Unselected layers
            return no weights, so ``outputs.attentions`` holds only the chosen ones,
            in layer order.
        average_heads: average over heads; the head axis stays, with size 1.
    """

    rows: tuple[int, ...] | None = None
    layers: frozenset[int] | None = None
    average_heads: bool = False

    def wants_layer(self, layer_idx: int | None, num_layers: int | None) -> bool:
        if self.layers is None:
            return True
        if layer_idx is None:
            raise ValueError(
                "qkv.hf.weights(layers=...) needs attention modules that know their layer "
                "(module.layer_idx); this model's attention module has none"
            )
        if num_layers is not None and layer_idx - num_layers in self.layers:
            return True  # matched a negative index
        return layer_idx in self.layers


_SELECTION: contextvars.ContextVar[WeightSelection | None] = contextvars.ContextVar(
    "qkv_hf_weights", default=None
)


def current_selection() -> WeightSelection | None:
    """The innermost active :func:`weights` selection, or ``None``."""
    return _SELECTION.get()


def _int_tuple(name: str, values: Iterable[int] | int | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    try:
        out = tuple(values)
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a sequence of ints, got {type(values).__name__}"
        ) from None
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    return out


@contextlib.contextmanager
def weights(
    rows: Iterable[int] | int | None = None,
    layers: Iterable[int] | int | None = None,
    average_heads: bool = False,
) -> Iterator[WeightSelection]:
    """Within the block, ``output_attentions=True`` returns only the chosen weights.

    Each selected layer's entry of ``outputs.attentions`` is ``(B, H, R, S)``
    (``(B, 1, R, S)`` with ``average_heads``), computed exactly by qkv's kernels for just
    those rows; unselected layers are left out of the tuple. Only models running on
    ``attn_implementation="qkv"`` are affected; nested blocks replace the outer selection.

    Args:
        rows: query indices within each forward call; ``None`` = all.
        layers: layer indices; ``None`` = all.
        average_heads: return the head average instead of every head.
    """
    layer_tuple = _int_tuple("layers", layers)
    selection = WeightSelection(
        rows=_int_tuple("rows", rows),
        layers=None if layer_tuple is None else frozenset(layer_tuple),
        average_heads=bool(average_heads),
    )
    token = _SELECTION.set(selection)
    try:
        yield selection
    finally:
        _SELECTION.reset(token)
