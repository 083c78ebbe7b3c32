"""Entry point of the ``qkv`` command.

Every command lives in its own module with a ``register(app)`` function; user
mistakes (:class:`~qkv.cli.errors.UsageError`, raised where a command checks its
options, texts and files, and the library's ValueError/TypeError about its
arguments) are printed as one line on stderr with exit status 2, never as a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import warnings

import click
import typer
from typer.core import TyperGroup

from .errors import UsageError

#: Every command: the module of qkv.cli that registers it, and its one-line help.
#: ``qkv --help`` lists these without importing the modules (which import torch), so
#: the listing is fast; a test checks each line against the command's own help.
COMMANDS: dict[str, tuple[str, str]] = {
    "walkthrough": (
        "walkthrough",
        "Print each step of self-attention, baseline to multi-head output, for TEXT.",
    ),
    "train": ("train", "Train a small transformer whose attention is fixed, qk or trainable."),
    "generate": (
        "train",
        "Generate with a trained model: a task's answer, or a text continuation.",
    ),
    "experiment": (
        "train",
        "Train fixed, qk and trainable attention on every task; write tables and figures.",
    ),
    "explain": (
        "explain",
        "Show what a trained model attends to, layer by layer, for one word of TEXT.",
    ),
    "compare": (
        "compare",
        "How similar WORD's vectors are in two sentences, at every layer, beside controls.",
    ),
    "similarity": (
        "compare",
        "Cosine similarity of sentence embeddings (mean-pooled, normalised).",
    ),
    "bench": (
        "bench",
        "Time qkv's backends and modules beside PyTorch; write JSON, markdown, PNG.",
    ),
    "backends": ("backends", "List the attention backends and this machine's CPU capability."),
    "calibrate": (
        "backends",
        'Time "torch" against "flash" once, so "auto" picks the faster one on this machine.',
    ),
}


@functools.cache
def _module_commands(module: str) -> dict[str, click.Command]:
    """The click commands that ``qkv.cli.<module>`` registers (importing it now)."""
    mod = importlib.import_module(f"{__package__}.{module}")
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    mod.register(sub)
    return dict(typer.main.get_group(sub).commands)


def load_command(name: str) -> click.Command:
    """The real command ``name``, its module imported on first use."""
    return _module_commands(COMMANDS[name][0])[name]


class _LazyGroup(TyperGroup):
    """Lists the commands from :data:`COMMANDS`; imports a command's module only to run it
    (or to print its own ``--help``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        # A stand-in that carries the one-line help for the listing.
        return click.Command(cmd_name, help=COMMANDS[cmd_name][1])

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, _, rest = super().resolve_command(ctx, args)  # unknown names fail here
        return name, load_command(name), rest


app = typer.Typer(
    name="qkv",
    cls=_LazyGroup,
    help="Self-attention, step by step: from the untrained baseline to fast exact kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Self-attention, step by step: from the untrained baseline to fast exact kernels."""


#: The older name of :class:`UsageError`, kept for code that imports it from here.
CLIError = UsageError


def _one_line(message: str) -> str:
    """The message on one line: scripts and people both expect a single error line.

    Some messages span lines (PyTorch's load_state_dict report, a path holding a
    newline); their line breaks become " | " so nothing is lost.
    """
    return re.sub(r"\s*[\r\n]+\s*", " | ", message.strip()) or "(no message)"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for the user (a text the model reads poorly) as one plain line."""
    if category.__name__ == "LanguageWarning":  # by name: importing it would import torch
        print(f"qkv: warning: {_one_line(str(message))}", file=sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used by the console script)."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"qkv: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except typer.Abort:
        print("qkv: aborted", file=sys.stderr)
        return 1
    except Exception as err:
        # Usage errors from the click that typer bundles (its module path is private).
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            print(f"qkv: error: {_one_line(err.format_message())}", file=sys.stderr)
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
