"""The cases of a study: instances × patterns × objectives × solvers × seeds.

A case's id is the first 16 hex digits of the SHA-256 of the JSON list
``[instance label, SHA-256 of the instance file's bytes, pattern, objective, solver, seed,
time_limit]``: the same file content under the same label, solved the same way, keeps its id
across runs, machines and spec layouts; a changed file or limit is a new case.

A case a solver cannot take (its pattern kind, objective, dense target or size:
:meth:`Solver.why_not`), or whose pattern does not fit the instance's shape, is *skipped*: it
is no row of the table, and :class:`Plan` says why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from .spec import SpecError, StudySpec

__all__ = ["Case", "Plan", "Skipped", "plan_cases", "case_id", "instance_label"]


@dataclass(frozen=True)
class Case:
    """One solve of a study: what :func:`layerprune.studies.worker.run_case` gets."""

    case: str
    instance: str
    path: str
    d_out: int
    d_in: int
    pattern: str
    objective_kind: str
    solver: str
    seed: int
    time_limit: float


class Skipped(NamedTuple):
    """A case the grid names but its solver cannot take, and why."""

    instance: str
    pattern: str
    objective_kind: str
    solver: str
    reason: str


class Plan(NamedTuple):
    cases: list[Case]
    skipped: list[Skipped]


def case_id(instance: str, sha: str, pattern: str, objective: str, solver: str, seed: int,
            time_limit: float) -> str:
    """The stable id of a case (module docstring)."""
    key = json.dumps([instance, sha, pattern, objective, solver, int(seed), float(time_limit)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def instance_label(path: Path, roots: Sequence[Path]) -> str:
    """``path`` relative to the first of ``roots`` that holds it (POSIX form), else absolute."""
    for root in roots:
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return path.resolve().as_posix()


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plan_cases(spec: StudySpec, files: Sequence[Path], roots: Sequence[Path]) -> Plan:
    """Every case of the grid on ``files``, and the skipped ones.

    Each file is loaded once (validated as an instance: a bad file raises :class:`SpecError`);
    patterns and objectives are bound to it without re-reading it.
    """
    from layerprune.problems import PatternError, ProblemError, load_instance, parse_pattern
    from layerprune.solvers import make_solver

    solvers = {name: make_solver(name) for name in spec.solvers}
    cases, skipped = [], []
    for path in files:
        label = instance_label(path, roots)
        try:
            base = load_instance(path, pattern="per-row:0", objective="mask")
        except ProblemError as exc:
            raise SpecError(f"instance {label}: {exc}") from None
        sha = _file_sha(path)
        for pattern in spec.patterns:
            try:
                bound = parse_pattern(pattern).bind(base.d_out, base.d_in)
            except PatternError as exc:
                skipped += [Skipped(label, pattern, o, s, str(exc)) for o in spec.objectives for s in spec.solvers]
                continue
            for objective in spec.objectives:
                problem = dataclasses.replace(base, pattern=bound, objective_kind=objective)
                for name, backend in solvers.items():
                    why = backend.why_not(problem)
                    if why:
                        skipped.append(Skipped(label, pattern, objective, name, why))
                        continue
                    cases += [Case(case_id(label, sha, pattern, objective, name, seed, spec.time_limit),
                                   label, str(path), base.d_out, base.d_in, pattern, objective, name, seed,
                                   spec.time_limit) for seed in spec.seeds]
    return Plan(cases, skipped)
