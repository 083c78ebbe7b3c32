"""``qkv --help`` answers without importing torch (issue 12, point 10).

The listing comes from :data:`qkv.cli.app.COMMANDS`; a command's module (and torch)
is imported only when that command runs or prints its own help.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qkv.cli.app import COMMANDS, load_command, main


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_help_does_not_import_torch():
    loaded = _modules_after("from qkv.cli.app import main\nmain(['--help'])")
    assert "qkv.cli.app" in loaded
    assert "torch" not in loaded and "qkv.cli.explain" not in loaded


def test_import_qkv_is_light_and_names_still_resolve():
    assert "torch" not in _modules_after("import qkv")
    loaded = _modules_after("import qkv\nqkv.MultiHeadAttention(8, 2)\nqkv.masks.causal_mask(2)")
    assert {"torch", "qkv.modules", "qkv.masks"} <= loaded


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f" {name} " in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_listed_help_is_the_commands_own(name):
    own = " ".join((load_command(name).help or "").split("\n\n")[0].split())
    assert COMMANDS[name][1] == own


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["nope"]) == 2
    assert "No such command" in capsys.readouterr().err
