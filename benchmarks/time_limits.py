"""Do time limits hold? Every time-limited backend on whole real rows (or whole layers), timed.

A time limit holds when the solve returns within ``1.1·limit + 2`` seconds (the stated slack:
set-up work that cannot be interrupted must be predicted and skipped, or bounded). Each record
has the backend's status, gap, its own ``Result.seconds`` and the wall time around
``Solver.solve``, the load average before and after, the command and the commit.

Instances: ``--source smollm2`` (default) takes layer ``--layer`` of block ``--block`` of the
bundled SmolLM2, calibrated as ``layerprune prune`` does (Austen, 64 × 256 tokens, seed 0), and
solves the rows ``--rows`` whole (all ``d_in`` inputs), or the whole layer with ``--whole-layer``;
``--instance FILE.npz`` reads an instance file instead (``layerprune.problems.save_instance``)::

    OMP_NUM_THREADS=1 python benchmarks/time_limits.py --solvers bnb --time-limit 60
    OMP_NUM_THREADS=1 python benchmarks/time_limits.py --time-limit 30 --merge   # the others, same file

Results go to ``benchmarks/results/time_limits.{json,md}``; ``--merge`` keeps the records of
other (solver, objective, instance, limit) cells already there.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

#: the backends that take a time limit (iterative or certified)
TIME_LIMITED = ("bnb", "scip", "ortools", "relax-qp", "relax-sdp", "relax-perspective", "sparsefw", "sparseswaps",
                "admm")


def allowed(limit: float) -> float:
    """The stated slack: a solve with limit ``limit`` must return within this many seconds."""
    return 1.1 * limit + 2.0


def _commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _instances(args) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, W, G) of every instance to solve."""
    from layerprune.problems import load_instance

    if args.instance:
        p = load_instance(args.instance)
        return [(Path(args.instance).name, p.W, p.G)]
    from layerprune import data, models
    from layerprune.pipeline import layer_problems

    model, tokenizer = models.load_model("smollm2")
    ids = data.calibration_batch(tokenizer, data.load_text("austen-calib"), 64, 256, 0)
    problems = layer_problems(model, ids, block=args.block)
    hits = [n for n in problems if n.endswith(args.layer)]
    if len(hits) != 1:
        raise SystemExit(f"time_limits: error: --layer {args.layer!r} matches {hits or 'no layer'} of block {args.block}")
    layer = problems[hits[0]]
    name = f"smollm2 block {args.block} {args.layer}"
    if args.whole_layer:
        return [(f"{name} (whole layer {layer.d_out}×{layer.d_in})", layer.W, layer.G)]
    return [(f"{name} row {r} (1×{layer.d_in})", layer.W[r:r + 1], layer.G) for r in args.rows]


def run(args) -> list[dict]:
    from layerprune.problems import LayerProblem
    from layerprune.solvers import Params, make_solver

    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS={} python {}".format(os.environ.get("OMP_NUM_THREADS", "?"),
                                                    " ".join(shlex.quote(a) for a in sys.argv))
    commit = _commit()
    records = []
    for label, W, G in _instances(args):
        for objective in args.objectives:
            problem = LayerProblem.create(W, G, pattern=args.pattern, objective=objective)
            for name in args.solvers:
                solver = make_solver(name)
                why = solver.why_not(problem)
                rec = dict(instance=label, pattern=args.pattern, objective=objective, solver=name,
                           time_limit=args.time_limit, allowed=allowed(args.time_limit), commit=commit,
                           command=command)
                if why:
                    rec.update(skipped=why)
                    print(f"{name:18s} {objective:11s} skipped: {why}", flush=True)
                    records.append(rec)
                    continue
                load_before = os.getloadavg()[0]
                t = time.perf_counter()
                res = solver.solve(problem, params=Params(time_limit=args.time_limit, seed=0))
                wall = time.perf_counter() - t
                rec.update(status=res.status.value, limit=res.limit, objective_value=res.objective,
                           lower_bound=res.lower_bound, gap=res.gap, seconds=res.seconds, wall=wall,
                           held=wall <= allowed(args.time_limit), load_before=round(load_before, 2),
                           load_after=round(os.getloadavg()[0], 2))
                records.append(rec)
                gap = "-" if res.gap is None else f"{100 * res.gap:.3g}%"
                print(f"{name:18s} {objective:11s} {res.status.value:9s} {wall:7.1f} s (limit {args.time_limit:g}, "
                      f"allowed {allowed(args.time_limit):.1f}) gap {gap} load {load_before:.1f}", flush=True)
    return records


def _key(r: dict) -> tuple:
    return (r["instance"], r["pattern"], r["objective"], r["solver"], r["time_limit"])


def table(records: list[dict]) -> str:
    lines = ["| instance | objective | solver | limit s | allowed s | wall s | solver s | held | status | gap | "
             "load before/after | commit |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in sorted(records, key=lambda r: (r["instance"], r["objective"], r["solver"], r["time_limit"])):
        if "skipped" in r:
            lines.append(f"| {r['instance']} | {r['objective']} | {r['solver']} | {r['time_limit']:g} | – | – | – | – | "
                         f"skipped: {r['skipped']} | – | – | {r['commit']} |")
            continue
        gap = "–" if r["gap"] is None else f"{100 * r['gap']:.3g}%"
        lines.append(f"| {r['instance']} | {r['objective']} | {r['solver']} | {r['time_limit']:g} | {r['allowed']:.1f} | "
                     f"{r['wall']:.1f} | {r['seconds']:.1f} | {'yes' if r['held'] else '**no**'} | {r['status']} | "
                     f"{gap} | {r['load_before']} / {r['load_after']} | {r['commit']} |")
    commands = sorted({r["command"] for r in records})
    return "\n".join(lines) + "\n\nCommands:\n\n" + "\n".join(f"    {c}" for c in commands) + "\n"


def write(out: Path, records: list[dict]) -> None:
    from layerprune.problems.io import atomic_write

    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps({"records": records}, indent=1)))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table(records)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", nargs="+", default=list(TIME_LIMITED))
    ap.add_argument("--objectives", nargs="+", default=["mask", "reconstruct"])
    ap.add_argument("--pattern", default="per-row:0.5")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--block", type=int, default=14)
    ap.add_argument("--layer", default="q_proj")
    ap.add_argument("--rows", type=int, nargs="+", default=[0])
    ap.add_argument("--whole-layer", action="store_true", help="the whole layer instead of single rows")
    ap.add_argument("--instance", help="an instance file (.npz) instead of the model's layer")
    ap.add_argument("--merge", action="store_true", help="keep the other cells of --out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "time_limits.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    old = json.loads(out.read_text())["records"] if args.merge and out.is_file() else []
    new = run(args)
    keys = {_key(r) for r in new}
    records = [r for r in old if _key(r) not in keys] + new
    write(out, records)
    print()
    print(table(records))
    late = [r for r in new if r.get("held") is False]
    return 1 if late else 0


if __name__ == "__main__":
    sys.exit(main())
