"""The plan of a prune: every target linear with its solver, validated against the pattern,
the objective and the overrides before any weight changes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from layerprune.problems import PatternError, ProblemError, parse_pattern
from layerprune.solvers import Solver, SolverError, get_solver_class

from .structure import _qualified, find_linears

__all__: list = []


def _resolve_solver(qualified: str, default: str, overrides: dict[str, str]) -> str:
    """Solver for a layer: an override whose key is the layer's name or a substring of it
    (the longest matching key wins), else the default."""
    hits = [k for k in overrides if k == qualified or k in qualified]
    if not hits:
        return default
    return overrides[max(hits, key=len)]


def _check_solver_takes(name: Union[str, Solver], pattern: str, objective: str, what: str) -> None:
    cls = type(name) if isinstance(name, Solver) else get_solver_class(name)
    name = cls.name
    missing = cls.missing_packages()
    if missing:
        raise SolverError(f"{what}: solver {name!r} needs the package(s) {', '.join(missing)}")
    kind = parse_pattern(pattern).name
    if kind not in cls.patterns:
        raise SolverError(f"{what}: solver {name!r} cannot take pattern {pattern} "
                          f"(takes {', '.join(sorted(cls.patterns))})")
    if objective not in cls.objectives:
        raise SolverError(f"{what}: solver {name!r} cannot take objective {objective!r}")


@dataclass
class _Layer:
    block: int
    local: str          # name inside the block
    qualified: str      # name in the model
    linear: nn.Linear
    solver: str


def _plan(model: nn.Module, blocks: Sequence[nn.Module], path: str, pattern: str, objective: str,
          solver: str, overrides: dict[str, str], init: Optional[str],
          prune_lm_head: bool = False) -> list[list[_Layer]]:
    """Every target linear, validated against the pattern and its solver *before* any change."""
    from layerprune.problems import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ProblemError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    pat = parse_pattern(pattern)
    plan, used = [], set()
    _check_solver_takes(solver, pattern, objective, "--solver")
    if init is not None:
        _check_solver_takes(init, pattern, objective, "--init")
    for name in set(overrides.values()):
        _check_solver_takes(name, pattern, objective, "--override")
    for i, block in enumerate(blocks):
        layers = []
        for local, lin in find_linears(block).items():
            qualified = _qualified(path, i, local)
            d_out, d_in = lin.weight.shape
            try:
                pat.bind(d_out, d_in)
            except PatternError as exc:
                raise ProblemError(f"pattern {pattern} does not fit layer {qualified} "
                                   f"({d_out}×{d_in}): {exc}") from None
            name = _resolve_solver(qualified, getattr(solver, "name", solver), overrides)
            used.update(k for k in overrides if k == qualified or k in qualified)
            layers.append(_Layer(i, local, qualified, lin, name))
        plan.append(layers)
    if prune_lm_head:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ProblemError(f"the output projection is a {type(head).__name__}, not a Linear")
        try:
            pat.bind(*head.weight.shape)
        except PatternError as exc:
            raise ProblemError(f"pattern {pattern} does not fit layer lm_head: {exc}") from None
        used.update(k for k in overrides if k in "lm_head")
    unused = sorted(set(overrides) - used)
    if unused:
        raise SolverError(f"--override names no layer of the model: {', '.join(unused)}")
    return plan
