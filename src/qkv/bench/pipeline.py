"""The pipeline every benchmark suite runs: run -> measure -> record -> render -> write.

A suite (:mod:`qkv.bench.attention`, :mod:`qkv.bench.mha`) owns what differs: its
config, its implementations, its tables. The steps they share live here once:

* **run**: :func:`run_report` sets the torch thread count for the whole run and calls
  the suite's runner (each suite's ``run``; ``qkv bench`` then calls its ``write_outputs``);
* **measure**: :func:`warm_up_each` gives every call one untimed warm-up (memory and
  the output to check), dropping those that fail, before the calls are timed together
  by :func:`qkv.bench.timing.interleaved_timings`; :func:`timing_fields` turns a timing
  into a result record's fields;
* **report**: :func:`machine_at_end` and :func:`memory_method` fill the JSON fields
  both reports carry; :func:`load_text` writes a load average in the markdown;
* **write**: :func:`write_outputs` writes ``<stem>.json``, ``<stem>.md`` and, for a
  suite with a plot, ``<stem>.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from .timing import MemoryMeter, Timing, torch_threads, warm_up

__all__ = [
    "Suite",
    "Warmed",
    "check_rounds",
    "load_text",
    "machine_at_end",
    "max_abs",
    "memory_method",
    "mib",
    "print_wrapped",
    "run_report",
    "timing_fields",
    "warm_up_each",
    "write_outputs",
]

Report = dict[str, Any]
Log = Callable[[str], None]


def print_wrapped(line: str) -> None:
    """The suites' default log: one progress line, wrapped to the terminal's width.

    A case's line lists every implementation's time (300+ characters); unwrapped, an
    80-column terminal breaks it mid-word. The width is ``COLUMNS`` when set, else the
    terminal's, else 120; continuation lines are indented.
    """
    width = shutil.get_terminal_size((120, 24)).columns
    print(
        textwrap.fill(
            line,
            width=max(40, width),
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    )


class _SuiteConfig(Protocol):
    threads: int | None
    max_reps: int
    min_reps: int
    min_sample_s: float


def check_rounds(cfg: _SuiteConfig) -> None:
    """The checks of the timing settings every suite config has (``ValueError`` naming
    the setting); each config checks ``max_reps`` and ``min_reps`` are positive first."""
    if cfg.min_reps > cfg.max_reps:
        raise ValueError(f"min_reps={cfg.min_reps} > max_reps={cfg.max_reps}")
    if not cfg.min_sample_s >= 0:
        raise ValueError(f"min_sample_s must be >= 0, got {cfg.min_sample_s!r}")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise ValueError(f"threads must be a positive integer, got {cfg.threads!r}")


@dataclass(frozen=True)
class Suite:
    """One benchmark suite, as the pipeline drives it.

    Attributes:
        name: the suite's name on the command line (``attention``, ``mha``).
        stem: the output files' name, ``<stem>.json`` / ``.md`` / ``.png``.
        run: ``run(cfg, log) -> report``, the measurements as a JSON-ready dict (called
            with the config's torch thread count already set).
        render_markdown: ``report -> markdown text``.
        render_plot: ``(report, path) -> None`` writes the PNG; ``None``: no plot.
    """

    name: str
    stem: str
    run: Callable[[Any, Log], Report]
    render_markdown: Callable[[Report], str]
    render_plot: Callable[[Report, Path], None] | None = None


def run_report(suite: Suite, cfg: _SuiteConfig, log: Log = print_wrapped) -> Report:
    """Run ``suite`` on ``cfg`` with ``cfg.threads`` torch threads (restored after)."""
    with torch_threads(cfg.threads):
        return suite.run(cfg, log)


# --------------------------------------------------------------------- measure


@dataclass
class Warmed:
    """What the warm-ups of one case left: per call name, in seconds and bytes.

    Attributes:
        first_s: the warm-up's duration (sizes the timed rounds).
        mem: the peak extra memory of the warm-up call (``None`` where not measurable).
        errors: why a call failed (``"TypeName: message"``, at most 300 characters);
            a failed call is removed from the calls to time.
    """

    first_s: dict[str, float] = field(default_factory=dict)
    mem: dict[str, int | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def warm_up_each(
    calls: dict[str, Callable[[], Any]],
    meter: MemoryMeter,
    on_output: Callable[[str, Any], None],
) -> Warmed:
    """One untimed warm-up per call (see :func:`qkv.bench.timing.warm_up`).

    ``on_output(name, result)`` receives each result as soon as it is computed, so a
    suite can check it (or keep it) without every output staying alive at once. A call
    that raises ``RuntimeError``, ``ValueError`` or ``MemoryError`` is recorded in
    :attr:`Warmed.errors` and deleted from ``calls`` (it is not timed).
    """
    warmed = Warmed()
    for name, call in list(calls.items()):
        try:
            got, warmed.mem[name], warmed.first_s[name] = warm_up(call, meter)
            on_output(name, got)
            del got
        except (RuntimeError, ValueError, MemoryError) as err:
            warmed.errors[name] = f"{type(err).__name__}: {err}"[:300]
            del calls[name]
    return warmed


def timing_fields(t: Timing) -> dict[str, Any]:
    """A result record's timing fields, in milliseconds."""
    return dict(
        median_ms=t.median_s * 1e3,
        min_ms=min(t.samples) * 1e3,
        samples_ms=[x * 1e3 for x in t.samples],
        n_inner=t.n_inner,
        first_call_ms=t.first_call_s * 1e3,
    )


def mib(nbytes: int | None) -> float | None:
    """Bytes as MiB (``None`` stays ``None``: not measurable here)."""
    return None if nbytes is None else nbytes / 2**20


def max_abs(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference of two tensors, computed in float64."""
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------- report


def machine_at_end(machine: dict[str, Any]) -> dict[str, Any]:
    """``machine`` (from :func:`~qkv.bench.timing.machine_info`) plus the load at the end."""
    return {
        **machine,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def memory_method(meter: MemoryMeter) -> str:
    """How the reports' "extra memory" was measured, in words."""
    if not meter.available:
        return "unavailable on this platform"
    return (
        "rise of VmHWM over VmRSS during the warm-up call, after malloc_trim(0) and a "
        "VmHWM reset; includes outputs and gradients"
    )


def load_text(avg: list[float] | None) -> str:
    """A 1/5/15-minute load average as ``"0.5/0.7/0.9"`` (``"n/a"`` when unknown)."""
    return "n/a" if avg is None else "/".join(f"{x:.1f}" for x in avg)


# ----------------------------------------------------------------------- write


def write_outputs(
    suite: Suite, report: Report, out_dir: Path, stem: str | None = None
) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (and ``<stem>.png`` when the suite draws
    one) under ``out_dir``, created if missing; returns the paths in that order.
    ``stem`` defaults to the suite's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = suite.stem if stem is None else stem
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    # Anything not JSON-ready (a dtype, a path) is written as text.
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(suite.render_markdown(report))
    if suite.render_plot is not None:
        paths.append(out_dir / f"{stem}.png")
        suite.render_plot(report, paths[2])
    return paths
