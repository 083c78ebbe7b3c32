"""The settings of a training run, each declared once: its default, its check, its help.

A setting is one dataclass field made by :func:`setting`; its ``metadata`` carries the
help text (``qkv train --help`` shows it), the check run on construction and, where
the option is not simply ``--field-name``, the CLI names. ``qkv train`` builds its
options from these fields (:mod:`qkv.cli.options`), so a new setting is one line here.

The settings come in sections, composed into :class:`TrainConfig`:

* :class:`TaskConfig` — which task, and that task's own options;
* :class:`ArchConfig` — the architecture (attention variant, model kind, sizes, backend);
  :class:`~qkv.train.models.ModelConfig` takes its shared fields from here;
* :class:`OptimConfig` — steps, batch, learning-rate schedule, decay, clipping;
* :class:`RunConfig` — seed, evaluation, logging and checkpoint periods, device.

:class:`TrainConfig` keeps the flat interface callers and run folders already use:
``TrainConfig("reverse", steps=100, lr=1e-3)`` routes each keyword to its section,
``cfg.steps`` reads it back, and ``to_dict`` / ``from_dict`` use the same flat object
that config.json has always held, so run folders written before the sections existed
resume unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .. import _checks as C
from .variants import check_variant

__all__ = [
    "ArchConfig",
    "OptimConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "check_settings",
    "same_setting",
    "setting",
]

Check = Callable[[str, Any], object]


def setting(
    default: Any = MISSING, help: str = "", *, check: Check | None = None, cli: tuple = ()
) -> Any:
    """A config field with its help text, its check ``check(name, value)`` and CLI names.

    Without ``default`` the setting is required. ``cli`` overrides the option names
    (default: ``--field-name``).
    """
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "cli": cli})


def same_setting(owner: type, name: str) -> Any:
    """Field ``name`` of dataclass ``owner`` again (default, check, help) for another class.

    For a class that must keep its own flat fields (``ModelConfig``, whose positional
    order and JSON form are public) yet should not declare them a second time.
    """
    f = next(f for f in fields(owner) if f.name == name)
    return dataclasses.field(
        default=f.default, default_factory=f.default_factory, metadata=f.metadata
    )


def check_settings(obj) -> None:
    """Run every field's own check (from :func:`setting`), in declaration order."""
    for f in fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            check(f.name, getattr(obj, f.name))


# -- checks: each raises ValueError naming the setting --------------------------------
def positive_int(name: str, value) -> None:
    C.check_positive_int(name, value)


def optional_positive_int(name: str, value) -> None:
    C.check_positive_int(name, value, allow_none=True)


def non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def non_negative_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def variant(name: str, value) -> None:
    check_variant(value)


def model_choice(name: str, value) -> None:
    if value not in (None, "decoder", "encdec"):
        raise ValueError(f"model must be 'decoder' or 'encdec', got {value!r}")


# -- the sections -------------------------------------------------------------------
class _Section:
    """A section checks each of its fields on construction (see :func:`setting`)."""

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class TaskConfig(_Section):
    """Which task is learned, and its own options (``None``: the task's default).

    The task name itself is checked when the task is built (``make_task`` lists the
    tasks), as are options a task does not take.
    """

    task: str = setting(help="recall, reverse, sort, date-to-iso, iso-to-date, charlm.")
    text: str | None = setting(None, "Text file for the charlm task.")
    n_pairs: int | None = setting(None, "Key-value pairs per recall sequence.")
    n_keys: int | None = setting(None, "Distinct keys per recall sequence.")
    block: int | None = setting(None, "Context window of charlm.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text is not None:
            # Absolute, so a run resumed from another working directory finds the file
            # and its config.json still matches.
            object.__setattr__(self, "text", str(Path(self.text).resolve()))


@dataclass(frozen=True)
class ArchConfig(_Section):
    """The architecture the user chooses; the task decides the rest (vocabulary, length)."""

    attention: str = setting("trainable", "fixed, qk or trainable.", check=variant)
    model: str | None = setting(
        None, "decoder or encdec (default: the task's).", check=model_choice
    )
    d_model: int = setting(64, "Embedding width.", check=positive_int)
    num_heads: int = setting(4, "Attention heads.", check=positive_int)
    num_layers: int = setting(2, "Blocks (per stack).", check=positive_int)
    backend: str = setting("auto", "Attention backend.")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW with linear warm-up and cosine decay from ``lr`` to ``min_lr``."""

    steps: int = setting(1000, "Optimiser steps.", check=positive_int)
    batch_size: int = setting(
        64, "Global batch (split over torchrun processes).", check=positive_int
    )
    lr: float = setting(3e-3, "Peak learning rate.", check=non_negative_number)
    min_lr: float = setting(
        3e-4, "Final learning rate of the cosine decay.", check=non_negative_number
    )
    warmup: int = setting(50, "Warm-up steps.", check=non_negative_int)
    weight_decay: float = setting(
        0.01, "AdamW weight decay (matrices only).", check=non_negative_number
    )
    grad_clip: float = setting(1.0, "Gradient norm clip.", check=non_negative_number)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


@dataclass(frozen=True)
class RunConfig(_Section):
    """Seeding, how often the run evaluates, logs and checkpoints, and where it runs."""

    seed: int = setting(0, "Seeds weights, data order and the eval sets.", check=non_negative_int)
    eval_every: int = setting(250, "Validation period in steps.", check=positive_int)
    eval_examples: int = setting(500, "Validation examples.", check=positive_int)
    test_examples: int = setting(1000, "Test examples.", check=positive_int)
    log_every: int = setting(10, "Steps per train-loss record.", check=positive_int)
    checkpoint_every: int = setting(250, "Checkpoint period in steps.", check=positive_int)
    device: str = setting("auto", "auto, cpu or cuda.")


#: The sections of :class:`TrainConfig`: attribute name -> class.
SECTIONS: dict[str, type] = {
    "data": TaskConfig,
    "arch": ArchConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}

#: Every flat setting name -> the section that owns it.
_OWNER = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
if len(_OWNER) != sum(len(fields(cls)) for cls in SECTIONS.values()):  # pragma: no cover
    raise TypeError("two sections of TrainConfig declare the same setting name")


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Everything that decides a training run, in four sections; validated on construction.

    Build it flat, each keyword going to the section that owns it, or from sections::

        TrainConfig("reverse", steps=600, d_model=32)
        TrainConfig(data=TaskConfig("reverse"), optim=OptimConfig(steps=600))

    Flat and section keywords may be mixed (a flat keyword then overrides that field of
    its section). Every setting reads back flat too: ``cfg.steps``, ``cfg.task``.
    A misspelt keyword is a TypeError naming it, like any function's.

    Attributes:
        data: the task and its options (:class:`TaskConfig`).
        arch: the architecture (:class:`ArchConfig`).
        optim: the optimiser and schedule (:class:`OptimConfig`).
        run: seed, periods and device (:class:`RunConfig`).
    """

    data: TaskConfig
    arch: ArchConfig
    optim: OptimConfig
    run: RunConfig

    def __init__(self, task: str | None = None, **settings) -> None:
        if task is not None:
            settings["task"] = task
        for section, cls in SECTIONS.items():
            given = settings.pop(section, None)
            if given is not None and not isinstance(given, cls):
                raise TypeError(f"{section} must be a {cls.__name__}, got {type(given).__name__}")
            own = {f.name: settings.pop(f.name) for f in fields(cls) if f.name in settings}
            if given is None:
                value = cls(**own)
            else:
                value = dataclasses.replace(given, **own) if own else given
            object.__setattr__(self, section, value)
        if settings:
            raise TypeError(f"TrainConfig got unknown settings {sorted(settings)}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of a flat dict (config.json's ``"train"``); unknown keys are refused."""
        unknown = sorted(set(d) - set(_OWNER))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Every setting in one flat dict, the form config.json has always recorded."""
        return {k: v for section in SECTIONS for k, v in asdict(getattr(self, section)).items()}


def _flat(name: str, section: str) -> property:
    def read(self: TrainConfig):
        return getattr(getattr(self, section), name)

    read.__doc__ = f"``self.{section}.{name}``"
    return property(read)


for _name, _section in _OWNER.items():
    setattr(TrainConfig, _name, _flat(_name, _section))
del _name, _section
