"""Entry point of the ``qkv`` command.

Every command lives in its own module with a ``register(app)`` function; user
mistakes (ValueError, TypeError, qkv's own errors) are printed as one line on
stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import sys

import typer

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


class CLIError(Exception):
    """A user-facing error: printed in one line, exit status 2."""


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


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used by the console script)."""
    try:
        app(args=argv, standalone_mode=False)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"qkv: error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except typer.Abort:
        print("qkv: aborted", file=sys.stderr)
        return 1
    except Exception as err:
        # Usage errors from the click that typer bundles (its module path is private).
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            print(f"qkv: error: {err.format_message()}", file=sys.stderr)
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
