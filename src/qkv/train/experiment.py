"""The experiment: do learned projections beat fixed similarity, where, and by how much?

Trains every task with the ``fixed``, ``qk`` and ``trainable`` attention variants and
several seeds, each run in its own process with one thread (so results do not depend
on how many run at once), then writes under the results folder:

* ``results.md`` / ``results.json`` — mean, spread and range of the test metric per
  task and variant (answer accuracy; bits per character for ``charlm``), with the
  command that reproduces them;
* ``loss_curves.png`` — training loss in bits per token (bits per character for
  ``charlm``, as in the table) against steps, mean over seeds, min-max band;
* ``attention_<task>.png`` — what the trained models attend to on a test example
  (each layer's sharpest head).

Finished runs are reused (their ``results.json`` is read back when the settings
match), and interrupted ones resumed, so a stopped experiment continues where it was.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from .tasks import agreement_text
from .trainer import TrainConfig, read_metrics, train
from .variants import VARIANTS

__all__ = ["FULL", "QUICK", "ExperimentPlan", "TaskPlan", "run_experiment", "summarise"]


@dataclass(frozen=True)
class TaskPlan:
    """How one task is trained in the experiment.

    Attributes:
        task: task name.
        steps: optimiser steps per run.
        options: further :class:`TrainConfig` settings (model size, lr, task options).
        metric: ``"seq_acc"`` (higher is better) or ``"bits_per_token"`` (lower is better).
    """

    task: str
    steps: int
    options: dict = field(default_factory=dict)
    metric: str = "seq_acc"

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "bits_per_token"


@dataclass(frozen=True)
class ExperimentPlan:
    """Tasks, variants and seeds of one experiment; ``heatmaps`` names the tasks drawn."""

    name: str
    tasks: tuple[TaskPlan, ...]
    seeds: int
    variants: tuple[str, ...] = VARIANTS
    heatmaps: tuple[str, ...] = ()


_COMMON = {"eval_every": 250, "checkpoint_every": 500, "eval_examples": 500, "test_examples": 1000}

# charlm is the quick check's task, so its full-run setting is kept small enough for
# the test suite: the quick runs are exactly the full run's seeds 0 and 1.
_CHARLM = TaskPlan(
    "charlm", 600, {**_COMMON, "block": 32, "batch_size": 32}, metric="bits_per_token"
)

#: The full experiment (``qkv experiment``).
FULL = ExperimentPlan(
    name="full",
    tasks=(
        TaskPlan("recall", 3000, {**_COMMON}),
        TaskPlan("reverse", 600, {**_COMMON}),
        TaskPlan("sort", 600, {**_COMMON}),
        TaskPlan("date-to-iso", 600, {**_COMMON}),
        TaskPlan("iso-to-date", 600, {**_COMMON}),
        _CHARLM,
    ),
    seeds=3,
    heatmaps=("date-to-iso", "recall", "charlm"),
)

#: The quick check (``qkv experiment --quick``, run by the tests): the full run's
#: charlm setting, seeds 0 and 1, fixed against trainable.
QUICK = ExperimentPlan(name="quick", tasks=(_CHARLM,), seeds=2, variants=("fixed", "trainable"))

CHARLM_TEXT = "agreement.txt"


def _run_one(cfg_dict: dict, run_dir: str, resume: bool) -> dict:
    """Train one run in a worker process (one thread); returns its results.json."""
    import torch

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(cfg_dict)
    return train(cfg, run_dir, resume=resume, progress=False, threads=1)


def _finished(run_dir: Path, cfg: TrainConfig) -> dict | None:
    """The results of a finished run with exactly these settings, else ``None``."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())["train"]
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    return results if saved == cfg.to_dict() else None


def _stale(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a run with settings other than ``cfg``."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())["train"]
    except (OSError, KeyError, json.JSONDecodeError):
        return False
    return saved != cfg.to_dict()


def _curve(run_dir: Path, every: int = 50) -> list[list[float]]:
    """Training loss every ``every`` steps, as ``[step, loss]`` pairs."""
    return [
        [r["step"], r["loss"]]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("split") == "train" and r["step"] % every == 0
    ]


def _train_seconds(run_dir: Path) -> float:
    """Wall time of a run's training loop (summed over resumed pieces), from metrics.jsonl."""
    total, last = 0.0, 0.0
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r.get("split") != "train":
            continue
        if r["elapsed_s"] < last:  # the clock restarted: a resumed piece begins
            total += last
        last = r["elapsed_s"]
    return round(total + last, 1)


def run_experiment(
    *,
    quick: bool = False,
    out: str | Path | None = None,
    work: str | Path | None = None,
    jobs: int = 2,
    seeds: int | None = None,
    tasks: list[str] | None = None,
    progress: bool = True,
    command: str | None = None,
    against: str | Path | None = "experiments/results/results.json",
) -> dict:
    """Run the plan (``QUICK`` or ``FULL``) and write tables and figures; returns the summary.

    Args:
        quick: run :data:`QUICK` instead of :data:`FULL`.
        out: results folder (default ``experiments/results``, or ``out/experiment-quick``).
        work: where the runs are trained (default ``out/experiment-runs``, git-ignored; or ``<out>/runs``
            for ``quick``).
        jobs: runs trained at the same time, one process and one thread each.
        seeds: seeds per task and variant (default: the plan's).
        tasks: a subset of the plan's tasks.
        progress: print a line per finished run.
        command: the command line recorded beside the results (default: rebuilt).
        against: with ``quick``, the full run's results.json to check the effect against
            (see :func:`quick_check`); the verdict is in ``summary["check"]``.
    """
    plan = QUICK if quick else FULL
    # Read the reference before training, so a damaged file fails in a second, not
    # after the runs.
    full_results = read_against(against) if quick and against is not None else None
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    setup = _set_up(plan, quick, out, work, seeds, tasks, command)
    todo, results = _plan_runs(plan, setup, progress)
    elapsed = _train_runs(todo, jobs, progress, results)
    summary = _summary(plan, setup, results, jobs, elapsed)
    if full_results is not None:
        ok, why = quick_check(summary, full_results)
        summary["check"] = {"ok": ok, "against": str(against), "message": why}
    summary["table_markdown"] = table_markdown(summary)
    _write(summary, setup.out)
    _plot(plan, setup, summary)
    return summary


@dataclass(frozen=True)
class _Setup:
    """What one call of :func:`run_experiment` runs, and where."""

    out: Path
    work: Path
    n_seeds: int
    chosen: list[TaskPlan]
    command: str


def _set_up(plan: ExperimentPlan, quick: bool, out, work, seeds, tasks, command) -> _Setup:
    """Folders (created), seeds, the chosen tasks and the command line that reproduces them."""
    out = Path(out or ("out/experiment-quick" if quick else "experiments/results"))
    work = Path(work or (out / "runs" if quick else "out/experiment-runs"))
    n_seeds = plan.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {n_seeds}")
    chosen = list(plan.tasks)
    if tasks is not None:
        known = {t.task for t in plan.tasks}
        unknown = sorted(set(tasks) - known)
        if unknown:
            raise ValueError(f"tasks {unknown} are not in the {plan.name} plan {sorted(known)}")
        chosen = [t for t in plan.tasks if t.task in tasks]
    if command is None:
        command = "qkv experiment" + (" --quick" if quick else "")
        command += "" if seeds is None else f" --seeds {seeds}"
        command += "" if tasks is None else f" --tasks {','.join(tasks)}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return _Setup(out, work, n_seeds, chosen, command)


def _plan_runs(plan: ExperimentPlan, setup: _Setup, progress: bool) -> tuple[list, dict]:
    """The runs still to train, and the results of those already finished.

    Returns ``(todo, results)``: ``todo`` holds ``(key, config, run folder)`` and
    ``results`` maps ``(task, variant, seed)`` to a reused run's results.json. A run
    folder trained with other settings is removed, to be trained again.
    """
    text = setup.work / CHARLM_TEXT
    if any(t.task == "charlm" for t in setup.chosen) and not text.exists():
        text.write_text(agreement_text(0, 200_000), encoding="utf-8")
    todo, results = [], {}
    for tp in setup.chosen:
        for variant in plan.variants:
            for seed in range(setup.n_seeds):
                opts = dict(tp.options)
                if tp.task == "charlm":
                    opts["text"] = str(text)
                cfg = TrainConfig(tp.task, attention=variant, steps=tp.steps, seed=seed, **opts)
                run_dir = setup.work / tp.task / variant / f"seed{seed}"
                key = (tp.task, variant, seed)
                done = _finished(run_dir, cfg)
                if done is not None:
                    results[key] = done
                    continue
                if _stale(run_dir, cfg):
                    # Trained with other settings (an older plan): start it again.
                    if progress:
                        print(f"{run_dir}: settings changed, training it again", flush=True)
                    shutil.rmtree(run_dir)
                todo.append((key, cfg, run_dir))
    return todo, results


def _train_runs(todo: list, jobs: int, progress: bool, results: dict) -> float:
    """Train ``todo`` in ``jobs`` worker processes, adding to ``results``; returns seconds."""
    start = time.perf_counter()
    if todo:
        ctx = get_context("spawn")  # fresh interpreters: no inherited thread pools
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(
                    _run_one, cfg.to_dict(), str(run_dir), (run_dir / "config.json").exists()
                ): key
                for key, cfg, run_dir in todo
            }
            for i, fut in enumerate(as_completed(futures), 1):
                key = futures[fut]
                results[key] = fut.result()
                if progress:
                    t = results[key]["test"]
                    score = (
                        f"{t['bits_per_token']:.3f} bits/char"
                        if key[0] == "charlm"
                        else f"answer acc {t['seq_acc']:.3f}"
                    )
                    print(
                        f"[{i}/{len(todo)}] {'/'.join(map(str, key))}: {score} "
                        f"({time.perf_counter() - start:.0f}s)",
                        flush=True,
                    )
    return time.perf_counter() - start


def _summary(plan: ExperimentPlan, setup: _Setup, results: dict, jobs: int, elapsed: float):
    """:func:`summarise` plus what the call did: runs, curves, timings, machine."""
    work = setup.work
    dirs = {"/".join(map(str, key)): work / key[0] / key[1] / f"seed{key[2]}" for key in results}
    curves = {name: _curve(d) for name, d in dirs.items()}
    seconds = {name: _train_seconds(d) for name, d in dirs.items()}
    summary = summarise(setup.chosen, results, setup.n_seeds, plan.variants)
    summary.update(
        plan=plan.name,
        command=setup.command,
        seeds=setup.n_seeds,
        jobs=jobs,
        wall_seconds_this_call=round(elapsed, 1),
        train_seconds_total=round(sum(seconds.values()), 1),
        train_seconds=seconds,
        runs={"/".join(map(str, k)): v for k, v in sorted(results.items())},
        curves=curves,
        out=str(setup.out),
        machine=machine_description(),
    )
    return summary


def _write(summary: dict, out: Path) -> None:
    """results.json (the summary without its markdown) and results.md."""
    (out / "results.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "table_markdown"}, indent=1)
    )
    (out / "results.md").write_text(summary["table_markdown"] + "\n", encoding="utf-8")


def _plot(plan: ExperimentPlan, setup: _Setup, summary: dict) -> None:
    """The loss curves, and the attention heatmaps of the plan's chosen heatmap tasks."""
    _plot_curves(summary, setup.out / "loss_curves.png")
    for task in plan.heatmaps:
        if any(t.task == task for t in setup.chosen):
            _plot_attention(task, setup.work, setup.out / f"attention_{task}.png")


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def summarise(
    plans: list[TaskPlan], results: dict, n_seeds: int, variants: tuple[str, ...] = VARIANTS
) -> dict:
    """Aggregate runs into ``{"table": {task: {variant: stats}}, "gains": ...}``."""
    table, gains = {}, {}
    for tp in plans:
        row = {}
        for variant in variants:
            vals = [results[(tp.task, variant, s)]["test"][tp.metric] for s in range(n_seeds)]
            row[variant] = _stats(vals)
            row[variant]["parameters"] = results[(tp.task, variant, 0)]["parameters"]
            row[variant]["attention_parameters"] = results[(tp.task, variant, 0)][
                "attention_parameters"
            ]
        table[tp.task] = row
        sign = 1 if tp.higher_is_better else -1
        gains[tp.task] = {
            f"{v}-fixed": sign * (row[v]["mean"] - row["fixed"]["mean"])
            for v in variants
            if v != "fixed"
        }
    return {
        "variants": list(variants),
        "metric": {tp.task: tp.metric for tp in plans},
        "steps": {tp.task: tp.steps for tp in plans},
        "options": {tp.task: tp.options for tp in plans},
        "table": table,
        "gains": gains,
    }


def machine_description() -> str:
    """This machine in a few words: CPU model, logical CPUs, PyTorch's CPU capability."""
    import os

    import torch

    from .._cpu import cpu_model

    return (
        f"{cpu_model()}, {os.cpu_count() or '?'} logical CPUs, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"
    )


def table_markdown(summary: dict) -> str:
    """The results table as markdown, with the command that reproduces it."""
    variants = summary["variants"]
    lines = [
        f"Reproduce with: `{summary['command']}` (seeds 0..{summary['seeds'] - 1}; "
        "one thread per run; test sets of 1000 held-out examples).",
        "",
        "Test metric per task, mean ± sample std over seeds [min, max]. Answer accuracy = "
        "the whole answer right under greedy decoding (higher is better); charlm: bits per "
        "character (lower is better). Gain = trainable - fixed, in the metric's better "
        "direction.",
        "",
        f"| task | steps | metric | {' | '.join(variants)} | gain |",
        "|---|---|---|" + "---|" * len(variants) + "---|",
    ]
    for task, row in summary["table"].items():
        metric = summary["metric"][task]
        cells = [
            f"{row[v]['mean']:.3f} ± {row[v]['std']:.3f} [{row[v]['min']:.3f}, {row[v]['max']:.3f}]"
            for v in variants
        ]
        name = "answer acc" if metric == "seq_acc" else "bits/char"
        gain = summary["gains"][task]["trainable-fixed"]
        lines.append(
            f"| {task} | {summary['steps'][task]} | {name} | {' | '.join(cells)} | {gain:+.3f} |"
        )
    if "train_seconds_total" in summary:
        lines += [
            "",
            f"Training time: {summary['train_seconds_total'] / 60:.1f} min summed over "
            f"{len(summary['train_seconds'])} runs (wall time of each run's loop, one thread "
            f"each{', on ' + summary['machine'] if summary.get('machine') else ''}; "
            f"`--jobs {summary.get('jobs', 2)}` ran {summary.get('jobs', 2)} at a time).",
        ]
    lines += ["", "Parameters (total / inside attention):", ""]
    lines += [
        f"- {task}: "
        + ", ".join(
            f"{v} {row[v]['parameters']:,} / {row[v]['attention_parameters']:,}" for v in variants
        )
        for task, row in summary["table"].items()
    ]
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------
_COLOURS = {"fixed": "tab:red", "qk": "tab:orange", "trainable": "tab:blue"}


def _plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["table"])
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for variant in summary["variants"]:
            runs = [
                c for k, c in summary["curves"].items() if k.startswith(f"{task}/{variant}/") and c
            ]
            if not runs:
                continue
            n = min(len(c) for c in runs)
            steps = [runs[0][i][0] for i in range(n)]
            losses = [[c[i][1] for c in runs] for i in range(n)]  # (points, seeds)
            losses = [[x / math.log(2) for x in v] for v in losses]  # nats -> bits
            mean = [statistics.fmean(v) for v in losses]
            ax.plot(steps, mean, color=_COLOURS[variant], label=variant)
            ax.fill_between(
                steps,
                [min(v) for v in losses],
                [max(v) for v in losses],
                color=_COLOURS[variant],
                alpha=0.2,
                linewidth=0,
            )
        ax.set_title(task)
        ax.set_xlabel("step")
        # Bits, like the table: for charlm a token is a character, so this is bits/char.
        ax.set_ylabel("train loss (bits/char)" if task == "charlm" else "train loss (bits/token)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle(f"Training loss, mean over {summary['seeds']} seeds (band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _attention_maps(task: str, run, t) -> tuple[list, list[str], list[str], str, slice]:
    """Per-layer weights ``(H, L, S)`` of seed 0 on one test example, with axis labels."""
    import torch

    from .tasks import CharLMTask

    model = run.model
    with torch.no_grad():
        if isinstance(t, CharLMTask):
            x = t.windows("test", 1)[:, :-1]  # (1, block)
            chars = [t.vocab.itos[i] for i in x[0].tolist()]
            res = model(x, need_weights=True)
            return res.self_weights, chars, chars, "self-attention", slice(None)
        ex = t.examples("test", 1)[0]
        batch = t.collate([ex], model.config.kind)
        if model.config.kind == "encdec":
            res = model(batch.src, batch.inputs, src_padding=batch.src_padding, need_weights=True)
            rows = ["<bos>", *ex.target]
            return res.cross_weights, rows, list(ex.source), "cross-attention", slice(None)
        res = model(batch.inputs, need_weights=True)
        chars = ["<bos>", *ex.source, *ex.target][: batch.inputs.shape[1]]
        # Only the answer's rows: where the model has to look something up.
        return res.self_weights, chars, chars, "self-attention", slice(len(ex.source) + 1, None)


def _show(c: str) -> str:
    """A character as a tick label: spaces and newlines made visible."""
    return {" ": "␣", "\n": "⏎"}.get(c, c)


def _plot_attention(task: str, work: Path, path: Path, variants=VARIANTS) -> None:
    """Heatmaps of each layer's sharpest attention head for seed 0 of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .generate import load_run
    from .trainer import build_task

    loaded = {v: load_run(work / task / v / "seed0") for v in variants}
    t = build_task(TrainConfig.from_dict(loaded[variants[0]].config["train"]))
    layers = loaded[variants[0]].model.config.num_layers
    fig, axes = plt.subplots(
        len(variants), layers, figsize=(5.5 * layers, 3.8 * len(variants)), squeeze=False
    )
    what = ""
    for r, (variant, run) in enumerate(loaded.items()):
        maps, rows, cols, what, keep = _attention_maps(task, run, t)
        result = json.loads((work / task / variant / "seed0" / "results.json").read_text())["test"]
        score = (
            f"test {result['bits_per_token']:.2f} bits/char"
            if task == "charlm"
            else f"test acc {result['seq_acc']:.2f}"
        )
        for layer in range(layers):
            heads = maps[layer][0][:, keep]  # (H, rows, S)
            # The sharpest head (lowest mean row entropy): a mean over heads blurs the
            # alignment that one head carries.
            entropy = -(heads * heads.clamp_min(1e-12).log()).sum(-1).mean(-1)  # (H,)
            h = int(entropy.argmin())
            w = heads[h]
            labels = rows[keep]
            ax = axes[r][layer]
            ax.imshow(w.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(cols)), [_show(c) for c in cols], fontsize=6)
            ax.set_yticks(range(len(labels)), [_show(c) for c in labels], fontsize=6)
            ax.set_title(f"{variant} · layer {layer + 1}, head {h} · {score}", fontsize=9)
    fig.suptitle(f"{task}: {what} weights of each layer's sharpest head, seed 0, one test example")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_against(path: str | Path) -> dict | None:
    """The full run's results.json that ``--quick`` is checked against; ``None`` if absent.

    The file is the user's (``--against``), so it is checked here for what
    :func:`quick_check` reads, and a damaged one is refused with a ValueError naming
    it instead of a KeyError after the training.
    """
    p = Path(path)
    if not p.exists():
        return None
    try:
        full = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--against {p} is not valid JSON ({err})") from None
    except OSError as err:
        raise ValueError(f"--against {p}: {err.strerror or err}") from None
    bad = ValueError(f"--against {p} is not a results.json written by qkv experiment")
    if not isinstance(full, dict):
        raise bad
    table, gains = full.get("table", {}), full.get("gains", {})
    if not isinstance(table, dict) or not isinstance(gains, dict):
        raise bad
    for task, row in table.items():
        gain = gains.get(task)
        if not isinstance(gain, dict) or not _is_number(gain.get("trainable-fixed")):
            raise bad
        for variant in ("fixed", "trainable"):
            stats = row.get(variant) if isinstance(row, dict) else None
            if not (
                isinstance(stats, dict)
                and _is_number(stats.get("std"))
                and isinstance(stats.get("values"), list)
                and all(_is_number(v) for v in stats["values"])
            ):
                raise bad
    return full


def quick_check(quick: dict, full: dict) -> tuple[bool, str]:
    """Does the quick run show the full run's effect? Returns ``(ok, explanation)``.

    The threshold comes from the full results: the quick run's trainable-over-fixed gain
    must reach half the full run's gain *and* four times the largest spread (sample
    std) between the full run's seeds. Since the quick runs are the full run's seeds 0
    and 1, on the same machine they reproduce those runs exactly; the check also asks
    each quick value to be within 2 % of its full-run counterpart.
    """
    task = next(iter(quick["table"]))
    if task not in full.get("table", {}):
        return False, f"the full results have no {task!r} row to compare with"
    q, f = quick["table"][task], full["table"][task]
    gain_q = quick["gains"][task]["trainable-fixed"]
    gain_f = full["gains"][task]["trainable-fixed"]
    spread = max(f["fixed"]["std"], f["trainable"]["std"])
    need = max(0.5 * gain_f, 4 * spread)
    lines = [
        f"{task}: trainable beats fixed by {gain_q:.3f} {quick['metric'][task]} "
        f"(full run: {gain_f:.3f}; needed: max(half of it, 4 x seed spread {spread:.3f}) = {need:.3f})"
    ]
    ok = gain_f > 0 and gain_q >= need
    for v in ("fixed", "trainable"):
        for i, val in enumerate(q[v]["values"]):
            if i >= len(f[v]["values"]):
                ok = False
                lines.append(f"{v} seed {i}: the full results have no such seed")
                continue
            ref = f[v]["values"][i]
            if abs(val - ref) > 0.02 * abs(ref):
                ok = False
                lines.append(f"{v} seed {i}: {val:.4f} differs from the full run's {ref:.4f}")
    return ok, "; ".join(lines)
