"""Backend options as typed, documented, validated declarations.

A backend lists its options as :class:`Option` values (``Solver.option_specs``). The solver's
constructor checks every given value against its declaration — type, range, allowed words —
and raises :class:`OptionError` (a :class:`~layerprune.solvers.SolverError`) with one line
naming the solver, the option and what it takes, before any work starts. Values may be given
as text (``--solver-option alpha=0.8`` on the command line) and are converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["Option", "OptionError", "parse_bool"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class OptionError(ValueError):
    """A backend option has a value its declaration does not allow."""


def parse_bool(value: Any) -> bool:
    """``True``/``False``, 0/1 or the words true/false, yes/no, on/off; anything else raises."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise OptionError("expected true or false")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise OptionError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise OptionError("expected an integer")


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise OptionError("expected a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise OptionError("expected a number") from None
    else:
        raise OptionError("expected a number")
    if not math.isfinite(out):
        raise OptionError("expected a finite number")
    return out


def _parse_str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError("expected a word")
    return value.strip()


_PARSERS: dict[type, Callable[[Any], Any]] = {bool: parse_bool, int: _parse_int, float: _parse_float,
                                              str: _parse_str}


@dataclass(frozen=True)
class Option:
    """One backend option.

    name : keyword of the solver's constructor (``make_solver(name, alpha=0.8)``)
    kind : ``bool``, ``int``, ``float`` or ``str``
    default : value when not given (``None``: the backend decides, e.g. per objective; the
        help says how)
    help : one line: what it does
    choices : allowed words (``str`` options)
    low, high : allowed range of numbers (inclusive unless ``low_open`` / ``high_open``)
    check : extra rule: a function of the converted value returning None or why it is refused
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None

    def takes(self) -> str:
        """What the option takes, in words (``an integer ≥ 1``, ``one of split, joint``)."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        word = {bool: "true or false", int: "an integer", float: "a number", str: "a word"}[self.kind]
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '≥'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '≤'} {self.high:g}")
        return word + (" " + " and ".join(parts) if parts else "")

    def parse(self, value: Any) -> Any:
        """The converted value; raises :class:`OptionError` (saying what it takes) if refused."""
        try:
            out = _PARSERS[self.kind](value)
        except OptionError:
            raise OptionError(f"got {value!r}, takes {self.takes()}") from None
        if self.choices and out not in self.choices:
            raise OptionError(f"got {value!r}, takes {self.takes()}")
        if self.kind in (int, float):
            below = self.low is not None and (out <= self.low if self.low_open else out < self.low)
            above = self.high is not None and (out >= self.high if self.high_open else out > self.high)
            if below or above:
                raise OptionError(f"got {value!r}, takes {self.takes()}")
        if self.check is not None:
            why = self.check(out)
            if why:
                raise OptionError(f"got {value!r}: {why}")
        return out

    def describe(self) -> dict:
        """A JSON-ready record (``layerprune solvers --json``)."""
        return {"name": self.name, "type": self.kind.__name__, "default": self.default,
                "takes": self.takes(), "help": self.help}
