"""The plan of a prune: every target linear with its solver, validated against the pattern,
the objective and the overrides before any weight changes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from layerprune.problems import PatternError, ProblemError, parse_pattern
from layerprune.solvers import Solver, SolverError, get_solver_class, make_solver

from .structure import _qualified, find_linears

__all__ = ["DEFAULT_SOLVER", "DEFAULT_OBJECTIVE", "DEFAULT_SOLVERS", "native_objective", "default_solver", "Plan",
           "check_settings", "build_solvers"]

#: the objective of a prune told neither its solver nor its objective (``PruneConfig``, ``prune_model``)
DEFAULT_OBJECTIVE = "reconstruct"
#: the backend a prune uses for each objective unless told otherwise: ADMM with the CG refit
#: fits the 15-minute default job on 2 cores (docs/DECISIONS.md, "The default prune")
DEFAULT_SOLVERS = {"reconstruct": "admm", "mask": "sparseswaps"}
DEFAULT_SOLVER = DEFAULT_SOLVERS[DEFAULT_OBJECTIVE]


def native_objective(solver: Union[str, Solver]) -> str:
    """The objective a solver (registry name or instance) runs when none is given: ``mask``
    where it takes it (Wanda's, RIA's and SparseSwaps' published form; SparseGPT's weight update
    needs ``reconstruct`` given), else ``reconstruct`` (ADMM, ALPS, …); an unknown name gets
    ``mask`` and is refused by the solver checks that follow."""
    try:
        objectives = solver.objectives if isinstance(solver, Solver) else get_solver_class(solver).objectives
    except SolverError:
        return "mask"
    return "mask" if "mask" in objectives else "reconstruct"


def default_solver(solver: Union[None, str, Solver], objective: Optional[str]) -> tuple:
    """``(solver, objective)`` of a layer-wise prune with the defaults filled in: neither given →
    the default prune (:data:`DEFAULT_SOLVER`, :data:`DEFAULT_OBJECTIVE`); an objective alone →
    its default solver (:data:`DEFAULT_SOLVERS`; an unknown objective keeps the default solver
    and is refused by the checks); a solver alone → :func:`native_objective`."""
    if solver is None:
        objective = objective or DEFAULT_OBJECTIVE
        return DEFAULT_SOLVERS.get(objective, DEFAULT_SOLVER), objective
    return solver, objective if objective is not None else native_objective(solver)


def _resolve_solver(qualified: str, default: str, overrides: dict[str, str]) -> str:
    """Solver for a layer: an override whose key is the layer's name or a substring of it
    (the longest matching key wins), else the default."""
    hits = [k for k in overrides if k == qualified or k in qualified]
    if not hits:
        return default
    return overrides[max(hits, key=len)]


def _check_solver_takes(solver: Union[str, Solver], pattern: str, objective: str, what: str) -> None:
    """One line (``SolverError``) if the solver — a registry name, or an instance with its
    options — cannot take the pattern and objective (``Solver.can_take``)."""
    kind = parse_pattern(pattern).name
    if isinstance(solver, Solver):
        why = solver.can_take(kind, objective, pattern)
    else:
        why = get_solver_class(solver).why_not_kind(kind, objective, pattern)
    if why:
        raise SolverError(f"{what}: {why}")


@dataclass
class _Layer:
    """One target linear of the plan and the solver chosen for it."""

    block: int          # index of its decoder block (-1 for lm_head)
    local: str          # name inside the block
    qualified: str      # name in the model
    linear: nn.Linear
    solver: str
    pattern: str        # its pattern (the job's, or its own fraction from a sparsity map)


@dataclass
class Plan:
    """Every linear a prune will change, validated before any weight changes."""

    blocks: list[list[_Layer]]          # per decoder block, its target linears in registration order
    lm_head: Optional[_Layer] = None    # the output projection, when it is pruned too

    @property
    def names(self) -> list[str]:
        """Qualified names of every layer to prune, in pruning order."""
        return [layer.qualified for layers in self.blocks for layer in layers] + \
            ([self.lm_head.qualified] if self.lm_head is not None else [])

    @property
    def total(self) -> int:
        """Number of layers to prune."""
        return sum(len(layers) for layers in self.blocks) + int(self.lm_head is not None)


def check_settings(pattern: str, objective: str, solver: Union[str, Solver], overrides: dict[str, str],
                   init: Optional[str]) -> None:
    """What can be checked without a model: the objective, the pattern's syntax, and that every
    solver named (default, ``--init``, overrides) exists, is installed and takes both."""
    from layerprune.problems import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ProblemError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    parse_pattern(pattern)
    _check_solver_takes(solver, pattern, objective, "--solver")
    if init is not None:
        _check_solver_takes(init, pattern, objective, "--init")
    for name in set(overrides.values()):
        _check_solver_takes(name, pattern, objective, "--override")


def _plan(model: nn.Module, blocks: Sequence[nn.Module], path: str, pattern: str, objective: str,
          solver: Union[str, Solver], overrides: dict[str, str], init: Optional[str],
          prune_lm_head: bool = False, fractions: Optional[dict[str, float]] = None) -> Plan:
    """Every target linear, validated against the pattern and its solver *before* any change.

    ``fractions`` ({qualified name: pruned fraction}, a sparsity map) gives a layer its own
    pattern of ``pattern``'s kind; every key must name a target layer."""
    check_settings(pattern, objective, solver, overrides, init)
    if fractions:
        from .allocate import check_allocatable
        check_allocatable(pattern, "--sparsity-map")
    default = getattr(solver, "name", solver)
    plan, used = Plan([]), set()
    for i, block in enumerate(blocks):
        layers = []
        for local, lin in find_linears(block).items():
            qualified = _qualified(path, i, local)
            own = _own_pattern(pattern, qualified, fractions)
            _check_fits(parse_pattern(own), own, qualified, lin)
            used.update(k for k in overrides if k == qualified or k in qualified)
            layers.append(_Layer(i, local, qualified, lin, _resolve_solver(qualified, default, overrides), own))
        plan.blocks.append(layers)
    if prune_lm_head:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ProblemError(f"the output projection is a {type(head).__name__}, not a Linear")
        own = _own_pattern(pattern, "lm_head", fractions)
        try:
            parse_pattern(own).bind(*head.weight.shape)
        except PatternError as exc:
            raise ProblemError(f"pattern {own} does not fit layer lm_head: {exc}") from None
        used.update(k for k in overrides if k in "lm_head")
        plan.lm_head = _Layer(-1, "lm_head", "lm_head", head, _resolve_solver("lm_head", default, overrides), own)
    unused = sorted(set(overrides) - used)
    if unused:
        raise SolverError(f"--override names no layer of the model: {', '.join(unused)}")
    if fractions:
        from .allocate import check_map_names
        check_map_names(fractions, plan.names)
    return plan


def _own_pattern(pattern: str, qualified: str, fractions: Optional[dict[str, float]]) -> str:
    """The layer's pattern: its fraction from the map in ``pattern``'s kind, else ``pattern``."""
    if fractions and qualified in fractions:
        from .allocate import layer_pattern
        return layer_pattern(pattern, fractions[qualified])
    return pattern


def _check_fits(pat, pattern: str, qualified: str, lin: nn.Linear) -> None:
    d_out, d_in = lin.weight.shape
    try:
        pat.bind(d_out, d_in)
    except PatternError as exc:
        raise ProblemError(f"pattern {pattern} does not fit layer {qualified} "
                           f"({d_out}×{d_in}): {exc}") from None


def build_solvers(default: Union[str, Solver], overrides: dict[str, str], init: Optional[str],
                  options: Optional[dict], pattern: str, objective: str) -> dict[str, Solver]:
    """Every solver a prune uses, constructed once, by registry name: the default (with
    ``options``; a :class:`Solver` instance is used as it is), each override's and ``init``'s.

    Constructing them checks their names and option values, and each is checked to take the
    pattern and objective with its options, so a bad one fails before any work.
    """
    instance = default if isinstance(default, Solver) else None
    name = instance.name if instance is not None else default
    names = set(overrides.values()) | ({init} if init else set()) | ({name} if instance is None else set())
    solvers = {n: make_solver(n, **((options or {}) if n == name else {})) for n in names}
    if instance is not None:
        solvers[name] = instance
    for solver in solvers.values():
        _check_solver_takes(solver, pattern, objective, "--solver-option" if solver.options else "--solver")
    return solvers
