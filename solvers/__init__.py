"""How problems are solved: the solver contract and the registry of backends.

Backends are imported lazily by name (:func:`make_solver`); importing this package imports
no optimisation package.
"""
from .base import Callback, Params, Proposal, Result, Solver, SolverError, Status, refit_scored
from .registry import SOLVERS, get_solver_class, list_solvers, make_solver, solver_names

__all__ = ["Callback", "Params", "Proposal", "Result", "Solver", "SolverError", "Status", "refit_scored",
           "SOLVERS", "get_solver_class", "list_solvers", "make_solver", "solver_names"]
