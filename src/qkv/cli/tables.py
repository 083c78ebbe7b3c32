"""Terminal tables that stay readable from 60 columns up, and use the width they are given.

Rich shrinks every column of a table that is wider than the terminal, row labels
included: at 80 columns ``qkv explain`` used to print ``sta…`` for "stage" and squeeze
a numeric column to nothing. The helpers here keep three promises, which
``tests/test_explain_cli.py`` checks at ``COLUMNS=60``, ``80`` and ``200``:

* a row label (the first column: a stage, a token's index, a sentence number) is
  never cut: its column is ``no_wrap`` with a minimum width of its longest label;
* text columns wrap (``overflow="fold"`` for a word longer than the column);
* bars are as wide as the room left over allows (from ``least`` to ``most`` cells),
  and are dropped rather than squeezed below ``least``.

The width is the terminal's when output is a terminal. Otherwise (a pipe, a test) it
is ``COLUMNS`` when that is set, else 120, so redirected output stays wide enough
to read and ``COLUMNS=80 qkv explain ... | less`` shows what an 80-column terminal would.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

__all__ = ["bar", "bar_width", "console", "label_column", "table_overhead"]

#: Width of output that goes to a pipe or a file when ``COLUMNS`` does not say.
PIPE_WIDTH = 120

_BLOCKS = " ▏▎▍▌▋▊▉█"


def console() -> Console:
    """A rich console (see the module docstring for its width).

    Emoji codes are off: a user's ``:smile:`` is text to show, not a picture.
    """
    if sys.stdout.isatty():
        return Console(emoji=False)
    width = PIPE_WIDTH
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        width = int(columns)
    return Console(width=width, color_system=None, emoji=False)


def bar(value: float, width: int = 20) -> str:
    """A horizontal bar for ``value`` in [0, 1], ``width`` characters at full scale."""
    cells = max(0.0, min(1.0, value)) * width
    full = int(cells)
    part = _BLOCKS[int((cells - full) * 8)] if full < width else ""
    return ("█" * full + part.strip()).ljust(width)


def table_overhead(columns: int) -> int:
    """Characters a rich table with the default box and padding spends on borders and
    padding for ``columns`` columns: one rule between columns and at both edges, one
    space each side of every cell."""
    return (columns + 1) + 2 * columns


def bar_width(total: int, used: int, bars: int = 1, *, most: int = 20, least: int = 6) -> int:
    """How wide each of ``bars`` bars can be when ``used`` of ``total`` columns are
    taken by everything else; 0 means "no room: leave the bars out"."""
    room = (total - used) // max(1, bars)
    if room < least:
        return 0
    return min(most, room)


def label_column(table: Table, header: str, labels: list[str], **kwargs) -> None:
    """Add a row-label column that rich may not shrink: as wide as the longest label."""
    widest = max([len(header), *(len(x) for x in labels)])
    table.add_column(header, no_wrap=True, min_width=widest, **kwargs)
