"""One case on a Dask worker: load its instance file, solve it, return its row.

Nothing a case does escapes as an exception: a failure is a row with status ``error`` and
the one-line message (the driver turns a worker that dies or hangs into such a row too).
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import socket
import time

from .cases import Case

__all__ = ["run_case", "base_row", "error_row", "versions"]


def base_row(case: Case) -> dict:
    """The columns a case has before it is solved."""
    return {"case": case.case, "instance": case.instance, "d_out": case.d_out, "d_in": case.d_in,
            "pattern": case.pattern, "objective_kind": case.objective_kind, "solver": case.solver,
            "seed": case.seed, "time_limit": case.time_limit}


def error_row(case: Case, message: str, wall_seconds: float | None = None) -> dict:
    """The row of a case that failed: status ``error``, no objective, ``message`` one line."""
    text = " ".join(s.strip() for s in str(message).splitlines() if s.strip()) or "error"
    try:
        used = versions(case.solver)
    except Exception:  # the solver's class itself cannot be loaded
        used = None
    return {**base_row(case), "status": "error", "message": text, "wall_seconds": wall_seconds,
            "versions": used, "finished_at": _now()}


@functools.lru_cache(maxsize=None)
def versions(solver: str) -> str:
    """JSON of the versions that produced a row: python, layerprune, torch, numpy and the
    solver's own packages."""
    from layerprune.solvers import get_solver_class

    names = ("layerprune", "torch", "numpy") + tuple(get_solver_class(solver).requires)
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return json.dumps(found, sort_keys=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def run_case(case: Case) -> dict:
    """Solve ``case`` with one CPU thread and ``Params(time_limit, seed)``; return its row.

    Columns beyond CONTRACT: ``time_limit``, ``bound_source``, ``objective_is_upper_bound``
    (a CG refit: the objective bounds the mask's from above), ``message`` (errors),
    ``wall_seconds`` (load + solve + refit on the worker), ``finished_at`` (UTC), ``host``.
    """
    import torch

    from layerprune.problems import load_instance
    from layerprune.solvers import Params, make_solver

    started = time.perf_counter()
    torch.set_num_threads(1)
    try:
        problem = load_instance(case.path, pattern=case.pattern, objective=case.objective_kind)
        result = make_solver(case.solver).solve(
            problem, params=Params(time_limit=case.time_limit, seed=case.seed, threads=1))
    except Exception as exc:  # the case's failure is its row, not the study's
        return error_row(case, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
    row = {**base_row(case), "status": result.status.value, "limit": result.limit,
           "objective": result.objective, "lower_bound": result.lower_bound, "seconds": result.seconds,
           "iterations": result.iterations, "bound_source": result.bound_source,
           "objective_is_upper_bound": bool(result.info.get("objective_is_upper_bound", False)),
           "versions": versions(case.solver), "wall_seconds": time.perf_counter() - started,
           "finished_at": _now(), "host": f"{socket.gethostname()}:{os.getpid()}"}
    return row
