"""User errors of the ``qkv`` command: what :func:`qkv.cli.app.main` prints in one line.

A traceback is for bugs in qkv. A mistake in what the user typed or pointed at (an
option, a text, a file, a folder) is reported as one ``qkv: error: ...`` line that
names the option or file, with exit status 2. To keep that split honest, commands do
not catch broad exception types deep inside the library; they check their inputs at
the boundary and turn failures of *those* checks into :class:`UsageError`:

* :func:`check_out_dir` looks at an output folder before any work is done;
* :func:`user_paths` wraps the code that reads or writes user-given paths and turns
  the operating system's refusal (``OSError``) into a :class:`UsageError` naming the
  option and the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["UsageError", "check_out_dir", "check_read_file", "describe_os_error", "user_paths"]


class UsageError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


def describe_os_error(option: str, path: str | Path, err: OSError) -> str:
    """One line naming the option, the path the system refused, and why."""
    where = err.filename if err.filename is not None else path
    why = err.strerror or str(err) or type(err).__name__
    shown = f"{option} {path}" if str(where) == str(path) else f"{option} {path} ({where})"
    return f"{shown}: {why}"


@contextmanager
def user_paths(option: str, path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`UsageError` about ``option``.

    Use it only around code whose file access is to the user's ``path`` (a run
    folder, an output folder): there the system's refusal is the user's to fix, not a bug.
    """
    try:
        yield
    except OSError as err:
        raise UsageError(describe_os_error(option, path, err)) from err


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a mkdir would start from)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(option: str, out: Path, folder: Path) -> None:
    """Create and remove an empty folder in ``folder``: the one honest test of writability.

    ``os.access`` says yes to root everywhere, and knows nothing of read-only mounts
    or of /proc; trying is what tells.
    """
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qkv-probe-", dir=folder))
    except OSError as err:
        why = err.strerror or str(err)
        where = "" if folder == out else f" (cannot create folders in {folder})"
        raise UsageError(f"{option} {out}: {why}{where}") from err


def check_out_dir(option: str, path: str | Path) -> Path:
    """Refuse an output folder that cannot be one, before any (slow) work starts.

    The folder itself is not created here, so a command that fails later for another
    reason leaves nothing behind. Returns ``path`` as a :class:`Path`.
    """
    if str(path) == "":
        raise UsageError(f"{option} is empty: give a folder")
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{option} {out} is a file, not a folder")
        _probe_writable(option, out, out)
        return out
    base = _nearest_existing(out)
    if not base.is_dir():
        raise UsageError(f"{option} {out}: {base} is a file, so it cannot hold a folder")
    _probe_writable(option, out, base)
    return out


def check_read_file(option: str, path: str | Path) -> Path:
    """Refuse an input file that is missing, a folder, or unreadable, naming ``option``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {p}: no such file")
    if p.is_dir():
        raise UsageError(f"{option} {p} is a folder, not a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{option} {p}: permission denied")
    return p
