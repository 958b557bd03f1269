"""One-call entry points for notebooks and scripts."""
from __future__ import annotations

from typing import Optional, Union

import torch

from layerprune.problems import LayerProblem
from layerprune.solvers import Callback, Params, Result, make_solver

__all__ = ["solve", "initial_mask"]


def initial_mask(problem: LayerProblem, init: Union[None, str, torch.Tensor],
                 params: Optional[Params] = None) -> Optional[torch.Tensor]:
    """A warm-start mask: given directly, or the mask of another solver run by name."""
    if init is None or isinstance(init, torch.Tensor):
        return init
    return make_solver(init).solve(problem, params=params).mask


def solve(problem: LayerProblem, solver: str = "wanda", *, init: Union[None, str, torch.Tensor] = None,
          params: Optional[Params] = None, callback: Optional[Callback] = None, **options) -> Result:
    """Solve ``problem`` with the backend registered as ``solver``.

    Parameters
    ----------
    problem : LayerProblem
    solver : registry name (``layerprune solvers`` lists them)
    init : a feasible (d_out, d_in) bool mask, or the name of a solver whose mask warm-starts
    params : common parameters (time limit, gap tolerance, seed, device, dtype, …);
        keyword arguments that are :class:`Params` fields are accepted directly
    **options : backend-specific options (constructor arguments)

    Returns
    -------
    Result with the mask, weights, re-scored objective, lower bound, status, seconds.
    """
    fields = set(Params.__dataclass_fields__)
    param_kw = {k: options.pop(k) for k in list(options) if k in fields}
    if param_kw:
        base = params or Params()
        params = Params(**{**base.__dict__, **param_kw})
    backend = make_solver(solver, **options)
    return backend.solve(problem, params=params, init=initial_mask(problem, init, params), callback=callback)
