r"""What a study's results table says: gap tables, performance profiles, where heuristics lose.

Everything here reads the CONTRACT.md results columns only (``instance``, ``d_in``,
``pattern``, ``objective_kind``, ``solver``, ``status``, ``objective``, ``lower_bound``,
``best_bound``, ``best_objective``, ``gap``, ``seconds``), so it serves any table with them.

A *problem* is one (instance, pattern, objective kind): the solvers of a study compete on it.
For a solver's row on problem ``p``:

- gap to the best bound, ``(f − L*_p) / f`` (the table's ``gap``): how far the row is, at most,
  from the optimum (certified by some solver's lower bound ``L*_p``);
- excess over the best known, ``f / f*_p − 1`` with ``f*_p`` the smallest objective any solver
  reached: how much it loses against the study's best answer (no certificate needed);
- performance ratio (Dolan & Moré 2002), ``r_{p,s} = f_{p,s} / f*_p`` (∞ for a row with no
  objective: error, no solution); the profile is :math:`ρ_s(τ) = |\{p : r_{p,s} ≤ τ\}| / |P|`,
  the share of problems solver ``s`` solves within a factor ``τ`` of the best.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from layerprune.problems.io import atomic_write

__all__ = ["PROBLEM", "SOLVED", "gap_table", "excess", "performance_ratios", "performance_profile",
           "loss_matrix", "anytime", "plot_anytime", "plot_performance_profile", "plot_loss_heatmap",
           "plot_gaps", "save_plots"]

#: the columns that name one problem the solvers compete on
PROBLEM = ["instance", "pattern", "objective_kind"]
#: statuses whose row holds a mask and its objective
SOLVED = ("optimal", "feasible")
#: ratios within this relative distance of 1 count as the best (round-off of equal masks)
TIE_RTOL = 1e-9


def _solved(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].isin(SOLVED) & df["objective"].notna()]


def excess(df: pd.DataFrame) -> pd.Series:
    """``objective / best_objective − 1`` per row (0 where both are 0; NaN without an objective)."""
    f, best = df["objective"].astype(float), df["best_objective"].astype(float)
    out = f / best - 1.0
    out[(best <= 0) & (f <= 0)] = 0.0
    out[(best <= 0) & (f > 0)] = math.inf
    return out.where(f.notna())


def gap_table(df: pd.DataFrame, by: Sequence[str] = ("solver", "d_in", "pattern", "objective_kind")
              ) -> pd.DataFrame:
    """One row per group of ``by``: how far its solved rows are from optimal.

    Columns: ``cases`` (rows in the group), ``solved`` (rows with an objective), ``optimal``
    (share proved optimal), ``median_gap`` and ``max_gap`` (gap to the best bound; NaN where no
    solver bounded the problem), ``median_excess`` (over the best known objective),
    ``median_seconds``.
    """
    by = list(by)
    solved = _solved(df).assign(excess=lambda d: excess(d))
    groups = df.groupby(by, dropna=False)
    table = pd.DataFrame({
        "cases": groups.size(),
        "solved": solved.groupby(by, dropna=False).size(),
        "optimal": groups["status"].agg(lambda s: float((s == "optimal").mean())),
        "median_gap": solved.groupby(by, dropna=False)["gap"].median(),
        "max_gap": solved.groupby(by, dropna=False)["gap"].max(),
        "median_excess": solved.groupby(by, dropna=False)["excess"].median(),
        "median_seconds": groups["seconds"].median(),
    })
    table["solved"] = table["solved"].fillna(0).astype(int)
    return table.reset_index()


def performance_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """``r_{p,s}``: problems (rows, :data:`PROBLEM`) × solvers (columns).

    ∞ where the solver ran on the problem without an objective (error, no solution) and NaN
    where it did not run (e.g. it cannot take the pattern). Ratios within :data:`TIE_RTOL` of 1
    are 1; a problem whose best objective is 0 gives 1 to the rows that reach 0, ∞ to the rest.
    """
    rows = df.assign(ratio=excess(df) + 1.0)
    rows.loc[rows["ratio"].isna(), "ratio"] = math.inf  # ran, no objective
    rows.loc[(rows["ratio"] - 1.0).abs() <= TIE_RTOL, "ratio"] = 1.0
    return rows.pivot_table(index=PROBLEM, columns="solver", values="ratio", aggfunc="min")


def performance_profile(df: pd.DataFrame, taus: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """``ρ_s(τ)`` on the problems every listed solver ran on: index ``τ``, one column per solver.

    Parameters
    ----------
    df : results table
    taus : the factors τ ≥ 1 (default: 1 and every distinct finite ratio, so the steps are exact)
    """
    ratios = performance_ratios(df).dropna()
    if taus is None:
        finite = ratios.to_numpy()[np.isfinite(ratios.to_numpy())]
        taus = np.unique(np.concatenate([[1.0], finite]))
    taus = np.asarray(sorted(taus), dtype=float)
    data = {s: [(ratios[s] <= t).mean() if len(ratios) else math.nan for t in taus] for s in ratios.columns}
    return pd.DataFrame(data, index=pd.Index(taus, name="tau"))


def loss_matrix(df: pd.DataFrame, columns: Sequence[str] = ("pattern", "d_in")) -> pd.DataFrame:
    """Median excess over the best known objective: solvers (rows) × ``columns`` groups."""
    solved = _solved(df).assign(excess=lambda d: excess(d))
    return solved.pivot_table(index="solver", columns=list(columns), values="excess", aggfunc="median")


def anytime(result) -> pd.DataFrame:
    """A solve's incumbent objective and certified bound over time.

    Columns ``seconds``, ``objective``, ``lower_bound`` (NaN where the backend certifies
    nothing): the history events that carry ``seconds`` and ``objective`` (see
    ``Proposal.history``), then the final result (its re-scored objective and bound at
    ``result.seconds``). A backend without such events gives the final point only.
    """
    rows = [(e["seconds"], e["objective"], e.get("lower_bound", math.nan))
            for e in result.history if "seconds" in e and "objective" in e]
    rows.append((result.seconds, result.objective if result.objective is not None else math.nan,
                 result.lower_bound if result.lower_bound is not None else math.nan))
    return pd.DataFrame(rows, columns=["seconds", "objective", "lower_bound"])


# ---------------------------------------------------------------------------- figures
def plot_anytime(curves: dict, ax=None, *, best_bound: Optional[float] = None,
                 title: str = "objective and certified bound over time"):
    """Each solver's :func:`anytime` curve: incumbent (solid steps), bound (dashed steps), a
    marker at the final result; ``best_bound`` as a horizontal line. ``curves``: {label: frame}."""
    import matplotlib.pyplot as plt

    ax = ax or plt.figure(figsize=(6, 4)).gca()
    for label, frame in curves.items():
        line, = ax.step(frame["seconds"], frame["objective"], where="post", label=f"{label} objective")
        ax.plot(frame["seconds"].iloc[-1:], frame["objective"].iloc[-1:], "o", color=line.get_color())
        if frame["lower_bound"].notna().any():
            ax.step(frame["seconds"], frame["lower_bound"], where="post", linestyle="--", color=line.get_color(),
                    label=f"{label} bound")
    if best_bound is not None:
        ax.axhline(best_bound, color="black", linewidth=0.8, linestyle=":", label="best bound")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("layer error")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_performance_profile(profile: pd.DataFrame, ax=None, *, title: str = "performance profile"):
    """Step plot of :func:`performance_profile` (log-scaled τ)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.figure(figsize=(6, 4)).gca()
    for solver in profile.columns:
        ax.step(profile.index, profile[solver], where="post", label=solver)
    ax.set_xscale("log")
    ax.set_xlabel("τ (objective / best known)")
    ax.set_ylabel("share of problems within τ")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_loss_heatmap(matrix: pd.DataFrame, ax=None, *, title: str = "median excess over the best known"):
    """Heat map of :func:`loss_matrix` (percent), each cell annotated."""
    import matplotlib.pyplot as plt

    ax = ax or plt.figure(figsize=(1.2 + 0.9 * max(1, matrix.shape[1]), 1 + 0.5 * max(1, matrix.shape[0]))).gca()
    values = 100.0 * matrix.to_numpy(dtype=float)
    shown = np.where(np.isfinite(values), values, np.nan)
    image = ax.imshow(shown, cmap="Reds", aspect="auto", vmin=0.0)
    ax.set_yticks(range(matrix.shape[0]), [str(s) for s in matrix.index])
    ax.set_xticks(range(matrix.shape[1]), [", ".join(map(str, c)) if isinstance(c, tuple) else str(c)
                                          for c in matrix.columns], rotation=45, ha="right")
    top = np.nanmax(shown) if np.isfinite(shown).any() else 0.0
    for (i, j), v in np.ndenumerate(values):
        dark = np.isinf(v) or (np.isfinite(v) and top > 0 and v > 0.6 * top)
        ax.text(j, i, "–" if np.isnan(v) else ("∞" if np.isinf(v) else f"{v:.1f}"), ha="center", va="center",
                fontsize="small", color="white" if dark else "black")
    ax.figure.colorbar(image, ax=ax, label="%")
    ax.set_title(title)
    return ax


def plot_gaps(df: pd.DataFrame, ax=None, *, title: str = "gap to the best bound by size"):
    """Median gap to the best bound against ``d_in``: a colour per solver, a line style per
    pattern, the gap on a symmetric-log scale (linear below 0.1%). Give one objective kind."""
    import matplotlib.pyplot as plt

    ax = ax or plt.figure(figsize=(7, 4.5)).gca()
    table = gap_table(df, by=("solver", "pattern", "d_in")).dropna(subset=["median_gap"])
    solvers = sorted(table["solver"].unique())
    styles = dict(zip(sorted(table["pattern"].unique()), ["-", "--", ":", "-."] * 4))
    colours = dict(zip(solvers, plt.get_cmap("tab10").colors * 2))
    for (solver, pattern), part in table.groupby(["solver", "pattern"]):
        part = part.sort_values("d_in")
        ax.plot(part["d_in"], 100.0 * part["median_gap"], marker="o", linestyle=styles[pattern],
                color=colours[solver], label=f"{solver} {pattern}")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("inputs (d_in)")
    ax.set_ylabel("median gap to the best bound (%)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return ax


def _save_figure(fig, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def save_plots(df: pd.DataFrame, out_dir) -> list[Path]:
    """The study's figures as PNG files in ``out_dir``, per objective kind present:
    ``performance_profile_{kind}.png``, ``loss_heatmap_{kind}.png`` and, where some problem has
    a bound, ``gaps_{kind}.png``. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, part in df.groupby("objective_kind"):
        for name, draw in (("performance_profile", lambda ax, p=part, k=kind: plot_performance_profile(
                                performance_profile(p), ax, title=f"performance profile ({k})")),
                           ("loss_heatmap", lambda ax, p=part, k=kind: plot_loss_heatmap(
                                loss_matrix(p), ax, title=f"median excess over the best known ({k}), %"))):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            draw(ax)
            path = out / f"{name}_{kind}.png"
            _save_figure(fig, path)
            plt.close(fig)
            written.append(path)
    for kind, part in df.groupby("objective_kind"):
        if part["gap"].notna().any():
            fig, ax = plt.subplots(figsize=(8, 4.5))
            plot_gaps(part, ax, title=f"gap to the best bound by size ({kind})")
            path = out / f"gaps_{kind}.png"
            _save_figure(fig, path)
            plt.close(fig)
            written.append(path)
    return written
