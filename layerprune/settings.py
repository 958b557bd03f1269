"""Settings declared once: a dataclass field carries its command-line flag.

A field declared with :func:`setting` holds its default, its help text and how its flag reads
text (``type``, ``choices``, a repeated flag's ``repeat`` parser). :func:`add_flags` adds a
dataclass's flags to an ``argparse`` parser, :func:`from_args` builds the dataclass back from
the parsed arguments, and :func:`check_values` checks a dataclass built in Python with the same
rules. A new setting is one line in the dataclass (:class:`layerprune.pipeline.PruneConfig`).

Flags: ``--field-name`` (underscores become dashes) unless ``flag`` names another; a bool
field is a switch (``--name`` sets True; with ``negate``, ``--no-name`` sets False); a field
with ``repeat`` takes a repeatable flag whose list of values ``repeat`` turns into the
field's value. The help text ends with the default where the field has one.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Optional

__all__ = ["SettingError", "setting", "add_flags", "from_args", "check_values", "flag_name",
           "positive_int", "positive_float", "nonnegative_float", "nonnegative_int", "nonempty", "split_list",
           "parse_overrides", "parse_solver_options"]

#: largest seed every random generator used here accepts (torch: signed 64-bit)
MAX_SEED = 2 ** 63 - 1


class SettingError(ValueError):
    """A setting's value is out of its range (one clear line)."""


def setting(default: Any = None, help: str = "", *, metavar: Optional[str] = None,
            type: Optional[Callable[[Any], Any]] = None, choices: Optional[tuple] = None,
            flag: Optional[str] = None, repeat: Optional[Callable[[Optional[list]], Any]] = None,
            negate: bool = False, cli: bool = True, default_text: Optional[str] = None,
            default_factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field with its flag.

    Parameters
    ----------
    default : the field's default (``default_factory`` for a mutable one)
    help : the flag's help text (its default is appended)
    metavar, choices : as in ``argparse``
    type : reads the flag's text, and checks a value set in Python; raises
        ``argparse.ArgumentTypeError`` or ``SettingError`` for a bad one
    flag : the flag's name when it is not ``--field-name``
    repeat : the flag is repeatable; this turns its list of texts (None if not given) into the
        field's value
    negate : a bool field defaulting to True, switched off by ``--no-name``
    cli : False keeps the field off the command line
    default_text : what the help says about the default instead of its value
    """
    meta = {"help": help, "metavar": metavar, "type": type, "choices": choices, "flag": flag,
            "repeat": repeat, "negate": negate, "cli": cli, "default_text": default_text}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    """The field's flag: ``--eval-tokens`` for ``eval_tokens``, ``--no-progress`` for a negated bool."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.metadata.get("negate") else f"--{name}"


def _cli_fields(cls, only: Optional[tuple] = None) -> list:
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]
    if only is None:
        return fields
    by_name = {f.name: f for f in fields}
    return [by_name[name] for name in only]


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    shown = f.metadata.get("default_text")
    if shown is None and f.default is not dataclasses.MISSING and f.default is not None \
            and not isinstance(f.default, bool):
        shown = str(f.default)
    return f"{text} (default: {shown})" if shown else text


def add_flags(parser: argparse.ArgumentParser, cls, only: Optional[tuple] = None,
              required: tuple = ()) -> None:
    """Add the flags of dataclass ``cls`` (those named in ``only``, in its order; all by
    default) to ``parser``; the fields named in ``required`` become required flags."""
    for f in _cli_fields(cls, only):
        meta = f.metadata
        kw: dict = {"dest": f.name, "help": _help(f)}
        if isinstance(f.default, bool):
            kw["action"] = "store_false" if meta.get("negate") else "store_true"
        else:
            if meta.get("repeat") is not None:
                kw.update(action="append", default=None)
            elif f.name in required:
                kw.update(required=True, help=meta.get("help", ""))
            else:
                kw["default"] = f.default if f.default is not dataclasses.MISSING else None
            for key in ("metavar", "type", "choices"):
                if meta.get(key) is not None:
                    kw[key] = meta[key]
        parser.add_argument(flag_name(f), **kw)


def from_args(cls, args: argparse.Namespace, **extra):
    """The dataclass ``cls`` from parsed arguments (flags absent from ``args`` keep their
    default); ``extra`` sets fields directly."""
    values = {}
    for f in _cli_fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        repeat = f.metadata.get("repeat")
        values[f.name] = repeat(value) if repeat is not None else value
    values.update(extra)
    return cls(**values)


def check_values(obj) -> None:
    """Check a settings dataclass built in Python by its flags' rules (``type``, ``choices``).

    Raises
    ------
    SettingError
        "--flag: why" for the first value out of range.
    """
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None or meta.get("repeat") is not None or isinstance(f.default, bool):
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise SettingError(f"{flag_name(f)}: {value!r} is not one of {', '.join(meta['choices'])}")
        if meta.get("type") is not None:
            try:
                meta["type"](value)
            except (argparse.ArgumentTypeError, SettingError) as exc:
                raise SettingError(f"{flag_name(f)}: {exc}") from None


# --------------------------------------------------------------------------- value types
def _integer(value: Any) -> int:
    """An int from an int or its text (not a bool, a float or '3.0')."""
    if isinstance(value, bool):
        raise ValueError
    return int(value) if isinstance(value, int) else int(str(value).strip())


def positive_int(value: Any) -> int:
    """An integer ≥ 1."""
    try:
        v = _integer(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def nonnegative_int(value: Any) -> int:
    """An integer in ``[0, MAX_SEED]`` (a seed every generator here accepts)."""
    try:
        v = _integer(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value!r}")
    return v


def nonnegative_float(value: Any) -> float:
    """A finite number ≥ 0."""
    try:
        v = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {value!r}")
    return v


def positive_float(value: Any) -> float:
    """A finite number > 0."""
    try:
        v = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value!r}")
    return v


def nonempty(value: Any) -> str:
    """A non-blank string."""
    if not isinstance(value, str) or not value.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {value!r}")
    return value


# --------------------------------------------------------------------------- repeated flags
def split_list(values: Optional[list]) -> Optional[list]:
    """``--eval a --eval b,c`` → ``[a, b, c]`` (None if not given; a blank item is an error)."""
    if not values:
        return None
    out = []
    for v in values:
        parts = [p.strip() for p in v.split(",")]
        if not all(parts):
            raise SettingError(f"--eval expects SOURCE[,SOURCE…], got {v!r}")
        out.extend(parts)
    return out


def parse_overrides(values: Optional[list]) -> dict:
    """``--override down_proj=sparsegpt`` (repeatable) → ``{"down_proj": "sparsegpt"}``."""
    from layerprune.solvers import SolverError

    out = {}
    for v in values or []:
        name, sep, solver = v.partition("=")
        if not sep or not name.strip() or not solver.strip():
            raise SolverError(f"--override expects NAME=SOLVER, got {v!r}")
        out[name.strip()] = solver.strip()
    return out


def parse_solver_options(values: Optional[list]) -> dict:
    """``--solver-option candidates=32`` (repeatable) → ``{"candidates": 32}``; values are read
    as int, then float, else kept as text."""
    from layerprune.solvers import SolverError

    out = {}
    for v in values or []:
        key, sep, text = v.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise SolverError(f"--solver-option expects KEY=VALUE, got {v!r}")
        text = text.strip()
        for cast in (int, float):
            try:
                out[key.strip()] = cast(text)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = text
    return out
