"""``layerprune`` command line: ``solve``, ``solvers`` and ``study`` (CONTRACT.md), ``prune``, ``eval`` and ``speed``.

Every expected fault (bad file, shapes, pattern, unknown or missing solver, …) ends with one
clear line on stderr, a non-zero exit code and nothing written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2
EXIT_SOLVER_ERROR = 1


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (CONTRACT.md)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"layerprune: error: {message}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- solve
def _add_solve(sub) -> None:
    p = sub.add_parser("solve", help="solve one instance file (.npz with W and G or X)",
                       description="Solve one layer instance (CONTRACT.md).")
    p.add_argument("instance", metavar="INSTANCE.npz")
    p.add_argument("--solver", required=True, metavar="NAME")
    p.add_argument("--pattern", required=True, metavar="PATTERN",
                   help="per-row:K | per-row:0.5 | nm:N:M | unstructured:S | columns:K | columns:0.3")
    p.add_argument("--objective", required=True, choices=["mask", "reconstruct"])
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS")
    p.add_argument("--init", default=None, metavar="SOLVER_NAME", help="warm start from this solver's mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-mask", default=None, metavar="FILE.npy")
    p.add_argument("--save-weights", default=None, metavar="FILE.npy")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_solve)


def _check_solve_args(args, ProblemError) -> None:
    """Flags that need no instance: one :class:`ProblemError` line per fault."""
    import math

    from layerprune.solvers.base import MAX_TIME_LIMIT  # beyond it a "limit" means none

    t = args.time_limit
    if t is not None and not (math.isfinite(t) and 0 < t <= MAX_TIME_LIMIT):
        raise ProblemError(f"--time-limit must be a number of seconds in (0, {MAX_TIME_LIMIT:g}], got {t} "
                           "(omit it for no limit)")
    if args.seed < 0:
        raise ProblemError(f"--seed must be a non-negative integer, got {args.seed}")
    for flag, name in (("--solver", args.solver), ("--init", args.init)):
        if name is not None and not name.strip():
            raise ProblemError(f"{flag} is empty")


def _cmd_solve(args) -> int:
    from layerprune.problems import (PatternError, ProblemError, atomic_write_all, check_writable,
                                     load_instance)
    from layerprune.solvers import Params, SolverError, Status, make_solver

    outputs = [(flag, path) for flag, path in (("--save-mask", args.save_mask), ("--save-weights", args.save_weights))
               if path is not None]
    try:
        _check_solve_args(args, ProblemError)
        # every output is checked before any work, so that no solve is lost to a bad path
        for flag, path in outputs:
            check_writable(path, what=flag)
        if len(outputs) == 2 and os.path.abspath(outputs[0][1]) == os.path.abspath(outputs[1][1]):
            raise ProblemError(f"--save-mask and --save-weights name the same file: {outputs[0][1]}")
        for flag, path in outputs:
            if os.path.abspath(path) == os.path.abspath(args.instance):
                raise ProblemError(f"{flag} would overwrite the instance file {path}")
        problem = load_instance(args.instance, pattern=args.pattern, objective=args.objective)
        backend = make_solver(args.solver)
        why = backend.why_not(problem)
        if why:
            raise SolverError(why)
        params = Params(time_limit=args.time_limit, seed=args.seed)
        init_backend = None
        if args.init is not None:
            init_backend = make_solver(args.init)
            why = init_backend.why_not(problem)
            if why:
                raise SolverError(f"--init: {why}")
    except (ProblemError, PatternError, SolverError) as exc:
        return _fail(str(exc))
    init = None
    if init_backend is not None:
        try:
            init = init_backend.solve(problem, params=params).mask
        except KeyboardInterrupt:
            return _fail("interrupted", 130)
        except Exception as exc:  # the warm start's backend failed: nothing solved, nothing written
            return _fail(f"--init solver {args.init!r} failed: {type(exc).__name__}: {_one_line(exc)}",
                         EXIT_SOLVER_ERROR)
    try:
        result = backend.solve(problem, params=params, init=init)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # a backend failure: reported, nothing written
        if args.json:
            print(json.dumps({"solver": args.solver, "status": Status.ERROR.value, "limit": None,
                              "objective": None, "lower_bound": None, "gap": None,
                              "seconds": None, "iterations": None}))
        return _fail(f"solver {args.solver!r} failed: {type(exc).__name__}: {_one_line(exc)}", EXIT_SOLVER_ERROR)
    if result.mask is not None and outputs:
        arrays = {"--save-mask": result.mask.cpu().numpy().astype(bool),
                  "--save-weights": None if result.weights is None else result.weights.cpu().numpy()}
        writes = [(path, lambda tmp, a=arrays[flag]: _save_npy(tmp, a)) for flag, path in outputs
                  if arrays[flag] is not None]
        try:  # all or none: temporaries first, renamed together
            atomic_write_all(writes)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot write {', '.join(str(p) for p, _ in writes)}: {_one_line(exc)}; nothing written")
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(_describe(result, problem))
    return 0 if result.status in (Status.OPTIMAL, Status.FEASIBLE) else EXIT_SOLVER_ERROR


def _one_line(exc: BaseException) -> str:
    """An exception's message as one line (multi-line messages joined)."""
    text = " ".join(s.strip() for s in str(exc).splitlines() if s.strip())
    return text or type(exc).__name__


def _save_npy(path: str, array) -> None:
    import numpy as np

    with open(path, "wb") as fh:  # a file object: np.save must not append ".npy" to the temp name
        np.save(fh, array)


def _describe(result, problem) -> str:
    def num(x):
        return "—" if x is None else f"{x:.6g}"

    gap = result.gap
    lines = [
        f"problem    {problem.describe()}",
        f"solver     {result.solver}",
        f"status     {result.status.value}" + (f" (limit: {result.limit}" + (f", {result.limit_detail}" if result.limit_detail else "")
                                                  + ")" if result.limit else ""),
        f"objective  {num(result.objective)}",
        f"bound      {num(result.lower_bound)}" + (f"  [{result.bound_source}]" if result.bound_source else ""),
        f"gap        {'—' if gap is None else f'{100 * gap:.4g}%'}",
        f"time       {result.seconds:.3f} s, {result.iterations} iterations",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- solvers
def _add_solvers(sub) -> None:
    p = sub.add_parser("solvers", help="list every backend, whether it is installed, what it takes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_solvers)


def _cmd_solvers(args) -> int:
    from layerprune.solvers import list_solvers

    rows = list_solvers()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'solver':<18} {'installed':<9} {'objectives':<18} {'patterns':<34} {'bound':<6} description"
    print(header)
    for r in rows:
        bound = "exact" if r["exact"] else ("yes" if r["certifies"] else "no")
        print(f"{r['name']:<18} {'yes' if r['installed'] else 'NO':<9} {','.join(r['objectives']):<18} "
              f"{','.join(r['patterns']):<34} {bound:<6} {r['description']}")
    return 0


# --------------------------------------------------------------------------- study
def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run an optimality-gap study (SPEC.toml) on Dask",
                       description="Run every case of a study spec not yet in DIR/results.parquet "
                                   "(CONTRACT.md, 'Study spec and results table').")
    p.add_argument("spec", metavar="SPEC.toml")
    p.add_argument("--out", required=True, metavar="DIR", help="the study's directory (resumed if it exists)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="a running Dask scheduler, best with one-thread workers (default: a local cluster)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes of the local cluster, one thread each (default: one per CPU)")
    p.add_argument("--plots", action="store_true", help="draw the study's figures into DIR/plots and write "
                                                       "DIR/gap_table.csv when done")
    p.set_defaults(handler=_cmd_study)


def _cmd_study(args) -> int:
    if args.workers is not None and args.scheduler is not None:
        return _fail("give --workers (a local cluster) or --scheduler (an existing one), not both")
    try:
        from layerprune.studies import SpecError, run_study
    except ImportError as exc:
        return _fail(f"layerprune study needs dask[distributed] and pyarrow: {exc}")
    try:
        run_study(args.spec, args.out, scheduler=args.scheduler, workers=args.workers)
    except SpecError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail(f"interrupted: the finished cases are in {args.out}; run the same command again to resume", 130)
    if args.plots:
        from layerprune.studies.plots import plot_study

        plot_study(args.out)
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="layerprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    sub.required = True
    _add_solve(sub)
    _add_solvers(sub)
    _add_study(sub)
    try:
        from layerprune.prune_cli import add_subcommands
    except ImportError:  # the model pipeline is optional for the solve contract
        pass
    else:
        add_subcommands(sub)
    from layerprune.speed_cli import add_subcommand as add_speed

    add_speed(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and --help
        return int(exc.code or 0)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
