"""Task generators: answers are right, splits never share an example, batches line up."""

from __future__ import annotations

import datetime

import pytest
import torch

from qkv.train.tasks import (
    IGNORE,
    TASKS,
    CharLMTask,
    Example,
    Vocab,
    agreement_text,
    date_in_words,
    make_task,
    split_of,
)

SEQ_TASKS = ["recall", "reverse", "sort", "date-to-iso", "iso-to-date"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "agreement.txt"
    path.write_text(agreement_text(3, 40_000), encoding="utf-8")
    return path


def test_every_task_is_listed():
    assert set(TASKS) == {*SEQ_TASKS, "charlm"}


@pytest.mark.parametrize("name", SEQ_TASKS)
def test_splits_are_disjoint_and_answers_correct(name):
    task = make_task(name, seed=5)
    sets = {s: task.examples(s, 300) for s in ("train", "val", "test")}
    keys = {s: {task.key(ex) for ex in exs} for s, exs in sets.items()}
    for s, exs in sets.items():
        assert len(exs) == 300, s
        assert len(keys[s]) == 300, f"{s}: duplicate examples"
        assert all(task.check(ex) for ex in exs)
        salt = "date" if "date" in name else name
        assert all(split_of(salt, task.key(ex)) == s for ex in exs)
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    # The training stream draws only training examples.
    stream = {task.key(ex) for step in range(20) for ex in task.train_examples(step, 32)}
    assert not stream & (keys["val"] | keys["test"])


def test_answers_by_hand():
    assert make_task("reverse").answer("abcz") == "zcba"
    assert make_task("sort").answer("dbcab") == "abbcd"
    recall = make_task("recall", n_pairs=4)
    # Values are scored where their key came before: "a" at 4, "k" at 6.
    assert recall.scored_positions("a3k7a3k7") == (5, 7)
    assert recall.check(Example("", "a3k7a3k7", (5, 7)))
    assert not recall.check(Example("", "a3k7a1k7", (5, 7)))  # "a" changed its value
    assert not recall.check(Example("", "a3k7a3k7", (3, 5, 7)))  # "k" at 2 is unpredictable
    assert date_in_words(datetime.date(1984, 3, 12)) == "twelfth of march nineteen eighty-four"
    assert date_in_words(datetime.date(1905, 1, 1)) == "first of january nineteen oh five"
    assert date_in_words(datetime.date(2000, 2, 29)) == "twenty-ninth of february two thousand"
    assert date_in_words(datetime.date(2013, 8, 22)) == "twenty-second of august twenty thirteen"
    assert date_in_words(datetime.date(1900, 12, 3)) == "third of december nineteen hundred"
    iso = make_task("date-to-iso")
    assert iso.answer("thirty-first of december twenty ninety-nine") == "2099-12-31"
    assert (
        make_task("iso-to-date").answer("1999-11-20")
        == "twentieth of november nineteen ninety-nine"
    )


def test_date_words_are_unique():
    # date-to-iso is only well-posed if no two dates share their words.
    start = datetime.date(1900, 1, 1).toordinal()
    stop = datetime.date(2099, 12, 31).toordinal()
    words = {date_in_words(datetime.date.fromordinal(d)) for d in range(start, stop + 1)}
    assert len(words) == stop - start + 1


def test_both_date_directions_share_splits():
    a, b = make_task("date-to-iso", seed=1), make_task("iso-to-date", seed=1)
    test_dates = {ex.target for ex in a.examples("test", 200)}
    train_dates = {ex.source for ex in b.examples("train", 2000)}
    assert not test_dates & train_dates


def test_training_stream_is_a_function_of_seed_and_step():
    a, b = make_task("sort", seed=2), make_task("sort", seed=2)
    assert a.train_examples(7, 16) == b.train_examples(7, 16)
    assert a.train_examples(7, 16) != a.train_examples(8, 16)
    assert a.train_examples(7, 16) != make_task("sort", seed=3).train_examples(7, 16)


def test_decoder_batch_puts_loss_on_the_answer_only():
    task = make_task("sort")
    b = task.collate([Example("cab", "abc"), Example("ba", "ab")], "decoder")
    v = task.vocab
    ids = [v.bos, *v.encode("cababc"), v.eos]
    assert b.inputs[0].tolist() == ids[:-1]
    # Position i predicts token i + 1: the answer and <eos> carry loss, the prompt none.
    assert b.labels[0].tolist() == [IGNORE] * 3 + [*v.encode("abc"), v.eos]
    assert b.inputs[1].tolist() == [v.bos, *v.encode("baab"), v.pad, v.pad]
    assert b.labels[1].tolist() == [IGNORE] * 2 + [*v.encode("ab"), v.eos, IGNORE, IGNORE]


def test_recall_scores_only_predictable_values():
    task = make_task("recall", n_pairs=4)
    b = task.collate([Example("", "a3k7a3k7", (5, 7))], "decoder")
    v = task.vocab
    assert b.inputs[0].tolist() == [v.bos, *v.encode("a3k7a3k7")]
    want = [IGNORE] * 9
    want[5], want[7], want[8] = v.stoi["3"], v.stoi["7"], v.eos  # position i predicts i + 1
    assert b.labels[0].tolist() == want
    with pytest.raises(ValueError, match="decoder"):
        task.collate([Example("", "a3a3", (3,))], "encdec")


def test_encdec_batch_pads_and_masks():
    task = make_task("reverse")
    b = task.collate([Example("abcd", "dcba"), Example("xyz", "zyx")], "encdec")
    v = task.vocab
    assert b.src.shape == (2, 4) and b.src_padding.tolist() == [[True] * 4, [True] * 3 + [False]]
    assert b.inputs[1].tolist() == [v.bos, *v.encode("zyx"), v.pad]
    assert b.labels[1].tolist() == [*v.encode("zyx"), v.eos, IGNORE]
    assert b.rows(1, 2).src.tolist() == b.src[1:2].tolist()


def test_charlm_splits_are_disjoint_chunks(text_file):
    task = make_task("charlm", seed=0, text=text_file, block=32)
    assert isinstance(task, CharLMTask)
    text = text_file.read_text()
    assert task.vocab.decode(task.vocab.encode(text[:100])) == text[:100]
    chunks = {s: {tuple(c.tolist()) for c in task.chunks[s]} for s in ("train", "val", "test")}
    assert all(chunks.values())
    assert not chunks["train"] & chunks["val"] and not chunks["train"] & chunks["test"]
    # Every training window lies inside one training chunk, and labels are inputs shifted by one.
    b = task.train_batch(3, 8)
    assert b.inputs.shape == b.labels.shape == (8, 32)
    assert torch.equal(b.inputs[:, 1:], b.labels[:, :-1])
    train_text = ["".join(task.vocab.itos[i] for i in c) for c in task.chunks["train"]]
    for row in range(8):
        window = task.vocab.decode(b.inputs[row].tolist() + b.labels[row, -1:].tolist())
        assert any(window in chunk for chunk in train_text)
    val = task.eval_batches("val", 10, 4)
    assert sum(len(x) for x in val) == 10


def test_agreement_text_agrees():
    text = agreement_text(1, 20_000)
    for sentence in text.split("\n")[:-1]:
        words = sentence.rstrip(".").split()
        subject = words[1] if words[1] not in _ADJS else words[2]
        plural = subject in _PLURALS
        verb = _main_verb(words)
        assert verb in (_PLURAL_VERBS if plural else _SINGULAR_VERBS), sentence


_ADJS = {"small", "old", "quiet", "clever", "tired", "happy"}
_PLURALS = {"cats", "dogs", "birds", "children", "foxes", "teachers", "robots", "farmers"}
_SINGULAR_VERBS = {"runs", "sleeps", "sings", "waits", "laughs", "is", "has"}
_PLURAL_VERBS = {"run", "sleep", "sing", "wait", "laugh", "are", "have"}


def _main_verb(words: list[str]) -> str:
    """The first verb of the main clause: skip the subject, a prepositional or a relative clause."""
    i = 2 if words[1] not in _ADJS else 3
    if words[i] == "that":  # "that the [adj] noun verb"
        i += 3 if words[i + 2] not in _ADJS else 4
        return words[i + 1]
    if words[i] in ("near", "behind", "with", "under", "beside"):
        i += 3 if words[i + 2] not in _ADJS else 4
    return words[i]


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("translate")
    with pytest.raises(ValueError, match="n_keys"):
        make_task("recall", n_keys=0)
    with pytest.raises(ValueError, match="does not take"):
        make_task("reverse", n_pairs=3)
    with pytest.raises(ValueError, match="needs a text file"):
        make_task("charlm")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="at least"):
        make_task("charlm", text=short)
    with pytest.raises(ValueError, match="not in this task's vocabulary"):
        Vocab("abc").encode("abd")
