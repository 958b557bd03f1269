"""A finished study's figures and gap table, written into its directory (``layerprune study --plots``)."""
from __future__ import annotations

import sys
from pathlib import Path

from layerprune.problems.io import atomic_write

from . import analysis
from .table import RESULTS, read_table

__all__ = ["plot_study", "PLOTS_DIR", "GAP_TABLE"]

PLOTS_DIR = "plots"
GAP_TABLE = "gap_table.csv"


def plot_study(out_dir) -> list[Path]:
    """Draw ``DIR/plots/*.png`` (:func:`analysis.save_plots`: performance profile and loss heat
    map per objective, gap by size) and write ``DIR/gap_table.csv`` (:func:`analysis.gap_table`)
    from ``DIR/results.parquet``; returns the files written (none without a table)."""
    out = Path(out_dir)
    path = out / RESULTS
    if not path.exists():
        return []
    df = read_table(path).to_pandas()
    if df.empty:
        return []
    written = analysis.save_plots(df, out / PLOTS_DIR)
    table = out / GAP_TABLE
    atomic_write(table, lambda tmp: analysis.gap_table(df).to_csv(tmp, index=False))
    written.append(table)
    for p in written:
        print(f"wrote {p}", file=sys.stderr)
    return written
