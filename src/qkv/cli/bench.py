"""``qkv bench``: time qkv beside PyTorch; write JSON, markdown and a plot.

Two suites (see ``benchmarks/README.md`` for the method):

* ``attention``: kernels over a grid of lengths, causal off/on, float32/bfloat16,
  forward and forward+backward (:mod:`qkv.bench.attention`);
* ``mha``: the multi-head attention comparison, B=8, L=1024, d_model=768, H=12,
  causal (:mod:`qkv.bench.mha`).

``--quick`` runs a small version of both (L = 256, one second of timing per case): 50 s
on a shared 2-core Xeon, 2.4 min the first time on a machine, which also builds the
compiled kernel and calibrates ``auto``. A smoke run; its files go to
``benchmarks/results/quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import check_out_dir, user_paths

SUITES = ("attention", "mha", "all")

#: ``--quick``: one short length, one second of timing per case, a few rounds.
QUICK_ATTENTION = {
    "lengths": (256,),
    "budget_s": 1.0,
    "peak_sizes": (512,),
    "min_reps": 2,
    "max_reps": 3,
}
QUICK_MHA = {"batch": 1, "length": 256, "budget_s": 1.0, "min_reps": 2, "max_reps": 3}


def _split(option: str, text: str | None, cast=str) -> tuple | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{option} needs a comma-separated list, got {text!r}")
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        raise ValueError(f"--{option}: cannot read {text!r} as a list of {cast.__name__}") from None


def _causal(text: str) -> tuple[bool, ...]:
    choices = {"both": (False, True), "on": (True,), "off": (False,)}
    if text not in choices:
        raise ValueError(f"--causal must be one of {', '.join(choices)}, got {text!r}")
    return choices[text]


def run_bench(
    suite: str = "all",
    *,
    quick: bool = False,
    lengths: str | None = None,
    dtypes: str | None = None,
    modes: str | None = None,
    causal: str = "both",
    impls: str | None = None,
    mha_impls: str | None = None,
    mha_dtype: str = "float32",
    threads: int | None = None,
    budget_s: float | None = None,
    max_reps: int | None = None,
    max_call_s: float | None = None,
    mem_limit_gib: float | None = None,
    out: str | Path | None = None,
) -> list[Path]:
    """Build the configs from the CLI's strings, run the suites, write the files."""
    from ..bench import attention, mha  # heavy imports only when a benchmark runs

    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    out_dir = (
        Path(out) if out is not None else Path("benchmarks/results") / ("quick" if quick else "")
    )
    # Refused before the benchmark runs, not after minutes of timing.
    check_out_dir("--out", out_dir)
    common = {}
    if threads is not None:
        common["threads"] = threads
    if max_reps is not None:
        common["max_reps"] = max_reps
        common["min_reps"] = min(3, max_reps)
    # Each suite's config is built first; then every suite goes the same way: run, write.
    jobs: list[tuple] = []
    if suite in ("attention", "all"):
        kw: dict = dict(QUICK_ATTENTION) if quick else {}
        kw.update(common)  # the user's --threads / --max-reps win over the quick settings
        for key, value in (
            ("lengths", _split("lengths", lengths, int)),
            ("dtypes", _split("dtypes", dtypes)),
            ("modes", _split("modes", modes)),
            ("impls", _split("impls", impls)),
            ("budget_s", budget_s),
            ("max_call_s", max_call_s),
            ("mem_limit_gib", mem_limit_gib),
        ):
            if value is not None:
                kw[key] = value
        kw["causal"] = _causal(causal)
        jobs.append((attention, attention.AttentionBenchConfig(**kw)))
    if suite in ("mha", "all"):
        kw = dict(QUICK_MHA) if quick else {}
        kw.update(common)
        if budget_s is not None:
            kw["budget_s"] = budget_s
        for key, value in (
            ("modes", _split("modes", modes)),
            ("impls", _split("mha-impls", mha_impls)),
        ):
            if value is not None:
                kw[key] = value
        jobs.append((mha, mha.MHABenchConfig(dtype=mha_dtype, **kw)))
    written: list[Path] = []
    for module, cfg in jobs:
        # module.run / module.write_outputs drive qkv.bench.pipeline with the suite's steps.
        written += module.write_outputs(module.run(cfg), out_dir)
    return written


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        suite: str = typer.Option("all", help="attention, mha or all."),
        quick: bool = typer.Option(
            False, "--quick", help="Small smoke run of both suites (50 s; 2.4 min the first time)."
        ),
        lengths: str = typer.Option(None, help="Attention lengths L = S, e.g. 512,4096."),
        dtypes: str = typer.Option(None, help="Attention dtypes: float32,bfloat16,float16."),
        modes: str = typer.Option(None, help="fwd and/or fwd+bwd, comma-separated."),
        causal: str = typer.Option("both", help="Attention causal cases: both, on or off."),
        impls: str = typer.Option(None, help="Only these attention implementations."),
        mha_impls: str = typer.Option(None, help="Only these MHA comparators."),
        mha_dtype: str = typer.Option("float32", help="dtype of the MHA comparison."),
        threads: int = typer.Option(None, help="torch threads (default: torch's choice)."),
        budget_s: float = typer.Option(None, help="Seconds of timed rounds per case."),
        max_reps: int = typer.Option(None, help="Most rounds per case."),
        max_call_s: float = typer.Option(None, help="Skip calls extrapolated above this."),
        mem_limit_gib: float = typer.Option(None, help="Skip O(L*S)-memory kernels above this."),
        out: str = typer.Option(None, help="Output folder (default benchmarks/results)."),
    ) -> None:
        """Time qkv's backends and modules beside PyTorch; write JSON, markdown, PNG."""
        where = out if out is not None else "benchmarks/results"
        with user_paths("--out", where):
            written = run_bench(
                suite,
                quick=quick,
                lengths=lengths,
                dtypes=dtypes,
                modes=modes,
                causal=causal,
                impls=impls,
                mha_impls=mha_impls,
                mha_dtype=mha_dtype,
                threads=threads,
                budget_s=budget_s,
                max_reps=max_reps,
                max_call_s=max_call_s,
                mem_limit_gib=mem_limit_gib,
                out=out,
            )
        for path in written:
            print(f"wrote {path}")
