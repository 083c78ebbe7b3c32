"""``qkv train``, ``qkv generate`` and ``qkv experiment``: learning the projections.

Their folders and files are the user's: output folders are checked before any
training, the system's refusals while reading or writing them become one-line
errors naming the option, and damaged run files are reported by the trainer's
:class:`~qkv.train.trainer.RunFileError`, which names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..train.config import TrainConfig
from .errors import UsageError, check_out_dir, check_read_file, user_paths
from .options import build_config, config_options

#: The order of ``qkv train --help``: the command's own options among the settings,
#: as the page has always listed them. A setting missing here is listed at the end.
_TRAIN_HELP_ORDER = (
    "task",
    "attention",
    "steps",
    "seed",
    "out",
    "resume",
    "model",
    "batch_size",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "d_model",
    "num_heads",
    "num_layers",
    "eval_every",
    "eval_examples",
    "test_examples",
    "log_every",
    "checkpoint_every",
    "text",
    "n_pairs",
    "n_keys",
    "block",
    "backend",
    "device",
)


def _train_cmd(app: typer.Typer) -> None:
    # The settings' options come from TrainConfig's fields (default, help text); only
    # what is not a setting of the run is declared here: where it goes, whether it
    # resumes, and how this process computes it.
    @app.command("train")
    @config_options(TrainConfig, order=_TRAIN_HELP_ORDER)
    def train_cmd(
        settings: dict,
        out: str = typer.Option("out/run", help="Run directory."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        threads: int = typer.Option(
            None, help="torch CPU threads (default: 1 per torchrun process)."
        ),
        context_parallel: int = typer.Option(
            1,
            "--context-parallel",
            help="Split each sequence over N torchrun processes (ring attention, decoder "
            "models); the process count must be a multiple of N, the rest is data parallel.",
        ),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Train a small transformer whose attention is fixed, qk or trainable."""
        from ..train.trainer import TrainingDiverged, finished_results, train

        check_out_dir("--out", out)
        _check_context_parallel(context_parallel)
        if settings["text"] is not None:
            check_read_file("--text", settings["text"])
        cfg = build_config(TrainConfig, settings)
        was_finished = resume and finished_results(out, cfg.steps) is not None
        try:
            with user_paths("--out", out):
                results = train(
                    cfg,
                    out,
                    resume=resume,
                    progress=progress,
                    threads=threads,
                    context_parallel=context_parallel,
                )
        except TrainingDiverged as err:
            raise UsageError(str(err)) from err
        if was_finished:
            typer.echo(f"{out} has already finished its {cfg.steps} steps: nothing to resume")
        t = results["test"]
        typer.echo(
            f"{cfg.task}/{cfg.attention} seed {cfg.seed}: test loss {t['loss']:.4f}, token "
            f"accuracy {t['token_acc']:.4f}, answer accuracy {t['seq_acc']:.4f} ({out})"
        )


def _check_context_parallel(n: int) -> None:
    """--context-parallel N: a positive N that divides the number of torchrun processes."""
    if n < 1:
        raise UsageError(f"--context-parallel must be a positive integer, got {n}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % n:
        raise UsageError(
            f"--context-parallel {n} needs a multiple of {n} processes, got {world}; start "
            f"them with torchrun --nproc_per_node={n} (or a multiple of {n})"
        )


def _generate_cmd(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        checkpoint: str = typer.Option(..., help="Run directory or one of its checkpoints."),
        prompt: str = typer.Option(..., help="Source text (sequence tasks) or text to continue."),
        max_new_tokens: int = typer.Option(100, help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, help="0 = greedy; higher = more random."),
        top_k: int = typer.Option(None, help="Sample among the k most likely tokens."),
        seed: int = typer.Option(0, help="Sampling seed."),
        cache: bool = typer.Option(True, help="Decode with a KV cache (--no-cache re-runs all)."),
    ) -> None:
        """Generate with a trained model: a task's answer, or a text continuation."""
        from ..train.generate import generate_text, load_run
        from ..train.trainer import check_run_files

        with user_paths("--checkpoint", checkpoint):
            check_run_files(checkpoint)  # a damaged file is named, not a traceback
            run = load_run(checkpoint)
        typer.echo(
            generate_text(
                run,
                prompt,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                use_cache=cache,
            )
        )


def _experiment_cmd(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment_cmd(
        quick: bool = typer.Option(
            False,
            "--quick",
            help="The small check run by the tests (42-88 s on a shared 2-core Xeon).",
        ),
        out: str = typer.Option(None, help="Results folder (default experiments/results)."),
        work: str = typer.Option(None, help="Folder for the runs (default out/experiment-runs)."),
        jobs: int = typer.Option(2, help="Runs trained in parallel (one thread each)."),
        seeds: int = typer.Option(None, help="Seeds per task and variant."),
        tasks: str = typer.Option(None, help="Comma-separated subset of the tasks."),
        progress: bool = typer.Option(True, help="Show progress."),
        against: str = typer.Option(
            "experiments/results/results.json",
            help="With --quick: the full run's results.json to check the effect against.",
        ),
    ) -> None:
        """Train fixed, qk and trainable attention on every task; write tables and figures.

        With --quick, exit status 1 when the quick run does not show the full run's effect.
        """
        from ..train.experiment import run_experiment

        for option, folder in (("--out", out), ("--work", work)):
            if folder is not None:
                check_out_dir(option, folder)
        where = Path(out or ("out/experiment-quick" if quick else "experiments/results"))
        with user_paths("--out/--work", where):
            summary = run_experiment(
                quick=quick,
                out=out,
                work=work,
                jobs=jobs,
                seeds=seeds,
                tasks=None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()],
                progress=progress,
                against=against,
            )
        from .results_table import print_results
        from .tables import console

        print_results(summary, console())
        typer.echo(f"results written to {summary['out']}")
        check = summary.get("check")
        if check is not None:
            typer.echo(f"check {'passed' if check['ok'] else 'FAILED'}: {check['message']}")
            if not check["ok"]:
                raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    _train_cmd(app)
    _generate_cmd(app)
    _experiment_cmd(app)
