"""Command-line options generated from a config dataclass, and the config built back.

A config's fields (see :func:`qkv.train.config.setting`) carry their default and help
text; :func:`config_options` turns every field into a typer option with that default
and help, recursing into fields that are themselves dataclasses (the sections of
:class:`~qkv.train.config.TrainConfig`), and hands the command the values it received
as one ``settings`` dict. Adding a setting to the dataclass adds the option.

The option is ``--field-name`` unless the field's metadata names others (``cli``).
Fields with ``None`` as default take the type without ``None`` (``int | None`` is an
``INTEGER`` option whose absence leaves ``None``); a field with no default is a
required option.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence

import typer

__all__ = ["build_config", "config_options", "config_parameters"]


def _plain(annotation):
    """``X | None`` -> ``X``: click types an option by the value it parses."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _leaves(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The settings of dataclass ``cls`` with their resolved types, sections flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += _leaves(kind)
        else:
            out.append((f, _plain(kind)))
    return out


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option`` default per setting of ``cls``."""
    params = []
    for f, kind in _leaves(cls):
        default = ... if f.default is dataclasses.MISSING else f.default
        option = typer.Option(default, *f.metadata.get("cli", ()), help=f.metadata.get("help"))
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind
            )
        )
    return params


def config_options(
    cls: type, *, order: Sequence[str] = (), into: str = "settings"
) -> Callable[[Callable], Callable]:
    """Decorate a typer command: add an option per setting of ``cls``.

    The command keeps its own parameters except ``into``, which receives the settings'
    values as a flat ``{name: value}`` dict (build the config with :func:`build_config`
    once the command's own checks have passed). ``order`` lists option names in the
    order ``--help`` shows them; options it does not name follow, in declaration order.
    """

    def decorate(fn: Callable) -> Callable:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.name != into
        ]
        settings = config_parameters(cls)
        names = [p.name for p in settings]
        clash = sorted(set(names) & {p.name for p in own})
        if clash:
            raise TypeError(f"{fn.__name__} declares {clash}, which are settings of {cls.__name__}")
        rank = {name: i for i, name in enumerate(order)}
        params = sorted(own + settings, key=lambda p: rank.get(p.name, len(rank)))

        def command(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            return fn(**kwargs, **{into: values})

        command.__name__, command.__qualname__ = fn.__name__, fn.__qualname__
        command.__doc__, command.__module__ = fn.__doc__, fn.__module__
        command.__signature__ = inspect.Signature(params)
        # typer reads the types from here (get_type_hints), already resolved.
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def build_config(cls: type, values: dict):
    """``cls`` built from flat ``values`` (as :func:`config_options` passes them).

    Sections are built from the names they own; every value is checked by the
    dataclasses themselves on construction.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = build_config(kind, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)
