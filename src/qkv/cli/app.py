"""Entry point of the ``qkv`` command.

Every command lives in its own module with a ``register(app)`` function; user
mistakes (:class:`~qkv.cli.errors.UsageError`, raised where a command checks its
options, texts and files, and the library's ValueError/TypeError about its
arguments) are printed as one line on stderr with exit status 2, never as a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys

import typer

from .errors import UsageError

app = typer.Typer(
    name="qkv",
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


def _register_commands() -> None:
    # One line per command module; each module defines register(app).
    from . import walkthrough

    walkthrough.register(app)
    from . import train

    train.register(app)
    from . import compare, explain

    explain.register(app)
    compare.register(app)
    from . import bench

    bench.register(app)
    from . import backends

    backends.register(app)


_register_commands()


def _one_line(message: str) -> str:
    """The message on one line: scripts and people both expect a single error line.

    Some messages span lines (PyTorch's load_state_dict report, a path holding a
    newline); their line breaks become " | " so nothing is lost.
    """
    return re.sub(r"\s*[\r\n]+\s*", " | ", message.strip()) or "(no message)"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used by the console script)."""
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
