"""Small things a learner meets (issue 12, point 10): warnings for text the English
model reads poorly, and progress bars that stay readable in a log file."""

from __future__ import annotations

import io

import pytest

from qkv.cli.app import main
from qkv.pretrained.tokenizer import TokenizedText, language_warning
from qkv.train.trainer import progress_bar


def _tokenized(text: str, tokens: list[str]) -> TokenizedText:
    n = len(tokens)
    return TokenizedText(text, tokens, list(range(n)), list(range(n)), [(0, 0)] * n)


@pytest.mark.parametrize(
    ("text", "tokens", "needle"),
    [
        ("Это банк", ["э", "##то", "б", "##анк"], "100% of its letters are not ASCII"),
        ("a 🙂 b", ["a", "[UNK]", "b"], "1 of its 3 word pieces is [UNK]"),
        ("x 🙂 🙃", ["x", "[UNK]", "[UNK]"], "2 of its 3 word pieces are [UNK]"),
    ],
)
def test_language_warning_names_the_reason(text, tokens, needle):
    why = language_warning(_tokenized(text, tokens))
    assert why is not None and needle in why and "English" in why


@pytest.mark.parametrize("text", ["The bank of the river", "Un café au lait, s'il vous plaît"])
def test_english_and_a_few_accents_pass(text):
    assert language_warning(_tokenized(text, text.split())) is None


def test_commands_print_the_warning_as_one_line(capsys):
    assert main(["similarity", "Это наш банк у реки", "The bank of the river"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qkv: warning: text 'Это наш банк у реки'")
    assert main(["similarity", "The bank of the river", "A bank by the water"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_off_a_terminal_is_short_lines():
    log = io.StringIO()  # not a terminal
    bar = progress_bar(300, 0, "charlm/trainable", file=log, mininterval=0)
    for step in range(300):
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss="1.2345", tok_s="12345")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) > 10 and max(len(line) for line in lines) <= 80
    assert "300/300" in lines[-1]


def test_progress_on_a_terminal_redraws_in_place():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = progress_bar(10, 0, "t", file=screen, mininterval=0)
    bar.update(10)
    bar.close()
    assert "\r" in screen.getvalue()
