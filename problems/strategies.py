"""Hypothesis strategies for tiny instances (brute force can enumerate them).

Besides LLM-like rows from :func:`make_arrays` (full rank or rank-deficient ``G``), the
instances include the cases where solvers break: ties (weights and Gram entries on a coarse
grid, an equicorrelated ``G``), zero rows, ill-conditioned but non-singular ``G`` (condition
number up to 1e9), extreme magnitudes (``W`` and ``G`` scaled by 1e-8 … 1e3 independently),
float32 storage, and the edge budgets K = 0 and K = d_in.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from .generators import make_arrays
from .problem import LayerProblem

__all__ = ["patterns_for", "tiny_problems", "tiny_target_problems", "KINDS"]

#: the instance families :func:`tiny_problems` draws from
KINDS = ("llm", "ties", "zero_row", "ill_conditioned")


def patterns_for(d_in: int, d_out: int, *, coupled: bool = True, edges: bool = True) -> st.SearchStrategy[str]:
    """Valid pattern strings for a d_out × d_in layer (``coupled`` adds unstructured/columns;
    ``edges`` adds the budgets that keep nothing or everything: K = 0, K = d_in, N = 0, N = M)."""
    lo, hi = (0, d_in) if edges else (1, d_in - 1)
    opts = [st.integers(1, d_in - 1).map(lambda k: f"per-row:{k}")]
    if edges:
        opts.append(st.sampled_from([lo, hi]).map(lambda k: f"per-row:{k}"))
    ms = [m for m in (2, 4) if d_in % m == 0]
    if ms:
        low = 0 if edges else 1
        opts.append(st.sampled_from(ms).flatmap(
            lambda m: st.integers(low, m if edges else m - 1).map(lambda n: f"nm:{n}:{m}")))
    if coupled:
        opts.append(st.integers(lo, hi).map(lambda k: f"columns:{k}"))
        opts.append(st.sampled_from([0.25, 0.5, 0.75] + ([0.0] if edges else [])).map(lambda s: f"unstructured:{s}"))
    return st.one_of(*opts)


def _arrays(kind: str, d_out: int, d_in: int, seed: int, rank) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # weights on a coarse grid, G = I + ρ 11ᵀ: many masks share one value
        W = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(d_out, d_in))
        rho = float(rng.choice([0.0, 0.25, 0.5]))
        return W, np.eye(d_in) + rho * np.ones((d_in, d_in))
    W, G = make_arrays(d_out, d_in, seed=seed, n_tokens=4 * d_in, rank=rank)
    if kind == "zero_row":
        W[rng.integers(d_out)] = 0.0
    elif kind == "ill_conditioned":  # non-singular, condition number 1e3 … 1e9
        Q, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
        lam = np.geomspace(1.0, 10.0 ** -float(rng.choice([3, 6, 9])), d_in)
        G = (Q * lam) @ Q.T * float(np.trace(G)) / d_in
        G = 0.5 * (G + G.T)
    return W, G


@st.composite
def tiny_problems(draw, *, max_d_in: int = 6, max_d_out: int = 2, objectives=("mask", "reconstruct"),
                  coupled: bool = True, rank_deficient: bool = True, extremes: bool = True) -> LayerProblem:
    """A tiny validated problem: d_in ≤ ``max_d_in``, d_out ≤ ``max_d_out``, any pattern.

    ``extremes`` (default) also draws the families of :data:`KINDS` other than LLM-like rows,
    magnitudes of ``W`` and ``G`` from 1e-8 to 1e3, float32 storage and edge budgets; without
    it the instances are the LLM-like rows in float64 with 0 < K < d_in.
    """
    d_in = draw(st.integers(2, max_d_in))
    d_out = draw(st.integers(1, max_d_out))
    seed = draw(st.integers(0, 2**31 - 1))
    rank = draw(st.sampled_from([None, max(1, d_in - 2)])) if rank_deficient else None
    kind = draw(st.sampled_from(KINDS)) if extremes else "llm"
    W, G = _arrays(kind, d_out, d_in, seed, rank)
    dtype = torch.float64
    if extremes:
        W = W * draw(st.sampled_from([1.0, 1.0, 1e-8, 1e-4, 1e3]))
        G = G * draw(st.sampled_from([1.0, 1.0, 1e-8, 1e-4, 1e3]))
        dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
    pattern = draw(patterns_for(d_in, d_out, coupled=coupled, edges=extremes))
    objective = draw(st.sampled_from(list(objectives)))
    return LayerProblem.create(W, G, pattern=pattern, objective=objective, dtype=dtype)


@st.composite
def tiny_target_problems(draw, *, max_d_in: int = 6, max_d_out: int = 2, objectives=("mask", "reconstruct"),
                         coupled: bool = True) -> tuple[LayerProblem, np.ndarray, np.ndarray]:
    """A tiny problem with dense targets, and the inputs it was made from.

    ``X`` (n × d_in, the dense model's inputs) is LLM-like (a few large channels, possibly a
    dead one, possibly ``n < d_in`` so that ``G`` is singular); ``X̃ = X + σZ`` with σ ∈
    {0.05, 0.3, 1} (the pruned model's drift), or ``X̃ = X·P`` with some channels dropped.
    ``G = X̃ᵀX̃/n``, ``C = X̃ᵀX/n``, ``G0 = XᵀX/n``, all float64.

    Returns
    -------
    (problem, Xt, X) with Xt, X (n, d_in) float64 arrays.
    """
    d_in = draw(st.integers(2, max_d_in))
    d_out = draw(st.integers(1, max_d_out))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.sampled_from([max(1, d_in - 2), 3 * d_in]))
    X = rng.standard_normal((n, d_in)) * np.exp(rng.standard_normal(d_in))
    if draw(st.booleans()):
        X[:, rng.integers(d_in)] = 0.0
    if draw(st.booleans()):
        Xt = X + float(draw(st.sampled_from([0.05, 0.3, 1.0]))) * rng.standard_normal((n, d_in)) * X.std(axis=0)
    else:  # some channels dead in the pruned model, the rest rescaled
        Xt = X * rng.choice([0.0, 0.5, 1.0, 1.5], size=d_in)
    W = rng.standard_normal((d_out, d_in)) * float(draw(st.sampled_from([1.0, 1e-3, 1e2])))
    pattern = draw(patterns_for(d_in, d_out, coupled=coupled, edges=False))
    objective = draw(st.sampled_from(list(objectives)))
    problem = LayerProblem.create(W, Xt.T @ Xt / n, C=Xt.T @ X / n, G0=X.T @ X / n, pattern=pattern,
                                  objective=objective)
    return problem, Xt, X
