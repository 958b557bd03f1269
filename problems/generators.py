"""Seeded generators of LLM-like layer instances.

Real decoder linears have (i) a few *outlier input channels* whose activations are 10–100×
larger than the rest, (ii) strongly *correlated* features, (iii) heavy-tailed weights and
(iv) Gram matrices that are numerically rank-deficient. The generator reproduces each knob:

``X = (Z · C) · diag(s)`` with ``Z`` standard normal (n × d_in), ``C`` mixing a low-rank
common part and an identity (correlation ``rho``), ``s`` = 1 except ``n_outliers`` channels
scaled by ``outlier_scale``; ``W`` is Student-t (df=4) scaled by 1/sqrt(d_in). ``rank`` < d_in
draws ``Z`` of that many latent dimensions, so ``G = XᵀX`` is exactly rank-deficient.
"""
from __future__ import annotations

import numpy as np

from .problem import LayerProblem

__all__ = ["make_instance", "make_arrays"]


def make_arrays(d_out: int, d_in: int, *, seed: int = 0, n_tokens: int | None = None,
                rho: float = 0.5, n_outliers: int | None = None, outlier_scale: float = 20.0,
                rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(W, G)`` float64 arrays of an LLM-like layer.

    Parameters
    ----------
    d_out, d_in : layer shape
    seed : RNG seed (numpy ``default_rng``)
    n_tokens : calibration tokens (default ``4·d_in``)
    rho : strength of the shared low-rank correlation, in [0, 1)
    n_outliers : number of outlier channels (default ``max(1, d_in // 32)``)
    outlier_scale : activation scale of outlier channels
    rank : if given (< d_in), ``G`` has exactly this rank
    """
    rng = np.random.default_rng(seed)
    n = n_tokens or 4 * d_in
    n_outliers = max(1, d_in // 32) if n_outliers is None else n_outliers
    latent = d_in if rank is None else int(rank)
    Z = rng.standard_normal((n, latent))
    common = max(1, d_in // 8)
    mix = np.sqrt(1 - rho) * (np.eye(latent, d_in) if latent == d_in else rng.standard_normal((latent, d_in)) / np.sqrt(latent))
    mix += np.sqrt(rho) * (rng.standard_normal((latent, common)) @ rng.standard_normal((common, d_in))) / np.sqrt(common * latent) * np.sqrt(latent)
    X = Z @ mix
    scale = np.ones(d_in)
    if n_outliers:
        scale[rng.choice(d_in, size=min(n_outliers, d_in), replace=False)] = outlier_scale
    X = X * scale[None, :] * rng.uniform(0.5, 1.5, size=d_in)[None, :]
    W = rng.standard_t(4, size=(d_out, d_in)) / np.sqrt(d_in)
    G = X.T @ X / n
    return W, 0.5 * (G + G.T)


def make_instance(d_out: int, d_in: int, *, pattern="per-row:0.5", objective: str = "mask",
                  **kwargs) -> LayerProblem:
    """A validated :class:`LayerProblem` from :func:`make_arrays` (same keyword arguments)."""
    W, G = make_arrays(d_out, d_in, **kwargs)
    return LayerProblem.create(W, G, pattern=pattern, objective=objective)
