"""Issue 17's study target, measured: a study of real SmolLM2 sub-instances run, then run again.

``python benchmarks/study_real_cuts.py [--spec benchmarks/studies/real_cuts.toml] [--dir DIR]
[--workers 2] [--out benchmarks/results/study_real_cuts.json]`` runs ``layerprune study SPEC
--out DIR --workers N --plots`` into a new directory (timed end to end: cluster start, the cut
from the model, every case), then the same command again (it must run no case and leave the
table as it was), and writes the figures as JSON and a Markdown table beside it: cases by
solver and status, wall time against the 30-minute target, machine load and commit, and the
median gap to the best bound by solver, size and objective.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from layerprune.problems.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 30 * 60


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _run(spec: Path, out_dir: Path, workers: int) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "layerprune", "study", str(spec), "--out", str(out_dir),
                           "--workers", str(workers), "--plots"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"layerprune study failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, proc.stderr


def measure(spec: Path, out_dir: Path, workers: int) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown (not a git checkout)"
    load_before = _load()
    first_s, first_log = _run(spec, out_dir, workers)
    load_after = _load()
    table = pd.read_parquet(out_dir / "results.parquet")
    again_s, again_log = _run(spec, out_dir, workers)
    again = pd.read_parquet(out_dir / "results.parquet")
    ok = table[table.status.isin(["optimal", "feasible"])]
    gaps = (ok.groupby(["objective_kind", "solver", "d_in"])["gap"].median().unstack("d_in"))
    return {
        "spec": str(spec.relative_to(ROOT)) if spec.is_relative_to(ROOT) else str(spec),
        "commit": commit, "workers": workers, "load_before": load_before, "load_after": load_after,
        "cases": int(len(table)), "seconds": round(first_s, 1), "target_seconds": TARGET_S,
        "skipped": [line for line in first_log.splitlines() if line.startswith("skipped")],
        "statuses": {f"{s} {st}": int(n) for (s, st), n in table.groupby(["solver", "status"]).size().items()},
        "rerun_seconds": round(again_s, 1),
        "rerun_ran_nothing": "0 to run" in again_log,
        "rerun_table_identical": bool(again.equals(table)),
        "median_gap": {kind: {solver: {str(d): (None if pd.isna(v) else float(v)) for d, v in row.items()}
                              for solver, row in part.droplevel(0).iterrows()}
                       for kind, part in gaps.groupby(level=0)},
        "exact_seconds": {f"bnb d_in {d}": float(v) for d, v in
                          table[table.solver == "bnb"].groupby("d_in")["seconds"].median().items()},
    }


def markdown(res: dict, command: str) -> str:
    lines = ["# A study of real SmolLM2 sub-instances (issue 17 target)", "",
             f"Command: `{command}` (commit {res['commit']}, {res['workers']} workers; load (1/5/15 min) "
             f"{res['load_before']} before, {res['load_after']} after).", "",
             f"- cases: **{res['cases']}** in **{res['seconds']:.0f} s** (target ≤ {res['target_seconds']} s: "
             f"{'met' if res['seconds'] <= res['target_seconds'] else 'NOT met'}), model cut and cluster start included",
             f"- re-run: {res['rerun_seconds']:.0f} s, ran no case: {res['rerun_ran_nothing']}, "
             f"table identical: {res['rerun_table_identical']}",
             *[f"- {line}" for line in res["skipped"]],
             f"- bnb median seconds by size: " + ", ".join(f"{k.split()[-1]} inputs {v:.1f} s"
                                                          for k, v in res["exact_seconds"].items()), "",
             "Cases by solver and status:", "",
             "| solver | status | cases |", "|---|---|---:|"]
    lines += [f"| {k.split()[0]} | {k.split()[1]} | {v} |" for k, v in res["statuses"].items()]
    for kind, by_solver in res["median_gap"].items():
        sizes = sorted({d for row in by_solver.values() for d in row}, key=int)
        lines += ["", f"Median gap to the best bound, `{kind}` (both patterns; %):", "",
                  "| solver | " + " | ".join(f"{d} inputs" for d in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for solver, row in by_solver.items():
            lines.append(f"| {solver} | " + " | ".join("–" if row.get(d) is None else f"{100 * row[d]:.2f}"
                                                      for d in sizes) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "benchmarks" / "studies" / "real_cuts.toml")
    ap.add_argument("--dir", type=Path, default=None, help="the study's directory (default: a new temporary one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_real_cuts.json")
    args = ap.parse_args()
    out_dir = args.dir or Path(tempfile.mkdtemp(prefix="study-real-cuts-")) / "study"
    res = measure(args.spec.resolve(), out_dir, args.workers)
    res["dir"] = str(out_dir)
    command = "python benchmarks/study_real_cuts.py " + " ".join(sys.argv[1:])
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2) + "\n"))
    md = args.out.with_suffix(".md")
    atomic_write(md, lambda tmp: Path(tmp).write_text(markdown(res, command.strip())))
    print(markdown(res, command.strip()))


if __name__ == "__main__":
    main()
