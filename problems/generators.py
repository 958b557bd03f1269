"""Seeded generators of LLM-like layer instances.

Real decoder linears have (i) a few *outlier input channels* whose activations are 10–100×
larger than the rest, (ii) strongly *correlated* features, (iii) heavy-tailed weights and
(iv) Gram matrices that are numerically rank-deficient. The generator reproduces each knob:

``X = (Z · C) · diag(s)`` with ``Z`` standard normal (n × d_in), ``C`` mixing a low-rank
common part and an identity (correlation ``rho``), ``s`` = 1 except ``n_outliers`` channels
scaled by ``outlier_scale``; ``W`` is Student-t (df=4) scaled by 1/sqrt(d_in). ``rank`` < d_in
draws ``Z`` of that many latent dimensions, so ``G = XᵀX`` is exactly rank-deficient.
All knobs act at once, so :func:`make_arrays`' Gram matrices are nearly singular even at full
rank (the outliers' scale² times the low-rank mixing); :func:`make_family` gives one controlled
property per family, for ablations.
"""
from __future__ import annotations

import numpy as np

from .problem import LayerProblem

__all__ = ["make_instance", "make_arrays", "FAMILIES", "make_family"]


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


#: synthetic families of :func:`make_family`
FAMILIES = ("iid", "outliers", "correlated", "ill_conditioned")


def make_family(name: str, d_out: int, d_in: int, *, seed: int = 0, n_tokens: int | None = None,
                outlier_strength: float = 20.0, n_outliers: int | None = None, correlation: float = 0.8,
                condition: float = 1e6) -> tuple[np.ndarray, np.ndarray]:
    r"""Return ``(W, G)`` float64 arrays of a synthetic family with one controlled property.

    Tokens ``x ~ N(0, Σ)``, ``X = Z Σ^{1/2}`` with ``Z`` standard normal (n × d_in,
    ``n = n_tokens`` or ``8·d_in``), ``G = XᵀX / n`` (a sampled Gram, as real calibration
    gives); ``W`` is Student-t (df = 4) scaled by ``1/sqrt(d_in)`` as in :func:`make_arrays`.
    The families differ only in ``Σ``:

    - ``iid``: ``Σ = I`` — independent, equally scaled features; ``G`` is well conditioned
      (Marchenko–Pastur: ``cond(G) ≈ ((1+√(d/n))/(1−√(d/n)))²`` ≈ 4.2 at ``n = 8d``). A
      baseline where magnitude/Wanda scores are nearly right.
    - ``outliers``: ``Σ = diag(s²)``, ``s_j = outlier_strength`` on ``n_outliers`` channels
      (default ``max(1, d_in // 32)``, chosen at random) and 1 elsewhere — the few activation
      outlier channels of LLMs (LLM.int8(), OWL). ``sqrt(G_jj)`` of an outlier channel is about
      ``outlier_strength`` times a typical one.
    - ``correlated``: ``Σ_ij = ρ^{|i−j|}`` (AR(1)/Toeplitz, ``ρ = correlation`` ∈ (−1, 1)) —
      strongly correlated neighbouring features, where pruning one channel is compensated by
      another and scores that ignore ``G``'s off-diagonal go wrong. The lag-1 correlation of
      ``G`` is about ``ρ``.
    - ``ill_conditioned``: ``Σ = Q diag(λ) Qᵀ`` with ``Q`` Haar-random and ``λ`` log-spaced from
      1 down to ``1/condition`` — the near-singular Grams of real layers (DESIGN §1: λ_min/λ_max
      down to 1e-7) in a controlled dose; ``cond(G)`` is ``condition`` within the sampling
      factor above (≈ 4.2 either way at ``n = 8d``).

    Parameters
    ----------
    name : one of :data:`FAMILIES`
    d_out, d_in : layer shape
    seed : RNG seed (numpy ``default_rng``)
    n_tokens : sampled tokens (default ``8·d_in``; at least ``d_in`` keeps ``G`` nonsingular)
    outlier_strength, n_outliers : ``outliers`` family
    correlation : ``correlated`` family's ρ
    condition : ``ill_conditioned`` family's ``cond(Σ)`` (≥ 1)
    """
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}")
    rng = np.random.default_rng(seed)
    n = n_tokens or 8 * d_in
    root = _covariance_root(name, d_in, rng, outlier_strength, n_outliers, correlation, condition)
    X = rng.standard_normal((n, d_in)) @ root.T
    W = rng.standard_t(4, size=(d_out, d_in)) / np.sqrt(d_in)
    G = X.T @ X / n
    return W, 0.5 * (G + G.T)


def _covariance_root(name: str, d: int, rng: np.random.Generator, outlier_strength: float,
                     n_outliers: int | None, correlation: float, condition: float) -> np.ndarray:
    """A square root ``R`` (``Σ = RRᵀ``) of the family's covariance, (d, d)."""
    if name == "iid":
        return np.eye(d)
    if name == "outliers":
        if outlier_strength <= 0:
            raise ValueError(f"outlier_strength must be > 0, got {outlier_strength}")
        k = max(1, d // 32) if n_outliers is None else int(n_outliers)
        scale = np.ones(d)
        scale[rng.choice(d, size=min(k, d), replace=False)] = outlier_strength
        return np.diag(scale)
    if name == "correlated":
        if not -1 < correlation < 1:
            raise ValueError(f"correlation must be in (-1, 1), got {correlation}")
        lags = np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
        return np.linalg.cholesky(correlation ** lags)
    if condition < 1:
        raise ValueError(f"condition must be ≥ 1, got {condition}")
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(R))  # Haar-distributed
    lam = np.logspace(0.0, -np.log10(condition), d)
    return Q * np.sqrt(lam)
