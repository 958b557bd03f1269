"""Registry of backends with lazy imports: naming a solver imports only its own module."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .base import Solver, SolverError

__all__ = ["SOLVERS", "get_solver_class", "make_solver", "solver_names", "list_solvers"]

#: registry name → "module:Class" inside layerprune.solvers
SOLVERS: dict[str, str] = {
    "brute": "brute:BruteForce",
    "scip": "scip:ScipSolver",
    "bnb": "bnb:BranchAndBound",
    "ortools": "ortools_mathopt:OrToolsSolver",
    "relax-qp": "relax_qp:RelaxQP",
    "relax-sdp": "relax_sdp:RelaxSDP",
    "relax-perspective": "relax_perspective:RelaxPerspective",
    "magnitude": "magnitude:Magnitude",
    "wanda": "wanda:Wanda",
    "ria": "ria:RIA",
    "sparsegpt": "sparsegpt:SparseGPT",
    "sparseswaps": "sparseswaps:SparseSwaps",
    "admm": "admm:ADMM",
    "alps": "alps:ALPS",
    "alternating": "alternating:Alternating",
    "sparsefw": "sparsefw:SparseFW",
}


def solver_names() -> list[str]:
    """Registered names whose module exists in this installation."""
    names = []
    for name, target in SOLVERS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(f"layerprune.solvers.{module}") is not None:
            names.append(name)
    return names


def get_solver_class(name: str) -> type[Solver]:
    """The backend class registered as ``name`` (imports its module, not its packages)."""
    if name not in SOLVERS or name not in solver_names():
        raise SolverError(f"unknown solver {name!r}; known: {', '.join(solver_names())}")
    module, cls = SOLVERS[name].split(":")
    return getattr(importlib.import_module(f"layerprune.solvers.{module}"), cls)


def make_solver(name: str, **options: Any) -> Solver:
    """An instance of backend ``name`` with its options."""
    return get_solver_class(name)(**options)


def list_solvers() -> list[dict]:
    """Capabilities of every registered backend (installed or not)."""
    return [get_solver_class(n).capabilities() for n in solver_names()]
