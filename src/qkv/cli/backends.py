"""``qkv backends`` and ``qkv calibrate``: what runs attention on this machine, and why.

``backends`` lists every registered backend with whether it is usable here, the CPU's
capability (what PyTorch dispatches to, bf16/fp16 dot-product instructions) and the
state of the compiled CPU kernel (built, from the cache, or why not). ``calibrate``
times ``"torch"`` against ``"flash"`` once for ``"auto"`` (see
:mod:`qkv.backends.calibration`) and ``--reset`` forgets the measurement.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError


def backends_command() -> None:
    """List the attention backends and this machine's CPU capability."""
    import torch

    from ..backends import backends as registered
    from ..backends import calibration
    from ..backends.flash import compiled

    console = Console(highlight=False)
    table = Table(title="qkv backends")
    table.add_column("backend", no_wrap=True)
    table.add_column("usable", no_wrap=True)
    table.add_column("what it is", overflow="fold")
    for name, b in registered().items():
        table.add_row(name, "yes" if b.available() else "no", b.description, style=None)
    console.print(table)
    ok = compiled.available()
    kernel = f"built ({compiled.extension_dir()})" if ok else f"not used: {compiled.build_error()}"
    lines = [
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}",
        f"bf16 dot-product instructions: {'yes' if compiled.has_bf16_dot() else 'no'}; "
        f"fp16: {'yes' if compiled.has_fp16_dot() else 'no'}",
        f"compiled flash kernel: {kernel}",
        f"auto calibration: {calibration.cache_path()}"
        + ("" if calibration.enabled() else " (off: QKV_AUTO_CALIBRATION=0)"),
    ]
    for line in lines:
        console.print(line, markup=False)


def calibrate_command(
    reset: bool = typer.Option(False, "--reset", help="Forget the cached measurement."),
    budget: float = typer.Option(
        60.0, "--budget", help="Seconds the measurement may take (cells past it keep torch)."
    ),
) -> None:
    """Time "torch" against "flash" once, so "auto" picks the faster one on this machine."""
    from ..backends import calibration
    from ..backends.flash import compiled

    console = Console(highlight=False)
    if reset:
        removed = calibration.reset()
        console.print(f"removed {len(removed)} cached calibration(s)", markup=False)
        return
    if not budget > 0 or budget != budget or budget == float("inf"):
        raise UsageError(f"--budget must be a finite number of seconds > 0, got {budget}")
    if not compiled.available():
        raise UsageError(
            f"nothing to calibrate: the compiled kernel is unavailable ({compiled.build_error()})"
        )
    result = calibration.calibrate(budget, log=lambda line: console.print(line, markup=False))
    console.print(
        f"{len(result.cells)} cells measured; cached in {calibration.cache_path()}", markup=False
    )


def register(app: typer.Typer) -> None:
    app.command("backends")(backends_command)
    app.command("calibrate")(calibrate_command)
