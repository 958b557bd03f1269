r"""The layer-wise pruning problem as one frozen, validated value object.

For a linear layer with weights ``W`` (d_out × d_in) and calibration Gram matrix
``G = XᵀX`` (d_in × d_in, PSD), a mask ``M ∈ {0,1}^{d_out×d_in}`` (True = kept) is scored by

``mask`` objective (kept weights fixed)
    :math:`E(M) = \sum_r (w_r ⊙ (1-m_r))^T G (w_r ⊙ (1-m_r))`

``reconstruct`` objective (kept weights re-optimised)
    :math:`E(M) = \sum_r \min_{v:\,\mathrm{supp}\,v ⊆ m_r} (w_r - v)^T G (w_r - v)`;
    for the support ``S`` of a row, :math:`v_S = G_{SS}^{+} (G w)_S` (pseudo-inverse: the
    columns of :math:`G_{S S^c}` lie in the range of :math:`G_{SS}` for PSD ``G``, so this is
    exact for singular ``G`` too).

Dense targets (optional, CONTRACT.md)
    With ``X̃`` the inputs the layer sees in the pruned model and ``X`` the dense model's,
    ``G = X̃ᵀX̃``, ``C = X̃ᵀX`` and ``G0 = XᵀX``, the error of kept weights ``v_r`` is
    :math:`‖X̃v_r − Xw_r‖² = v_r^T G v_r − 2 v_r^T C w_r + w_r^T G0 w_r`. With the target
    :math:`t_r = G^{+} C w_r` (exact: :math:`C w_r = X̃^T(Xw_r) ∈ \mathrm{range}(G)`) it is
    :math:`(t_r − v_r)^T G (t_r − v_r) + c_r`, :math:`c_r = ‖(I − P_{X̃}) X w_r‖² ≥ 0`:
    ``reconstruct`` is the standard problem on the weights ``T`` plus the constant ``Σ c_r``
    (:meth:`LayerProblem.standard_view`), and ``mask`` (``v = w ⊙ m``) gains a linear term in
    the pruned weights (:meth:`LayerProblem.mask_linear`). Without targets (``C = G0 = G``)
    every formula is the one above, computed by the same code as before targets existed.

Every value is computed in float64 on the problem's device, rows in chunks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

from .patterns import Pattern, PatternError, parse_pattern
from .refit import shared_support

__all__ = ["LayerProblem", "ProblemError", "OBJECTIVES", "ridge_targets", "check_ridge_fraction"]

OBJECTIVES = ("mask", "reconstruct")

#: relative tolerance for symmetry of G
SYMMETRY_RTOL = 1e-5
#: relative tolerance (× max diag G × sqrt(d_in)) for negative eigenvalues of G, by input precision
PSD_RTOL = {torch.float64: 1e-8}
PSD_RTOL_LOW_PRECISION = 1e-5
#: bytes of float64 scratch one refit chunk may use
_REFIT_CHUNK_BYTES = 1 << 24


class ProblemError(ValueError):
    """An instance is malformed: wrong shapes, non-finite values, G not symmetric PSD, …"""


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as exc:
            raise ProblemError(f"{name} is not a numeric array: {exc}") from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ProblemError(f"{name} must be a real floating-point array, got {t.dtype}")
    return t


def _check_gram(G: torch.Tensor, d_in: int) -> None:
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ProblemError(f"G must be square (d_in × d_in), got shape {tuple(G.shape)}")
    if G.shape[0] != d_in:
        raise ProblemError(f"G is {G.shape[0]}×{G.shape[1]} but W has d_in={d_in} columns")
    if not bool(torch.isfinite(G).all()):
        raise ProblemError("G contains NaN or inf")
    scale = float(G.abs().max()) if G.numel() else 0.0
    asym = float((G - G.T).abs().max()) if G.numel() else 0.0
    if asym > SYMMETRY_RTOL * max(scale, 1e-300):
        raise ProblemError(f"G is not symmetric: max |G - Gᵀ| = {asym:.3g} (max |G| = {scale:.3g})")
    if scale == 0.0:
        return
    # G + eps·I admits a Cholesky factor iff λ_min(G) > -eps (cheaper than an eigen-decomposition)
    rtol = PSD_RTOL.get(G.dtype, PSD_RTOL_LOW_PRECISION)
    eps = rtol * float(torch.diagonal(G).abs().max().clamp_min(1e-300)) * max(1, d_in) ** 0.5
    eye = torch.eye(d_in, dtype=torch.float64, device=G.device)
    _, info = torch.linalg.cholesky_ex(G.to(torch.float64) + eps * eye)
    if int(info) != 0:
        lam = float(torch.linalg.eigvalsh(G.to(torch.float64))[0])
        raise ProblemError(f"G is not positive semi-definite: smallest eigenvalue {lam:.3g}")


#: largest log10 of ``d_in·max|G|·Σ_r ‖w_r‖²`` (a bound on every objective and on the partial
#: products that compute it): above it float64 objectives may overflow
_MAX_LOG10 = 300.0


def _check_magnitudes(W: torch.Tensor, G: torch.Tensor, dtype: torch.dtype, gname: str = "G") -> None:
    """W and G (stored in ``dtype``) must be finite there, and every objective must be finite in
    float64: ``E(M) ≤ λ_max(G)·Σ‖w_r‖² ≤ d_in·max|G|·Σ‖w_r‖²`` (and so is every partial sum)."""
    for name, t in (("W", W), (gname, G)):
        if not bool(torch.isfinite(t).all()):
            raise ProblemError(f"{name} does not fit {str(dtype).replace('torch.', '')}: values overflow to inf")
    w64 = W.to(torch.float64)
    wmax, gmax = float(w64.abs().max()), float(G.abs().max()) if G.numel() else 0.0
    if wmax == 0.0 or gmax == 0.0:
        return
    wsq = float(((w64 / wmax) ** 2).sum())  # Σ‖w_r‖² / wmax², no overflow
    log10 = math.log10(W.shape[1]) + math.log10(gmax) + 2 * math.log10(wmax) + math.log10(wsq)
    if log10 > _MAX_LOG10:
        raise ProblemError(f"W and {gname} are too large for float64 objectives (max |W| = {wmax:.3g}, "
                           f"max |{gname}| = {gmax:.3g}): rescale them")


def _check_targets(C, G0, G: torch.Tensor, g_dtype: torch.dtype, W: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate the dense targets; return them stored like ``G`` (None, None without them).

    Both or neither; d_in × d_in; finite; ``G0`` symmetric; ``[[G, C], [Cᵀ, G0]]`` PSD within
    the tolerance of :func:`_check_gram` (at the lowest input precision): the Gram of ``[X̃ X]``.
    A pair equal to ``G`` after casting is dropped (today's problem, computed as before).
    """
    if C is None and G0 is None:
        return None, None
    if (C is None) != (G0 is None):
        given, missing = ("C", "G0") if G0 is None else ("G0", "C")
        raise ProblemError(f"{given} is given without {missing}: dense targets need both (CONTRACT.md)")
    d = W.shape[1]
    C, G0 = _as_tensor(C, "C"), _as_tensor(G0, "G0")
    for name, t in (("C", C), ("G0", G0)):
        if t.dim() != 2 or tuple(t.shape) != (d, d):
            raise ProblemError(f"{name} must be d_in × d_in = {d}×{d}, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ProblemError(f"{name} contains NaN or inf")
    scale = float(G0.abs().max()) if G0.numel() else 0.0
    asym = float((G0 - G0.T).abs().max()) if G0.numel() else 0.0
    if asym > SYMMETRY_RTOL * max(scale, 1e-300):
        raise ProblemError(f"G0 is not symmetric: max |G0 - G0ᵀ| = {asym:.3g} (max |G0| = {scale:.3g})")
    f64 = dict(device=G.device, dtype=torch.float64)
    G64, C64, G064 = G.to(**f64), C.to(**f64), G0.to(**f64)
    G064 = 0.5 * G064 + 0.5 * G064.T
    block = torch.cat([torch.cat([G64, C64], dim=1), torch.cat([C64.T, G064], dim=1)], dim=0)
    diag = float(torch.diagonal(block).abs().max())
    if diag > 0.0:
        precise = all(x == torch.float64 for x in (g_dtype, C.dtype, G0.dtype))
        rtol = PSD_RTOL[torch.float64] if precise else PSD_RTOL_LOW_PRECISION
        eps = rtol * diag * (2 * d) ** 0.5
        _, info = torch.linalg.cholesky_ex(block + eps * torch.eye(2 * d, **f64))
        if int(info) != 0:
            lam = float(torch.linalg.eigvalsh(block)[0])
            raise ProblemError(f"C and G0 do not fit G: [[G, C], [Cᵀ, G0]] must be PSD (the Gram of the "
                               f"pruned and dense inputs), its smallest eigenvalue is {lam:.3g}")
    C, G0 = C64.to(dtype), G064.to(dtype)
    _check_magnitudes(W, C, dtype, "C")
    _check_magnitudes(W, G0, dtype, "G0")
    if torch.equal(C, G) and torch.equal(G0, G):
        return None, None
    return C, G0


class _Target(NamedTuple):
    """Float64 data of a dense target, per row ``r`` (see :meth:`LayerProblem.target`).

    B : (d_out, d_in) rows ``(C w_r)ᵀ``
    T : (d_out, d_in) rows ``t_rᵀ = (G⁺ C w_r)ᵀ``
    residual : (d_out, d_in) rows ``(G t_r − C w_r)ᵀ`` (0 in exact arithmetic)
    offsets : (d_out,) ``c_r``, the error of ``v_r = t_r``
    """

    B: torch.Tensor
    T: torch.Tensor
    residual: torch.Tensor
    offsets: torch.Tensor


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """One layer's mask problem. Build it with :meth:`create`, which validates.

    Attributes
    ----------
    W : (d_out, d_in) tensor
        Dense weights.
    G : (d_in, d_in) tensor
        Symmetric PSD Gram matrix ``XᵀX`` (symmetrised on creation).
    pattern : Pattern
        Bound to this layer's shape (fractions resolved to counts).
    objective_kind : {"mask", "reconstruct"}
    C, G0 : (d_in, d_in) tensors or None
        Dense targets (CONTRACT.md): the cross-Gram ``X̃ᵀX`` and the dense Gram ``XᵀX``,
        both or neither; None is today's problem (``C = G0 = G``).
    """

    W: torch.Tensor
    G: torch.Tensor
    pattern: Pattern
    objective_kind: str = "mask"
    C: Optional[torch.Tensor] = None
    G0: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, W, G=None, *, X=None, pattern="per-row:0.5", objective: str = "mask",
               dtype: torch.dtype = torch.float64, device=None, C=None, G0=None) -> "LayerProblem":
        """Validate and build a problem; one :class:`ProblemError` per fault.

        Parameters
        ----------
        W : (d_out, d_in) array or tensor
        G : (d_in, d_in) array or tensor, optional
            Gram matrix; give either ``G`` or ``X``.
        X : (n, d_in) array or tensor, optional
            Calibration inputs, from which ``G = XᵀX`` is formed in float64.
        pattern : str or Pattern
        objective : {"mask", "reconstruct"}
        dtype, device : storage of W and G (default float64 on W's device).
        C, G0 : (d_in, d_in) arrays or tensors, optional
            Dense targets ``X̃ᵀX`` and ``XᵀX`` (CONTRACT.md), with the normalisation of ``G``;
            both or neither. ``G0`` must be symmetric, and ``[[G, C], [Cᵀ, G0]]`` PSD (it is
            the Gram matrix of ``[X̃ X]``): otherwise the error is unbounded below. A pair
            equal to ``G`` (exactly, after casting) is dropped: that is today's problem.
        """
        if objective not in OBJECTIVES:
            raise ProblemError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        W = _as_tensor(W, "W")
        if W.dim() != 2 or W.shape[0] == 0 or W.shape[1] == 0:
            raise ProblemError(f"W must be a non-empty 2-D array (d_out × d_in), got shape {tuple(W.shape)}")
        if not bool(torch.isfinite(W).all()):
            raise ProblemError("W contains NaN or inf")
        d_out, d_in = W.shape
        if (G is None) == (X is None):
            raise ProblemError("give exactly one of G (d_in × d_in) or X (n × d_in)")
        if X is not None:
            X = _as_tensor(X, "X")
            if X.dim() != 2 or X.shape[1] != d_in:
                raise ProblemError(f"X must be n × d_in with d_in={d_in}, got shape {tuple(X.shape)}")
            if not bool(torch.isfinite(X).all()):
                raise ProblemError("X contains NaN or inf")
            X64 = X.to(torch.float64)
            G = X64.T @ X64
            if not bool(torch.isfinite(G).all()):
                raise ProblemError(f"X is too large: XᵀX overflows float64 (max |X| = {float(X64.abs().max()):.3g})")
        G = _as_tensor(G, "G")
        _check_gram(G, d_in)
        g_dtype = G.dtype
        device = W.device if device is None else torch.device(device)
        G = G.to(device=device, dtype=torch.float64)
        G = (0.5 * G + 0.5 * G.T).to(dtype)  # (G + Gᵀ) could overflow
        if isinstance(pattern, str):
            pattern = parse_pattern(pattern)
        try:
            pattern = pattern.bind(d_out, d_in)
        except PatternError as exc:
            raise ProblemError(str(exc)) from None
        W = W.to(device=device, dtype=dtype)
        _check_magnitudes(W, G, dtype)
        C, G0 = _check_targets(C, G0, G, g_dtype, W, dtype)
        return cls(W, G, pattern, objective, C, G0)

    def replace(self, **changes) -> "LayerProblem":
        """A copy with fields changed, re-validated (pattern given as str or Pattern)."""
        args = dict(W=self.W, G=self.G, pattern=self.pattern, objective=self.objective_kind,
                    C=self.C, G0=self.G0)
        if "objective_kind" in changes:
            changes["objective"] = changes.pop("objective_kind")
        args.update(changes)
        return LayerProblem.create(args.pop("W"), args.pop("G"), dtype=self.dtype, **args)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LayerProblem":
        """The same problem with W and G (and C, G0) moved/cast (no re-validation)."""
        kw = dict(device=device, dtype=dtype or self.dtype)
        if self.C is None:
            return dataclasses.replace(self, W=self.W.to(**kw), G=self.G.to(**kw))
        return dataclasses.replace(self, W=self.W.to(**kw), G=self.G.to(**kw), C=self.C.to(**kw),
                                   G0=self.G0.to(**kw))

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def d_out(self) -> int:
        return self.W.shape[0]

    @property
    def d_in(self) -> int:
        return self.W.shape[1]

    @property
    def device(self) -> torch.device:
        return self.W.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W.dtype

    @property
    def scale(self) -> float:
        """``Σ_r w_rᵀ G w_r``: the error of pruning everything, the natural size of objectives.

        Float64 round-off in any objective is a tiny multiple of it, so absolute tolerances
        (a gap that counts as closed, a test's slack) are stated relative to this scale.
        """
        return float(self.weight_errors(torch.zeros_like(self.W)).sum())

    @property
    def budget(self) -> int:
        """Number of weights a feasible mask keeps."""
        return self.pattern.budget(*self.shape)

    def _w64(self) -> torch.Tensor:
        return self.W.to(torch.float64)

    def _g64(self) -> torch.Tensor:
        return self.G.to(torch.float64)

    # ------------------------------------------------------------------ dense targets
    @property
    def has_target(self) -> bool:
        """True if the problem carries dense targets ``C``, ``G0`` (CONTRACT.md)."""
        return self.C is not None

    @functools.cached_property
    def target(self) -> Optional[_Target]:
        r"""The targets ``t_r = G⁺ C w_r`` and offsets ``c_r`` in float64 (None without targets).

        ``G = UΛUᵀ`` (eigen-decomposition); ``G⁺`` inverts the eigenvalues above the cut-off
        ``d_in · ε₆₄ · λ_max`` (numpy's rank rule) and drops the rest. In exact arithmetic
        ``C w_r = X̃ᵀ(X w_r)`` lies in ``range(G)``, so ``G t_r = C w_r`` and the error is
        exactly :math:`(t_r − v_r)^T G (t_r − v_r) + c_r`. The cut-off drops the components
        of ``C w_r`` along eigenvectors with ``λ_k`` below it; each is at most
        :math:`\sqrt{λ_k}\,‖X w_r‖`, and they are kept in ``residual`` (``G t_r − C w_r``), so
        :meth:`weight_errors` stays the CONTRACT error while :meth:`standard_view` differs
        from it by ``2 Σ_r (v_r − t_r)ᵀ residual_r`` (round-off size for consistent data).

        The offset :math:`c_r = w_r^T G0 w_r − 2 t_r^T C w_r + t_r^T G t_r` is the CONTRACT
        error of ``v_r = t_r``, i.e. :math:`‖(I − P_{X̃}) X w_r‖² ≥ 0` (computed with the
        cancellation of that difference: absolute error ~ ``ε₆₄ · w_rᵀ G0 w_r``).
        """
        if self.C is None:
            return None
        W, G = self._w64(), self._g64()
        B = W @ self.C.to(torch.float64).T
        lam, U = torch.linalg.eigh(G)
        cut = self.d_in * torch.finfo(torch.float64).eps * float(lam.abs().max())
        inv = torch.where(lam > cut, 1.0 / torch.where(lam > cut, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        T = ((B @ U) * inv) @ U.T
        TG = T @ G
        e0 = ((W @ self.G0.to(torch.float64)) * W).sum(dim=1)
        offsets = e0 - 2.0 * (T * B).sum(dim=1) + (TG * T).sum(dim=1)
        return _Target(B, T, TG - B, offsets)

    @property
    def target_offset(self) -> float:
        """``Σ_r c_r``: what :meth:`standard_view`'s objective lacks (0.0 without targets)."""
        return 0.0 if self.C is None else float(self.target.offsets.sum())

    def standard_view(self) -> "LayerProblem":
        r"""The target-free problem on the weights ``T`` (itself without targets).

        For every weights ``V``: ``E(V) = E_view(V) + Σ_r c_r`` (up to the residual of
        :attr:`target`), so the ``reconstruct`` optimum, its minimiser and every valid lower
        bound carry over by adding :attr:`target_offset`. Not for ``mask`` (there ``v = w ⊙ m``
        keeps the dense weights, not ``T``). T is stored in the problem's dtype.
        """
        if self.C is None:
            return self
        return dataclasses.replace(self, W=self.target.T.to(self.dtype), C=None, G0=None)

    def mask_linear(self) -> Optional[torch.Tensor]:
        r"""The linear term of the ``mask`` objective with targets; None without them.

        With the pruned weights ``u_r = w_r ⊙ (1 − m_r)``, the CONTRACT error of
        ``v_r = w_r − u_r`` is :math:`u_r^T G u_r + 2 u_r^T g_r + k_r` with
        :math:`g_r = (C − G) w_r` (``= G(t_r − w_r)``) and ``k_r`` the error of the dense
        weights (``u = 0``). Returns the (d_out, d_in) float64 rows ``g_rᵀ``.
        """
        if self.C is None:
            return None
        return self.target.B - self._w64() @ self._g64()

    # ------------------------------------------------------------------ masks
    def check_mask(self, mask) -> torch.Tensor:
        """Return ``mask`` as a bool tensor on the problem's device; raise if infeasible."""
        m = torch.as_tensor(mask, device=self.device)
        if tuple(m.shape) != self.shape:
            raise ProblemError(f"mask has shape {tuple(m.shape)}, W has {self.shape}")
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ProblemError("mask must be boolean (or 0/1)")
            m = m.bool()
        why = self.pattern.violation(m)
        if why:
            raise ProblemError(f"mask violates {self.pattern}: {why}")
        return m

    def is_feasible(self, mask) -> bool:
        try:
            self.check_mask(mask)
        except ProblemError:
            return False
        return True

    def round(self, scores: torch.Tensor) -> torch.Tensor:
        """Round scores (higher = keep) to a feasible mask; the pattern's exact LMO."""
        return self.pattern.round(torch.as_tensor(scores, device=self.device))

    # ------------------------------------------------------------------ objective
    def weight_errors(self, weights) -> torch.Tensor:
        """Per-row error ``(w_r - v_r)ᵀ G (w_r - v_r)`` of given weights V. Returns (d_out,) float64.

        With targets, the CONTRACT error ``v_rᵀGv_r − 2v_rᵀCw_r + w_rᵀG0w_r`` (see :attr:`target`).
        """
        V = torch.as_tensor(weights, device=self.device).to(torch.float64)
        if tuple(V.shape) != self.shape:
            raise ProblemError(f"weights have shape {tuple(V.shape)}, W has {self.shape}")
        if self.C is not None:
            # the CONTRACT error vᵀGv − 2vᵀCw + wᵀG0w, written about the target t (no
            # cancellation in the part that depends on v)
            tg = self.target
            R = tg.T - V
            err = ((R @ self._g64()) * R).sum(dim=1) + tg.offsets - 2.0 * (R * tg.residual).sum(dim=1)
            return err.clamp_min(0.0)
        R = self._w64() - V
        return ((R @ self._g64()) * R).sum(dim=1).clamp_min(0.0)

    def row_errors(self, mask) -> torch.Tensor:
        """Per-row objective of a mask under this problem's objective. Returns (d_out,) float64."""
        m = self.check_mask(mask)
        if self.objective_kind == "mask":
            return self.weight_errors(self.W.to(torch.float64) * m)
        return self.weight_errors(self.refit(m))

    def objective(self, mask=None, *, weights=None) -> float:
        """Exact objective: of a mask (under ``objective_kind``), or of given weights.

        With ``weights`` only, the error of those weights is returned (their support must
        satisfy the pattern); with both, ``weights`` must vanish off ``mask``.
        """
        if weights is not None:
            V = torch.as_tensor(weights, device=self.device)
            support = V != 0
            if mask is not None:
                m = self.check_mask(mask)
                if bool((support & ~m).any()):
                    raise ProblemError("weights are non-zero outside the mask")
            elif not self._support_fits(support):
                raise ProblemError(f"the support of the weights does not fit {self.pattern}")
            return float(self.weight_errors(V).sum())
        if mask is None:
            raise ProblemError("objective() needs a mask or weights")
        return float(self.row_errors(mask).sum())

    def _support_fits(self, support: torch.Tensor) -> bool:
        """True if the support extends to a feasible mask (no group holds more than its budget)."""
        extended = self.round(support.to(torch.float64))  # ties keep lower indices: support first
        return not bool((support & ~extended).any())

    def refit(self, mask) -> torch.Tensor:
        """Optimal weights on the support of ``mask`` (the ``reconstruct`` minimiser).

        Per row ``v_S = G_SS⁺ (G w)_S`` (``(C w)_S`` with targets): batched Cholesky in float64, with an eigen
        pseudo-inverse for rows whose ``G_SS`` is (numerically) singular. Where every row keeps the
        same inputs (``columns``) one factor of ``G_SS`` serves all rows.

        Returns
        -------
        (d_out, d_in) float64 tensor, zero off the mask.
        """
        m = self.check_mask(mask)
        W, G = self._w64(), self._g64()
        B = W @ G if self.C is None else self.target.B  # (d_out, d_in): row r holds (G w_r)ᵀ (C w_r with targets)
        counts = m.sum(dim=1)
        kmax = int(counts.max()) if m.numel() else 0
        out = torch.zeros_like(W)
        if kmax == 0:
            return out
        if shared_support(m):
            S = torch.nonzero(m[0]).flatten()
            out[:, S] = _psd_solve(G[S][:, S][None], B[:, S].T[None]).squeeze(0).T
            return out
        # kept indices first (stable, ascending), padded to kmax
        order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices[:, :kmax]
        valid = torch.arange(kmax, device=self.device)[None, :] < counts[:, None]
        chunk = max(1, _REFIT_CHUNK_BYTES // (8 * kmax * kmax * 3))
        eye = torch.eye(kmax, dtype=torch.float64, device=self.device)
        for lo in range(0, self.d_out, chunk):
            hi = min(lo + chunk, self.d_out)
            idx, ok = order[lo:hi], valid[lo:hi]
            A = G[idx[:, :, None], idx[:, None, :]]
            pair = ok[:, :, None] & ok[:, None, :]
            A = torch.where(pair, A, eye.expand_as(A))
            b = torch.where(ok, torch.gather(B[lo:hi], 1, idx), torch.zeros((), dtype=torch.float64,
                                                                          device=self.device))
            v = _psd_solve(A, b)
            v = torch.where(ok, v, torch.zeros((), dtype=torch.float64, device=self.device))
            out[lo:hi].scatter_(1, idx, v)
        return out * m

    # ------------------------------------------------------------------ scaling
    def scaled(self) -> tuple["LayerProblem", torch.Tensor]:
        """Unit-diagonal scaling ``G̃ = D⁻¹GD⁻¹``, ``W̃ = W·D`` with ``D = diag(G)^{1/2}``.

        Both objectives are unchanged: ``E(M; W̃, G̃) = E(M; W, G)`` (targets: ``C̃ = D⁻¹CD⁻¹``, ``G̃0 = D⁻¹G0D⁻¹``), and ``|W̃|`` is exactly
        Wanda's score. Dead inputs (``G_jj = 0``) keep ``D_j = 1``.

        Returns
        -------
        (problem, d) with ``d`` the (d_in,) float64 vector ``diag(D)``.
        """
        d = torch.diagonal(self._g64()).clamp_min(0.0).sqrt()
        d = torch.where(d > 0, d, torch.ones_like(d))
        Gs = self._g64() / d[:, None] / d[None, :]
        Ws = self._w64() * d[None, :]
        if self.C is not None:  # vᵀCw = ṽᵀ(D⁻¹CD⁻¹)w̃, wᵀG0w = w̃ᵀ(D⁻¹G0D⁻¹)w̃
            Cs = self.C.to(torch.float64) / d[:, None] / d[None, :]
            G0s = self.G0.to(torch.float64) / d[:, None] / d[None, :]
            return dataclasses.replace(self, W=Ws.to(self.dtype), G=Gs.to(self.dtype), C=Cs.to(self.dtype),
                                       G0=G0s.to(self.dtype)), d
        return dataclasses.replace(self, W=Ws.to(self.dtype), G=Gs.to(self.dtype)), d

    def describe(self) -> str:
        target = " target=dense" if self.C is not None else ""
        return f"{self.d_out}×{self.d_in} {self.pattern} objective={self.objective_kind}{target}"

    def __repr__(self) -> str:
        return f"LayerProblem({self.describe()}, dtype={self.dtype}, device={self.device})"


def check_ridge_fraction(fraction) -> float:
    """``fraction`` as a float if it is a finite number ≥ 0 (one-line :class:`ProblemError` if not)."""
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction)
            and fraction >= 0):
        raise ProblemError(f"the ridge fraction must be a finite number ≥ 0, got {fraction!r}")
    return float(fraction)


def ridge_targets(G: torch.Tensor, C: torch.Tensor, G0: torch.Tensor, fraction: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Dense targets with a ridge toward the dense weights: ``(G + δI, C + δI, G0 + δI)``.

    ``δ = fraction · mean(diag G)``. With these, the CONTRACT error of kept weights ``v_r`` is

    .. math:: ‖X̃v_r − Xw_r‖² + δ‖v_r − w_r‖²

    (the Grams of ``X̃`` and ``X`` each stacked over ``√δ·I``, so the triple stays a valid
    PSD Gram block). Without it, ``T = G⁺CW`` follows ``G``'s smallest eigenvalues, which carry
    no signal beyond the calibration tokens (docs/DECISIONS.md: weights 85× the dense ones on a
    real ``q_proj``); the ridge keeps every direction the data do not determine at the dense
    weights. ``fraction = 0`` returns the inputs.

    Parameters
    ----------
    G, C, G0 : (d_in, d_in) tensors
        ``X̃ᵀX̃``, ``X̃ᵀX`` and ``XᵀX`` with one normalisation.
    fraction : float ≥ 0
        ``δ`` relative to the mean diagonal of ``G``.
    """
    fraction = check_ridge_fraction(fraction)
    if fraction == 0:
        return G, C, G0
    delta = fraction * float(torch.diagonal(G).mean())
    eye = delta * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return G + eye, C + eye.to(C.dtype), G0 + eye.to(G0.dtype)


def _psd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = b`` for a batch of PSD ``A`` (B, k, k), b (B, k) or (B, k, n) (n right-hand
    sides sharing each ``A``), float64.

    Cholesky where the factor is well conditioned; otherwise the minimum-norm solution
    through an eigen pseudo-inverse (relative cut-off 1e-12), exact when b ∈ range(A).
    """
    L, info = torch.linalg.cholesky_ex(A)
    diagL = torch.diagonal(L, dim1=-2, dim2=-1)
    scale = torch.diagonal(A, dim1=-2, dim2=-1).amax(dim=-1).clamp_min(1e-300)
    good = (info == 0) & ((diagL.amin(dim=-1) ** 2) > 1e-12 * scale)
    vector = b.dim() == A.dim() - 1
    rhs = b.unsqueeze(-1) if vector else b
    x = torch.empty_like(rhs)
    if bool(good.any()):
        # two triangular solves: far faster than batched ``cholesky_solve`` on CPU
        Lg = L[good]
        y = torch.linalg.solve_triangular(Lg, rhs[good], upper=False)
        x[good] = torch.linalg.solve_triangular(Lg.mT, y, upper=True)
    if not bool(good.all()):
        bad = ~good
        lam, U = torch.linalg.eigh(A[bad])
        cut = 1e-12 * lam.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        inv = torch.where(lam > cut, 1.0 / lam, torch.zeros_like(lam))
        x[bad] = U @ (inv[..., None] * (U.transpose(-1, -2) @ rhs[bad]))
    return x.squeeze(-1) if vector else x
