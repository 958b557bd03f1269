"""layerprune: layer-wise pruning masks for LLMs, solved with real optimisation.

Importing it imports no optimisation package (pyscipopt, ortools, cvxpy) and no model code;
backends are loaded by name.

>>> import layerprune as lp
>>> problem = lp.make_instance(4, 32, pattern="per-row:0.5")
>>> result = lp.solve(problem, "wanda")
>>> result.objective >= 0
True
"""
from layerprune.problems import (LayerProblem, ProblemError, load_instance, make_instance,
                                 parse_pattern, save_instance)
from layerprune.solvers import (Params, Result, SolverError, Status, list_solvers, make_solver,
                                solver_names)

from .api import solve

__version__ = "0.1.0"

__all__ = [
    "LayerProblem", "ProblemError", "load_instance", "save_instance", "make_instance", "parse_pattern",
    "Params", "Result", "SolverError", "Status", "list_solvers", "make_solver", "solver_names",
    "solve",
]
