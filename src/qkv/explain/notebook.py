"""The explorer inline in a Jupyter notebook.

``qkv.explain.show(expl)`` returns an object that Jupyter (and anything else that
calls ``_repr_html_``) displays as the explorer widget: the same code and data as the
page ``qkv explain`` writes (:mod:`qkv.explain.explorer`), as one self-contained HTML
fragment (no network, no extension to install). An :class:`~qkv.explain.Explanation`
left as the last expression of a cell shows itself the same way.

In a notebook the keys (``[`` ``]`` ``-`` ``=`` ``d`` ``f`` and the arrows) act while
the widget has the keyboard focus, so Jupyter's own shortcuts keep working elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from .analysis import Explanation
from .explorer import ExplorerInput, explorer_fragment, explorer_input

__all__ = ["ExplorerView", "show"]


@dataclass(frozen=True)
class ExplorerView:
    """What :func:`show` returns: Jupyter calls :meth:`_repr_html_` to display it.

    Attributes:
        input: the tokens, stages and choices shown.
    """

    input: ExplorerInput

    def _repr_html_(self) -> str:
        return explorer_fragment(self.input)

    def html(self) -> str:
        """The fragment itself (a ``<div>`` and two scripts), e.g. to embed elsewhere."""
        return self._repr_html_()


def show(
    source: Explanation | ExplorerInput,
    *,
    model_name: str = "",
    layer: int | None = None,
    head: int | None = None,
) -> ExplorerView:
    """The explorer for ``source``, opening at ``layer`` (from 1; 0 = the baseline;
    default the last) and ``head`` (from 1; default the average of the heads)."""
    if isinstance(source, Explanation):
        return ExplorerView(explorer_input(source, model_name, layer=layer, head=head))
    if isinstance(source, ExplorerInput):
        if layer is not None or head is not None:
            raise ValueError(
                "layer and head are for an Explanation; an ExplorerInput carries its own "
                "stage and head"
            )
        return ExplorerView(source)
    raise TypeError(
        f"source must be an Explanation or an ExplorerInput, got {type(source).__name__}"
    )
