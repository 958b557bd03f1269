"""Cut a library of real sub-instances (layerprune.library) and time it; then an exact solver's
reach on every instance (issue 17, item 1).

The cut goes into ``--out`` (timed; a second call on a filled directory loads nothing); each
instance is then solved whole (all its rows) by ``--solver`` under ``--pattern`` /
``--objective`` with ``--time-limit`` seconds. One markdown table on stdout.

Usage::

    python benchmarks/cut_reach.py --out /tmp/cutlib --blocks 3 14 --layers q_proj down_proj \\
        --sizes 16 32 64 --rows 2 --channels wanda --time-limit 30
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerprune.library import CutSpec, cut_model_instances
from layerprune.problems import load_instance, read_provenance
from layerprune.solvers import Params, make_solver


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 14])
    ap.add_argument("--layers", nargs="+", default=["q_proj", "down_proj"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--channels", default="wanda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", default="bnb")
    ap.add_argument("--pattern", default="per-row:0.5")
    ap.add_argument("--objective", default="mask")
    ap.add_argument("--time-limit", type=float, default=30.0)
    args = ap.parse_args(argv)
    spec = CutSpec(blocks=tuple(args.blocks), layers=tuple(args.layers), sizes=tuple(args.sizes), rows=args.rows,
                   channels=args.channels, seed=args.seed)
    start = time.perf_counter()
    paths = cut_model_instances(spec, args.out)
    print(f"cut: {len(paths)} instances in {time.perf_counter() - start:.1f} s "
          f"(nsamples {spec.nsamples} × seqlen {spec.seqlen})\n")
    print(f"| instance | rows × d_in | {args.solver} status | limit | seconds | objective | lower bound | gap |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        prov = read_provenance(path)
        problem = load_instance(path, pattern=args.pattern, objective=args.objective)
        res = make_solver(args.solver).solve(problem, params=Params(time_limit=args.time_limit, seed=args.seed))
        gap = "—" if res.lower_bound is None or not res.objective else \
            f"{(res.objective - res.lower_bound) / res.objective:.1%}"
        lb = "—" if res.lower_bound is None else f"{res.lower_bound:.4g}"
        print(f"| b{prov.block} {prov.layer} | {len(prov.rows)} × {len(prov.channels)} | {getattr(res.status, 'value', res.status)} | {res.limit or '—'} | "
              f"{res.seconds:.1f} | {res.objective:.4g} | {lb} | {gap} |", flush=True)


if __name__ == "__main__":
    main()
