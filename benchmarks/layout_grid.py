"""A fixed, deterministic grid that shows a refactor changed no behaviour.

Every installed backend on small seeded instances (every pattern kind it takes, both
objectives), with iteration and node caps and no time limits, one thread; every ``--help``
text; and the per-layer results of pruning a tiny random LLaMA with several backends. Each
solve is recorded as its mask's hash, objective, bound, status, limit and iteration count.

Record before moving code, check after::

    python benchmarks/layout_grid.py --out benchmarks/results/layout_grid.json
    python benchmarks/layout_grid.py --check benchmarks/results/layout_grid.json

``--check`` prints every entry that differs and exits 1 if any does.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("COLUMNS", "100")  # argparse wraps help to the terminal width

import torch

#: (d_out, d_in, seed) of the solver instances
INSTANCES = ((3, 12, 0), (2, 16, 1))
PATTERNS = ("per-row:0.5", "nm:2:4", "unstructured:0.5", "columns:0.25")
OBJECTIVES = ("mask", "reconstruct")
#: options that make each backend's run end on a count, not a clock
CAPS = {"bnb": {"max_nodes": 3000}}
MAX_ITER = 40


def _mask_hash(mask) -> str | None:
    if mask is None:
        return None
    return hashlib.sha256(mask.cpu().numpy().astype("uint8").tobytes()).hexdigest()[:16]


def _num(x):
    return None if x is None else float(f"{float(x):.12g}")


def solver_grid() -> dict:
    from layerprune.problems import make_instance
    from layerprune.solvers import Params, SolverError, get_solver_class, solver_names

    out = {}
    for name in solver_names():
        cls = get_solver_class(name)
        if not cls.is_installed():
            continue
        for d_out, d_in, seed in INSTANCES:
            for pattern in PATTERNS:
                for objective in OBJECTIVES:
                    problem = make_instance(d_out, d_in, pattern=pattern, objective=objective, seed=seed)
                    solver = cls(**CAPS.get(name, {}))
                    if solver.why_not(problem):
                        continue
                    key = f"{name}|{d_out}x{d_in}s{seed}|{pattern}|{objective}"
                    try:
                        res = solver.solve(problem, params=Params(seed=0, max_iter=MAX_ITER, threads=1))
                    except SolverError as exc:
                        out[key] = {"error": str(exc)}
                        continue
                    out[key] = {"mask": _mask_hash(res.mask), "objective": _num(res.objective),
                                "lower_bound": _num(res.lower_bound), "status": res.status.value,
                                "limit": res.limit, "iterations": res.iterations}
    return out


def help_texts() -> dict:
    from layerprune.cli import main

    out = {}
    for argv in (["--help"], ["solve", "--help"], ["prune", "--help"], ["eval", "--help"], ["solvers"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            code = main(argv)
        out[" ".join(argv)] = {"code": code, "text": buf.getvalue()}
    return out


def tiny_prune() -> dict:
    import transformers

    from layerprune.pipeline import prune_model
    from layerprune.solvers import Params

    runs = {"wanda|mask|per-row:0.5": dict(solver="wanda"),
            "sparseswaps|mask|nm:2:4": dict(solver="sparseswaps", pattern="nm:2:4"),
            "sparsegpt|reconstruct|per-row:0.5": dict(solver="sparsegpt", objective="reconstruct"),
            "admm|reconstruct|unstructured:0.6": dict(solver="admm", objective="reconstruct",
                                                      pattern="unstructured:0.6"),
            "sparsefw|mask|per-row:0.5|sequential": dict(solver="sparsefw", sequential_order=True,
                                                         overrides={"down_proj": "ria"})}
    out = {}
    for key, kw in runs.items():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=128)
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
        records = prune_model(model, ids, params=Params(seed=0, max_iter=MAX_ITER), progress=False,
                              device="cpu", **kw)
        out[key] = [{"name": r.name, "solver": r.solver, "objective": _num(r.objective),
                     "wanda": _num(r.wanda_objective), "bound": _num(r.lower_bound), "status": r.status,
                     "limit": r.limit, "mask": hashlib.sha256(r.packed_mask[1].tobytes()).hexdigest()[:16]}
                    for r in records]
    return out


def collect() -> dict:
    torch.set_num_threads(1)
    t = time.perf_counter()
    grid = {"solvers": solver_grid(), "help": help_texts(), "tiny_prune": tiny_prune()}
    print(f"grid collected in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return grid


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Every key whose value differs between two grids (recursively)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            where = f"{prefix}/{k}" if prefix else k
            if k not in old:
                out.append(f"{where}: new")
            elif k not in new:
                out.append(f"{where}: missing")
            else:
                out.extend(differences(old[k], new[k], where))
        return out
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the grid (JSON)")
    group.add_argument("--check", help="compare with a recorded grid; exit 1 on any difference")
    args = ap.parse_args(argv)
    grid = collect()
    if args.out:
        Path(args.out).write_text(json.dumps(grid, indent=1, sort_keys=True) + "\n")
        print(f"{len(grid['solvers'])} solves, {len(grid['help'])} help texts, "
              f"{len(grid['tiny_prune'])} tiny prunes → {args.out}")
        return 0
    diff = differences(json.loads(Path(args.check).read_text()), json.loads(json.dumps(grid)))
    for line in diff:
        print(line)
    print(f"{len(diff)} difference(s) against {args.check}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
