"""``SPEC.toml`` of an optimality-gap study (CONTRACT.md, "Study spec and results table").

.. code-block:: toml

    [instances]
    files = ["instances/*.npz"]   # globs relative to the spec file
    cut = { model = "smollm2", ... }  # instances cut from a model (layerprune.library)

    [grid]
    patterns = ["per-row:0.5", "nm:2:4"]
    objectives = ["mask", "reconstruct"]
    solvers = ["wanda", "sparseswaps", "bnb"]
    time_limit = 60
    seeds = [0]

Every fault (unknown key, bad value, no instance matched) is one :class:`SpecError` line naming
the key; nothing is read beyond the spec file and the globs' directories.
"""
from __future__ import annotations

import glob
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

__all__ = ["SpecError", "StudySpec", "load_spec", "parse_spec", "same_study"]

_SECTIONS = {"instances": {"files", "cut"},
             "grid": {"patterns", "objectives", "solvers", "time_limit", "seeds"}}
_REQUIRED_GRID = ("patterns", "objectives", "solvers", "time_limit")


class SpecError(ValueError):
    """A study spec is malformed: one line naming the key."""


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec.

    path : the spec file (globs are relative to its directory)
    files : instance files the globs matched, sorted, without repeats
    cut : the parsed ``cut`` table (``layerprune.library.CutSpec``) or None
    patterns, objectives, solvers : the grid's axes, as written (patterns stripped)
    time_limit : seconds per case
    seeds : seeds of the grid
    data : the parsed TOML, to compare with another study's spec
    text : the spec file's text (copied to the study's directory)
    """

    path: Path
    files: tuple[Path, ...]
    cut: Any
    patterns: tuple[str, ...]
    objectives: tuple[str, ...]
    solvers: tuple[str, ...]
    time_limit: float
    seeds: tuple[int, ...]
    data: dict
    text: str


def load_spec(path) -> StudySpec:
    """Read and validate ``SPEC.toml``; raises :class:`SpecError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_spec(text, path)


def parse_spec(text: str, path) -> StudySpec:
    """Validate a spec's TOML ``text``; ``path`` anchors its globs. Raises :class:`SpecError`."""
    path = Path(path).resolve()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec {path.name} is not valid TOML: {exc}") from None
    _check_keys(data)
    instances, grid = data.get("instances", {}), data.get("grid", {})
    cut = _parse_cut(instances["cut"]) if "cut" in instances else None
    files = _match_files(instances.get("files", []), path.parent)
    if not files and cut is None:
        raise SpecError("instances: no instance matched (give instances.files globs or instances.cut)")
    return StudySpec(path=path, files=files, cut=cut,
                     patterns=_patterns(grid["patterns"]), objectives=_objectives(grid["objectives"]),
                     solvers=_solvers(grid["solvers"]), time_limit=_time_limit(grid["time_limit"]),
                     seeds=_seeds(grid.get("seeds", [0])), data=data, text=text)


def _check_keys(data: dict) -> None:
    for section, value in data.items():
        if section not in _SECTIONS:
            raise SpecError(f"unknown section [{section}] (known: {', '.join(sorted(_SECTIONS))})")
        if not isinstance(value, dict):
            raise SpecError(f"{section} must be a table [{section}]")
        for key in value:
            if key not in _SECTIONS[section]:
                raise SpecError(f"unknown key {section}.{key} (known: {', '.join(sorted(_SECTIONS[section]))})")
    grid = data.get("grid", {})
    for key in _REQUIRED_GRID:
        if key not in grid:
            raise SpecError(f"missing key grid.{key}")


def _string_list(value, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"{key} must be a non-empty list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise SpecError(f"{key} lists a value twice: {value!r}")
    return [v.strip() for v in value]


def _match_files(globs, base: Path) -> tuple[Path, ...]:
    if globs == []:
        return ()
    found: dict[Path, None] = {}
    for pattern in _string_list(globs, "instances.files"):
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matched = sorted(Path(p).resolve() for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not matched:
            raise SpecError(f"instances.files: {pattern!r} matched no instance file (relative to {base})")
        found.update(dict.fromkeys(matched))
    return tuple(found)


def _parse_cut(raw):
    if not isinstance(raw, dict):
        raise SpecError(f"instances.cut must be a table, got {raw!r}")
    try:
        from layerprune.library import parse_cut
    except ImportError:
        raise SpecError("instances.cut: cutting instances from a model needs layerprune.library, "
                        "which this installation lacks") from None
    try:
        return parse_cut(raw)
    except ValueError as exc:
        raise SpecError(f"instances.cut: {exc}") from None


def _patterns(value) -> tuple[str, ...]:
    from layerprune.problems import PatternError, parse_pattern

    patterns = _string_list(value, "grid.patterns")
    for p in patterns:
        try:
            parse_pattern(p)
        except PatternError as exc:
            raise SpecError(f"grid.patterns: {exc}") from None
    return tuple(patterns)


def _objectives(value) -> tuple[str, ...]:
    from layerprune.problems import OBJECTIVES

    objectives = _string_list(value, "grid.objectives")
    for o in objectives:
        if o not in OBJECTIVES:
            raise SpecError(f"grid.objectives: unknown objective {o!r} (use {' or '.join(OBJECTIVES)})")
    return tuple(objectives)


def _solvers(value) -> tuple[str, ...]:
    from layerprune.solvers import solver_names

    solvers = _string_list(value, "grid.solvers")
    known = solver_names()
    for s in solvers:
        if s not in known:
            raise SpecError(f"grid.solvers: unknown solver {s!r} (known: {', '.join(known)})")
    return tuple(solvers)


def _time_limit(value) -> float:
    from layerprune.solvers.base import MAX_TIME_LIMIT

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_TIME_LIMIT:
        raise SpecError(f"grid.time_limit must be a number of seconds in (0, {MAX_TIME_LIMIT:g}], got {value!r}")
    return float(value)


def _seeds(value) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise SpecError(f"grid.seeds must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise SpecError(f"grid.seeds lists a value twice: {value!r}")
    return tuple(value)


def same_study(spec: StudySpec, other_text: str) -> Optional[bool]:
    """Whether ``other_text`` (a spec file's text) parses to the same TOML data as ``spec``
    (comments and layout do not count); None if it is not valid TOML."""
    try:
        return tomllib.loads(other_text) == spec.data
    except tomllib.TOMLDecodeError:
        return None
