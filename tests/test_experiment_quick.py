"""`qkv experiment --quick` shows the effect the committed full run measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.cli.app import main
from qkv.train.experiment import FULL, QUICK, quick_check, summarise, table_markdown

FULL_RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "results.json"


def test_quick_plan_is_part_of_the_full_plan():
    # The quick runs must be runs of the full experiment, or the comparison means nothing.
    full = {tp.task: tp for tp in FULL.tasks}
    for tp in QUICK.tasks:
        assert full[tp.task] == tp
    assert QUICK.seeds <= FULL.seeds and set(QUICK.variants) <= set(FULL.variants)


@pytest.mark.timeout(600)
def test_quick_experiment_reproduces_the_full_runs_effect(tmp_path, capsys):
    assert FULL_RESULTS.exists(), "commit experiments/results/ (run `qkv experiment`)"
    full = json.loads(FULL_RESULTS.read_text())
    out = tmp_path / "quick"
    code = main(
        [
            "experiment",
            "--quick",
            "--out",
            str(out),
            "--no-progress",
            "--against",
            str(FULL_RESULTS),
        ]
    )
    printed = capsys.readouterr().out
    quick = json.loads((out / "results.json").read_text())
    ok, why = quick_check(quick, full)
    assert ok, why
    assert code == 0 and "check passed" in printed
    # The effect itself, spelled out: trainable needs far fewer bits per character.
    row = quick["table"]["charlm"]
    assert max(row["trainable"]["values"]) < min(row["fixed"]["values"])
    assert (out / "loss_curves.png").stat().st_size > 10_000


def _fake(values: dict[str, list[float]], metric="bits_per_token") -> dict:
    from qkv.train.experiment import TaskPlan

    results = {
        ("charlm", v, s): {
            "test": {metric: x},
            "parameters": 1,
            "attention_parameters": 0,
        }
        for v, xs in values.items()
        for s, x in enumerate(xs)
    }
    plan = TaskPlan("charlm", 10, metric=metric)
    summary = summarise([plan], results, len(next(iter(values.values()))), tuple(values))
    summary.update(command="qkv experiment", seeds=2)
    return summary


def test_quick_check_fails_without_the_effect():
    full = _fake({"fixed": [1.6, 1.7, 1.65], "trainable": [0.6, 0.61, 0.6]})
    good = _fake({"fixed": [1.6, 1.7], "trainable": [0.6, 0.61]})
    assert quick_check(good, full)[0]
    assert "0.600" in table_markdown(good) and "| charlm | 10 | bits/char |" in table_markdown(good)
    no_effect = _fake({"fixed": [0.6, 0.61], "trainable": [0.6, 0.61]})
    ok, why = quick_check(no_effect, full)
    assert not ok and "differs from the full run" in why
    # A full run whose seeds disagree wildly raises the bar above the quick gain.
    noisy = _fake({"fixed": [1.6, 3.7, 0.65], "trainable": [0.6, 0.61, 0.6]})
    assert not quick_check(good, noisy)[0]


def test_experiment_refuses_bad_arguments(tmp_path, capsys):
    assert main(["experiment", "--quick", "--tasks", "sort", "--out", str(tmp_path)]) == 2
    assert "not in the quick plan" in capsys.readouterr().err
    assert main(["experiment", "--quick", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "jobs" in capsys.readouterr().err


def test_results_record_this_machine_not_a_fixed_phrase():
    from qkv._cpu import cpu_model
    from qkv.train.experiment import machine_description

    summary = _fake({"fixed": [1.6, 1.7], "trainable": [0.6, 0.61]})
    summary.update(
        train_seconds_total=120.0,
        train_seconds={"a": 60.0, "b": 60.0},
        jobs=2,
        machine=machine_description(),
    )
    text = table_markdown(summary)
    assert cpu_model() in text and "logical CPUs" in text
    assert "shared 2-core" not in text


@pytest.mark.filterwarnings("ignore:No artists with labels")  # plot() is stubbed out below
def test_loss_plot_is_in_bits_like_the_table(tmp_path, monkeypatch):
    import math

    import matplotlib.axes

    from qkv.train import experiment

    plotted, labels = [], []
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: plotted.append(list(y))
    )
    real_ylabel = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set_ylabel",
        lambda self, text, **kw: (labels.append(text), real_ylabel(self, text, **kw)),
    )
    summary = _fake({"fixed": [1.6, 1.7], "trainable": [0.6, 0.61]})
    nats = [[0, 2.0], [50, 1.0]]
    summary["curves"] = {f"charlm/{v}/{s}": nats for v in ("fixed", "trainable") for s in (0, 1)}
    experiment._plot_curves(summary, tmp_path / "curves.png")
    assert plotted and all(y == [2.0 / math.log(2), 1.0 / math.log(2)] for y in plotted)
    assert labels == ["train loss (bits/char)"]
