"""ALPS against SparseGPT and ADMM on real SmolLM2 layers: the reconstruct objective and seconds.

Every linear of block ``--block`` of the bundled SmolLM2, calibrated on ``austen-calib``
(``--nsamples`` × ``--seqlen`` tokens, seed 0; the earlier blocks dense, as
:func:`layerprune.pipeline.layer_problems` builds them), is solved by each solver at each
pattern in one run, so the ratios come from the same machine load. Each solver's result is the
contract's (``Solver.solve``): its mask, refitted per ``Params.refit`` (``auto``: CG from the
solver's own weights on these layers), re-scored in float64. ``seconds`` is the solve, the
refit's time is reported apart. Solvers are given as ``name`` or ``name:option=value,...``.

Usage::

    python benchmarks/alps_layers.py --out benchmarks/results/alps
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_SOLVERS = "sparsegpt,admm,alps"
DEFAULT_PATTERNS = "per-row:0.5,per-row:0.7,nm:2:4"


def parse_solver(spec: str) -> tuple[str, dict]:
    """``"alps:init_solver=sparsegpt,rho=0.2"`` → ``("alps", {"init_solver": "sparsegpt", "rho": "0.2"})``."""
    name, _, rest = spec.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(",") if item) if rest else {}
    return name, options


def _git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def solve_row(problem, spec: str) -> dict:
    """One solver on one problem: the contract's objective, solve and refit seconds, stop reason."""
    from layerprune.solvers import Params, make_solver

    name, options = parse_solver(spec)
    res = make_solver(name, **options).solve(problem, params=Params())
    return {"solver": spec, "objective": res.objective, "seconds": res.seconds,
            "refit_seconds": res.info.get("refit", {}).get("seconds"),
            "refit_method": res.info.get("refit", {}).get("method"),
            "own_weights_objective": res.info.get("own_weights_objective"),
            "iterations": res.iterations, "limit": res.limit, "stopped": res.info.get("stopped"),
            "final_rho": res.info.get("rho") if name == "alps" else None}


def markdown(rec: dict) -> str:
    """The results table: objective and seconds per solver, ratios to SparseGPT and ADMM."""
    solvers = rec["solvers"]
    lines = ["# ALPS vs SparseGPT vs ADMM on real SmolLM2 layers (reconstruct objective)", "",
             f"Command: `{rec['command']}`  ", f"Commit {rec['commit']}{' (dirty tree)' if rec['dirty'] else ''}; "
             f"`uptime` before: {rec['uptime_before']}; after: {rec['uptime_after']}; "
             f"{rec['threads']} torch threads.  ",
             f"Block {rec['block']}, calibration austen-calib {rec['nsamples']} × {rec['seqlen']} tokens, seed 0. "
             "Objective: the contract's (mask refitted by CG from the solver's own weights, tol 1e-4, "
             "re-scored in float64); seconds: the solve only (refit apart).", ""]
    head = "| pattern | layer | " + " | ".join(f"{s} obj (s)" for s in solvers)
    ratios = [s for s in solvers if s != "sparsegpt"]
    head += " | " + " | ".join(f"{s} / sparsegpt" for s in ratios) + " | alps / admm |"
    lines += [head, "|" + "---|" * (2 + len(solvers) + len(ratios) + 1)]
    for row in rec["rows"]:
        by = {r["solver"]: r for r in row["results"]}
        cells = [f"{by[s]['objective']:.4g} ({by[s]['seconds']:.1f})" for s in solvers]
        base = by.get("sparsegpt", {}).get("objective")
        rat = [f"{by[s]['objective'] / base:.3f}" if base else "" for s in ratios]
        aa = (f"{by['alps']['objective'] / by['admm']['objective']:.3f}"
              if "alps" in by and "admm" in by else "")
        lines.append(f"| {row['pattern']} | {row['layer']} | " + " | ".join(cells + rat) + f" | {aa} |")
    lines += ["", "Per pattern, geometric mean of the ratio over the layers:", ""]
    for pattern in rec["patterns"]:
        rows = [r for r in rec["rows"] if r["pattern"] == pattern]
        if not rows:
            continue
        parts = [f"{s}/sparsegpt {_geomean(rows, s, 'sparsegpt'):.3f}" for s in ratios]
        if "alps" in solvers and "admm" in solvers:
            parts.append(f"alps/admm {_geomean(rows, 'alps', 'admm'):.3f}")
        secs = {s: sum(_row(r, s)["seconds"] for r in rows) for s in solvers}
        parts.append("total solve s: " + ", ".join(f"{s} {v:.1f}" for s, v in secs.items()))
        lines.append(f"- {pattern}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _geomean(rows: list, num: str, den: str) -> float:
    """Geometric mean over ``rows`` of ``num``'s objective over ``den``'s."""
    return math.exp(sum(math.log(_obj(r, num) / _obj(r, den)) for r in rows) / len(rows))


def _row(row: dict, solver: str) -> dict:
    return next(r for r in row["results"] if r["solver"] == solver)


def _obj(row: dict, solver: str) -> float:
    return _row(row, solver)["objective"]


def write(rec: dict, out: Path) -> None:
    """Both result files, each atomically (a run interrupted keeps the finished rows)."""
    from layerprune.problems.io import atomic_write

    atomic_write(out.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(rec, indent=1) + "\n"))
    if rec["rows"]:
        atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text(markdown(rec)))


def check_or_exit(solvers: str, out: Path, more=None):
    """Before any long work: ``more()`` (the script's own parsing and checks) raises nothing,
    every solver spec of ``solvers`` (comma-separated) builds, and the results files
    ``out``.json / .md can be written; else one ``error:`` line and exit 2. Returns what
    ``more()`` returned (None without it)."""
    from layerprune.problems.io import check_writable
    from layerprune.solvers import make_solver

    try:
        values = None if more is None else more()
        for spec in solvers.split(","):
            name, options = parse_solver(spec)
            make_solver(name, **options)
        for suffix in (".json", ".md"):
            check_writable(out.with_suffix(suffix))
    except Exception as exc:  # one clear line before any long work
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/alps", help="writes OUT.json and OUT.md")
    ap.add_argument("--block", type=int, default=14)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--solvers", default=DEFAULT_SOLVERS)
    ap.add_argument("--patterns", default=DEFAULT_PATTERNS)
    ap.add_argument("--layers", default="", help="comma-separated layer kinds (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    check_or_exit(args.solvers, out)
    torch.set_num_threads(args.threads)
    from layerprune import data, models
    from layerprune.pipeline import layer_problems

    rec = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": _git("rev-parse", "HEAD"),
           "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
           "uptime_before": _uptime(), "threads": args.threads, "block": args.block, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "solvers": args.solvers.split(","), "patterns": args.patterns.split(","),
           "rows": []}
    model, tokenizer = models.load_model("smollm2")
    ids = data.calibration_batch(tokenizer, data.load_text("austen-calib"), args.nsamples, args.seqlen, 0)
    problems = layer_problems(model, ids, block=args.block, objective="reconstruct")
    del model
    kinds = set(args.layers.split(",")) if args.layers else None
    for pattern in rec["patterns"]:
        for qualified, p in problems.items():
            layer = qualified.split(".")[-1]
            if kinds and layer not in kinds:
                continue
            p = p.replace(pattern=pattern)
            started = time.perf_counter()
            results = [solve_row(p, spec) for spec in rec["solvers"]]
            rec["rows"].append({"pattern": pattern, "layer": layer, "shape": list(p.shape), "results": results,
                                "wall_s": time.perf_counter() - started})
            rec["uptime_after"] = _uptime()
            write(rec, out)
            print(json.dumps(rec["rows"][-1]), flush=True)
    print(markdown(rec))


if __name__ == "__main__":
    main()
