"""``layerprune.studies.analysis`` on a hand-made results table whose answers are known."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from layerprune.studies import analysis


def _table() -> pd.DataFrame:
    """Two instances × one pattern × mask; bnb optimal on both, wanda 10% / 50% above,
    sparseswaps equal to the optimum on the first and 20% above on the second, scip errors on
    the second."""
    rows = []

    def row(instance, d_in, solver, status, objective, lower_bound=None):
        rows.append(dict(case=f"{instance}-{solver}", instance=instance, d_out=2, d_in=d_in,
                         pattern="per-row:0.5", objective_kind="mask", solver=solver, seed=0,
                         status=status, limit=None, objective=objective, lower_bound=lower_bound,
                         seconds=1.0, iterations=0, versions="{}"))

    row("a", 16, "bnb", "optimal", 2.0, 2.0)
    row("a", 16, "wanda", "feasible", 2.2)
    row("a", 16, "sparseswaps", "feasible", 2.0 * (1 + 1e-12))
    row("a", 16, "scip", "feasible", 2.0, 1.0)
    row("b", 32, "bnb", "optimal", 4.0, 4.0)
    row("b", 32, "wanda", "feasible", 6.0)
    row("b", 32, "sparseswaps", "feasible", 4.8)
    row("b", 32, "scip", "error", None)
    df = pd.DataFrame(rows)
    groups = df.groupby(analysis.PROBLEM)
    df["best_bound"] = groups["lower_bound"].transform("max")
    df["best_objective"] = groups["objective"].transform("min")
    df["gap"] = (df["objective"] - df["best_bound"]) / df["objective"]
    return df


def test_performance_ratios_and_profile():
    df = _table()
    ratios = analysis.performance_ratios(df)
    assert ratios.loc[("a", "per-row:0.5", "mask"), "sparseswaps"] == 1.0  # a round-off tie
    assert ratios.loc[("b", "per-row:0.5", "mask"), "wanda"] == pytest.approx(1.5)
    assert math.isinf(ratios.loc[("b", "per-row:0.5", "mask"), "scip"])  # ran, no objective
    profile = analysis.performance_profile(df)
    assert list(profile.index) == pytest.approx([1.0, 1.1, 1.2, 1.5])
    assert list(profile["bnb"]) == [1.0, 1.0, 1.0, 1.0]
    assert list(profile["wanda"]) == [0.0, 0.5, 0.5, 1.0]
    assert list(profile["sparseswaps"]) == [0.5, 0.5, 1.0, 1.0]
    assert list(profile["scip"]) == [0.5, 0.5, 0.5, 0.5]  # never reaches the error problem


def test_gap_table_recomputes_from_the_columns():
    df = _table()
    table = analysis.gap_table(df, by=("solver",)).set_index("solver")
    assert table.loc["wanda", "median_gap"] == pytest.approx((0.2 / 2.2 + 2.0 / 6.0) / 2)
    assert table.loc["wanda", "max_gap"] == pytest.approx(2.0 / 6.0)
    assert table.loc["bnb", "optimal"] == 1.0 and table.loc["bnb", "median_gap"] == 0.0
    assert table.loc["scip", "cases"] == 2 and table.loc["scip", "solved"] == 1
    assert table.loc["sparseswaps", "median_excess"] == pytest.approx(0.1)


def test_loss_matrix_and_plots(tmp_path):
    df = _table()
    matrix = analysis.loss_matrix(df)
    assert matrix.loc["wanda", ("per-row:0.5", 32)] == pytest.approx(0.5)
    assert matrix.loc["bnb"].max() == 0.0
    written = analysis.save_plots(df, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["gaps_mask.png", "loss_heatmap_mask.png", "performance_profile_mask.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)  # no temp left


def test_anytime_curves_of_a_certifying_and_a_heuristic_backend():
    import matplotlib

    matplotlib.use("Agg")
    from layerprune.problems import make_instance
    from layerprune.solvers import Params, make_solver

    p = make_instance(2, 16, pattern="per-row:0.5", objective="mask", seed=3)
    fw = make_solver("sparsefw", check_every=2).solve(p, params=Params(max_iter=40))
    wanda = make_solver("wanda").solve(p)
    curves = {"sparsefw": analysis.anytime(fw), "wanda": analysis.anytime(wanda)}
    assert len(curves["wanda"]) == 1 and math.isnan(curves["wanda"]["lower_bound"].iloc[0])
    fw_curve = curves["sparsefw"]
    assert len(fw_curve) == len(fw.history) + 1 >= 2 and fw_curve["seconds"].is_monotonic_increasing
    assert fw_curve["objective"].iloc[-1] == pytest.approx(fw.objective, rel=1e-9)
    assert (fw_curve["lower_bound"] <= fw.objective * (1 + 1e-9)).all()
    ax = analysis.plot_anytime(curves, best_bound=fw.lower_bound)
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["sparsefw objective", "sparsefw bound", "wanda objective", "best bound"]
