"""The results table ``DIR/results.parquet``: its columns, the group columns, atomic writes.

The table is rewritten whole and atomically (temporary file, rename) after every finished
case: a study of a few thousand rows costs milliseconds a write, and an interrupted run
leaves a complete table of every case finished before it, with nothing else to merge.

Group columns, over the rows of one ``(instance, pattern, objective_kind)``:

- ``best_bound`` = max ``lower_bound`` (null if no row has one),
- ``best_objective`` = min ``objective``,
- ``gap`` = ``max(0, objective − best_bound) / objective`` (null without an objective or a
  bound; 0 when both are 0), as :attr:`Result.gap` but against the best bound of any solver.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from layerprune.problems import atomic_write
from layerprune.solvers.base import relative_gap

__all__ = ["SCHEMA", "GROUP", "RESULTS", "read_table", "read_rows", "write_rows", "with_group_columns",
           "relative_gap"]

SCHEMA = pa.schema([
    ("case", pa.string()), ("instance", pa.string()), ("d_out", pa.int64()), ("d_in", pa.int64()),
    ("pattern", pa.string()), ("objective_kind", pa.string()), ("solver", pa.string()),
    ("seed", pa.int64()), ("status", pa.string()), ("limit", pa.string()),
    ("objective", pa.float64()), ("lower_bound", pa.float64()), ("best_bound", pa.float64()),
    ("best_objective", pa.float64()), ("gap", pa.float64()), ("seconds", pa.float64()),
    ("iterations", pa.int64()), ("versions", pa.string()),
    # beyond CONTRACT
    ("time_limit", pa.float64()), ("bound_source", pa.string()), ("objective_is_upper_bound", pa.bool_()),
    ("message", pa.string()), ("wall_seconds", pa.float64()), ("finished_at", pa.string()),
    ("host", pa.string()), ("run", pa.string()),
])

GROUP = ("instance", "pattern", "objective_kind")
#: the table's file name in a study's directory
RESULTS = "results.parquet"


def with_group_columns(rows: list[dict]) -> list[dict]:
    """``rows`` with ``best_bound``, ``best_objective`` and ``gap`` recomputed over their groups."""
    best: dict[tuple, list] = {}
    for r in rows:
        b = best.setdefault(tuple(r.get(k) for k in GROUP), [None, None])
        if r.get("lower_bound") is not None:
            b[0] = r["lower_bound"] if b[0] is None else max(b[0], r["lower_bound"])
        if r.get("objective") is not None:
            b[1] = r["objective"] if b[1] is None else min(b[1], r["objective"])
    out = []
    for r in rows:
        bound, objective = best[tuple(r.get(k) for k in GROUP)]
        out.append({**r, "best_bound": bound, "best_objective": objective,
                    "gap": relative_gap(r.get("objective"), bound)})
    return out


def read_table(path: Path) -> pa.Table:
    """A results table, read through one open file (safe while a run renames a new one over it)."""
    return pq.ParquetFile(path).read()


def read_rows(path: Path) -> list[dict]:
    """The rows of a results table (an empty list if there is none)."""
    if not path.exists():
        return []
    return read_table(path).to_pylist()


def write_rows(path: Path, rows: list[dict]) -> pa.Table:
    """Write ``rows`` (group columns recomputed, sorted by case id) atomically; return the table.

    Columns of :data:`SCHEMA` a row lacks are null; keys outside it are dropped.
    """
    rows = sorted(with_group_columns(rows), key=lambda r: r["case"])
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return table
