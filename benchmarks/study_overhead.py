"""The study runner's own cost: a synthetic study of cheap cases, timed end to end.

``python benchmarks/study_overhead.py [--workers 2] [--instances 5]`` writes
``instances × 2 patterns × 2 objectives × 3 solvers`` cases (wanda, magnitude, sparsegpt on
LLM-like 16 × 32 layers) into a temporary directory and prints, as JSON:

- ``cluster_start_s``: starting a local cluster of ``--workers`` processes, alone;
- ``local_s``: ``run_study(..., workers=N)`` end to end (cluster start included);
- ``running_s``: the same study into a new directory on an already running cluster;
- ``case_wall_s``: the cases' own wall time on the workers (load, solve, refit), summed;
- ``driver_per_case_ms``: ``(running_s − case_wall_s / workers) / cases``;
- ``rewrite_ms``: one atomic rewrite of the finished table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from layerprune.problems import make_arrays, save_instance
from layerprune.studies import run_study
from layerprune.studies.preload import Preload
from layerprune.studies.table import read_rows, write_rows

SPEC = """[instances]
files = ["inst/*.npz"]
[grid]
patterns = ["per-row:0.5", "nm:2:4"]
objectives = ["mask", "reconstruct"]
solvers = ["wanda", "magnitude", "sparsegpt"]
time_limit = 60
"""


def measure(root: Path, workers: int, instances: int) -> dict:
    from dask.distributed import Client, LocalCluster

    for i in range(instances):
        save_instance(root / "inst" / f"b{i}.npz", *make_arrays(16, 32, seed=i))
    spec = root / "spec.toml"
    spec.write_text(SPEC)
    started = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        out = {"cluster_start_s": time.perf_counter() - started}
        client.register_plugin(Preload())
        started = time.perf_counter()
        table = run_study(spec, root / "running", scheduler=cluster.scheduler_address, progress=False)
        out["running_s"] = time.perf_counter() - started
    started = time.perf_counter()
    run_study(spec, root / "local", workers=workers, progress=False)
    out["local_s"] = time.perf_counter() - started
    out["cases"] = len(table)
    out["case_wall_s"] = float(table["wall_seconds"].sum())
    out["driver_per_case_ms"] = 1000 * (out["running_s"] - out["case_wall_s"] / workers) / len(table)
    rows = read_rows(root / "running" / "results.parquet")
    started = time.perf_counter()
    for _ in range(20):
        write_rows(root / "running" / "results.parquet", rows)
    out["rewrite_ms"] = 1000 * (time.perf_counter() - started) / 20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--instances", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.workers, args.instances)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
