"""Exact reach: how large a row the certified backends close, and how fast (issue 2, item 9).

For each solver × objective × pattern × d_in, ``--rows`` rows are solved *one row at a time*
with ``--time-limit`` seconds each: synthetic LLM-like rows (``make_instance(rows, d_in, ...)``,
one shared Gram matrix), or with ``--source smollm2`` real rows of a SmolLM2 layer cut to their
d_in inputs of largest Wanda score (a principal block of the real Gram matrix). Reported per cell: rows proved optimal, median / max
seconds, median gap, and checks: ``disagree`` (a row certified optimal whose objective differs
from brute force, d_in ≤ 16) and ``bound>best`` (a lower bound above the best objective any
solver — or brute force — found for that row).

Usage::

    python benchmarks/exact_reach.py --sizes 16 32 64 --solvers scip --time-limit 60
    python benchmarks/exact_reach.py --sizes 48 96 --merge   # add cells to the existing results
    python benchmarks/exact_reach.py --source smollm2 --layer q_proj --merge   # real rows, cut to d_in inputs
    python benchmarks/exact_reach.py --solvers scip --option diag=none   # a formulation variant
    python benchmarks/exact_reach.py --solvers scip --option epigraph=joint --option heuristics=default

Writes ``--out`` (JSON, atomically) and the markdown table next to it (``.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from layerprune.problems import LayerProblem, atomic_write, make_instance
from layerprune.prune_cli import parse_solver_options
from layerprune.solvers import Params, SolverError, get_solver_class, make_solver, solver_names

BRUTE_MAX_D = 16


def _row_problem(p: LayerProblem, r: int) -> LayerProblem:
    return LayerProblem.create(p.W[r:r + 1], p.G, pattern=str(p.pattern), objective=p.objective_kind)


def _usable(name: str):
    """None if the solver can run here, else why not."""
    if name not in solver_names():
        return "not registered in this installation"
    try:
        cls = get_solver_class(name)
    except (SolverError, ImportError) as exc:
        return f"cannot import: {exc}"
    missing = cls.missing_packages()
    return f"missing {', '.join(missing)}" if missing else None


def _previous(args) -> tuple[list, list]:
    """With ``--merge``: the records of ``--out`` for cells this run does not redo, and the
    invocations behind them (oldest first)."""
    out = Path(args.out)
    if not args.merge or not out.exists():
        return [], []
    try:
        old = json.loads(out.read_text())
        records, old_args = old["records"], old["args"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"exact_reach: error: cannot merge into {out}: {exc}") from None
    redo = {(_source(args), s, o, p, d) for s in args.solvers for o in args.objectives for p in args.patterns
            for d in args.sizes}
    return [x for x in records if _cell(x) not in redo], old_args.get("merged", [old_args])


def _real_layer(args) -> LayerProblem:
    """``--source smollm2``: the layer ``--layer`` of block ``--block`` of the bundled SmolLM2,
    calibrated as ``layerprune prune`` does by default (Austen, 64 × 256 tokens)."""
    from layerprune import data, models
    from layerprune.pipeline import layer_problems

    model, tokenizer = models.load_model("smollm2")
    ids = data.calibration_batch(tokenizer, data.load_text("austen-calib"), 64, 256, args.seed)
    problems = layer_problems(model, ids, block=args.block)
    hits = [n for n in problems if n.endswith(args.layer)]
    if len(hits) != 1:
        raise SystemExit(f"exact_reach: error: --layer {args.layer!r} matches {hits or 'no layer'} of block {args.block}")
    return problems[hits[0]]


def _real_row(layer: LayerProblem, r: int, d: int, pattern: str, objective: str) -> LayerProblem:
    """Row ``r`` of a real layer cut to its ``d`` inputs of largest Wanda score ``|w_j|·‖x_j‖``:
    a principal block of the real Gram matrix, so a genuine (smaller) instance."""
    if d > layer.d_in:
        raise SystemExit(f"exact_reach: error: size {d} exceeds the layer's {layer.d_in} inputs")
    w, G = layer.W[r].to(torch.float64), layer.G.to(torch.float64)
    idx = torch.sort(torch.topk(w.abs() * torch.diagonal(G).clamp_min(0).sqrt(), d).indices).values
    return LayerProblem.create(w[idx][None, :], G[idx][:, idx], pattern=pattern, objective=objective)


def run(args) -> dict:
    options = parse_solver_options(args.option)
    real = _real_layer(args) if args.source == "smollm2" else None
    records, history = _previous(args)
    solvers = []
    for name in args.solvers:
        why = _usable(name)
        if why:
            print(f"skipping solver {name!r}: {why}", file=sys.stderr)
        else:
            solvers.append(name)
    for objective in args.objectives:
        for pattern in args.patterns:
            for d in args.sizes:
                p = None if real else make_instance(args.rows, d, pattern=pattern, objective=objective,
                                                    seed=args.seed + d)
                for r in range(args.rows):
                    rp = _real_row(real, r, d, pattern, objective) if real else _row_problem(p, r)
                    brute = None
                    if d <= BRUTE_MAX_D and _usable("brute") is None:
                        b = make_solver("brute")
                        if b.why_not(rp) is None:
                            brute = b.solve(rp).objective
                    for name in solvers:
                        s = make_solver(name, **(options if name == args.options_for else {}))
                        if s.why_not(rp):
                            print(f"skipping {name} on {rp.describe()}: {s.why_not(rp)}", file=sys.stderr)
                            continue
                        t = time.perf_counter()
                        res = s.solve(rp, params=Params(time_limit=args.time_limit, seed=args.seed))
                        sec = time.perf_counter() - t
                        rec = dict(source=_source(args), solver=name, objective=objective, pattern=pattern, d_in=d, row=r,
                                   status=res.status.value, limit=res.limit, value=res.objective,
                                   lower_bound=res.lower_bound, gap=res.gap, seconds=sec, brute=brute,
                                   load=round(os.getloadavg()[0], 2),
                                   options=options if name == args.options_for else {})
                        records.append(rec)
                        print(f"{name:8s} {objective:11s} {pattern:12s} d={d:4d} row={r} {rec['status']:9s} "
                              f"{sec:7.2f}s gap={rec['gap'] if rec['gap'] is None else round(rec['gap'], 6)}",
                              flush=True)
                    _checks(records, _source(args), objective, pattern, d, r)
                _write(args, records, history)  # partial results survive an interrupted run
    return {"args": vars(args), "records": records, "history": history}


def _source(args) -> str:
    return "synthetic" if args.source == "synthetic" else f"{args.source} block {args.block} {args.layer}"


def _cell(x: dict) -> tuple:
    """The table cell of a record (records written before sources existed are synthetic)."""
    return x.get("source", "synthetic"), x["solver"], x["objective"], x["pattern"], x["d_in"]


def _checks(records, source, objective, pattern, d, r):
    """Mark disagreements with brute force and bounds above the best known objective."""
    same = [x for x in records if (x.get("source", "synthetic"), x["objective"], x["pattern"], x["d_in"], x["row"])
            == (source, objective, pattern, d, r)]
    vals = [x["value"] for x in same if x["value"] is not None] + [x["brute"] for x in same if x["brute"] is not None]
    best = min(vals) if vals else math.inf
    for x in same:
        tol = 1e-6 * max(abs(best), 1e-12)
        x["disagree"] = bool(x["brute"] is not None and x["status"] == "optimal"
                             and abs(x["value"] - x["brute"]) > 1e-6 * max(abs(x["brute"]), 1e-12))
        x["bound_violation"] = bool(x["lower_bound"] is not None and x["lower_bound"] > best + tol)


def table(records) -> str:
    keys = sorted({_cell(x) for x in records}, key=lambda k: (k[0] != "synthetic", k))
    lines = ["| rows | solver | objective | pattern | d_in | proved optimal | median s | max s | median gap | disagree (brute) | bound>best |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        xs = [x for x in records if _cell(x) == k]
        secs = [x["seconds"] for x in xs]
        gaps = [x["gap"] for x in xs if x["gap"] is not None]
        opt = sum(x["status"] == "optimal" for x in xs)
        has_brute = any(x["brute"] is not None for x in xs)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {opt}/{len(xs)} | {statistics.median(secs):.2f} | "
                     f"{max(secs):.2f} | {statistics.median(gaps) if gaps else float('nan'):.2%} | "
                     f"{sum(x.get('disagree', False) for x in xs) if has_brute else '–'} | "
                     f"{sum(x.get('bound_violation', False) for x in xs)} |")
    return "\n".join(lines) + "\n"


def _write(args, records, history=()):
    out = Path(args.out)
    payload = {"args": {k: v for k, v in vars(args).items()}, "records": records}
    if args.merge:  # the invocations behind the merged records, oldest first
        payload["args"] = {"merged": list(history) + [payload["args"]]}

    def write_json(tmp):
        Path(tmp).write_text(json.dumps(payload, indent=1))

    atomic_write(out, write_json)
    md = table(records) if records else ""
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128])
    ap.add_argument("--objectives", nargs="+", default=["mask", "reconstruct"])
    ap.add_argument("--patterns", nargs="+", default=["per-row:0.5", "nm:2:4"])
    ap.add_argument("--solvers", nargs="+", default=["scip", "ortools"])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", action="append", help="solver option KEY=VALUE (for --options-for)")
    ap.add_argument("--options-for", default="scip", help="solver the --option values go to")
    ap.add_argument("--source", choices=["synthetic", "smollm2"], default="synthetic",
                    help="synthetic LLM-like rows (make_instance), or real SmolLM2 rows cut to their d_in "
                         "inputs of largest Wanda score")
    ap.add_argument("--block", type=int, default=3, help="--source smollm2: decoder block")
    ap.add_argument("--layer", default="q_proj", help="--source smollm2: linear in the block (name suffix)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the records of --out for cells (solver, objective, pattern, d_in) not in this run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "exact_reach.json"))
    args = ap.parse_args(argv)
    result = run(args)
    _write(args, result["records"], result["history"])
    print()
    print(table(result["records"]) if result["records"] else "no results")


if __name__ == "__main__":
    main()
