"""Sparsity patterns: which masks are feasible, and how scores round to a feasible mask.

A mask ``M`` has the shape of ``W`` (d_out × d_in); ``True`` = weight kept.

Patterns (CONTRACT.md):

``per-row:K``
    every row keeps exactly ``K`` weights. ``per-row:0.5`` (a decimal point) prunes that
    fraction of each row instead.
``nm:N:M``
    every block of ``M`` consecutive inputs of a row keeps exactly ``N``.
``unstructured:S``
    the whole layer keeps ``d_out·d_in − round(S·d_out·d_in)`` weights (S = pruned fraction).
``columns:K``
    ``K`` whole input channels (columns) kept, identical in every row; ``columns:0.3`` prunes
    that fraction of the columns.

Every pattern is a union of *groups* with a budget: the feasible set is
``{M ∈ {0,1}: Σ_{g} M = budget for each group g}`` (columns tie all rows of a column together).
Its convex hull replaces ``{0,1}`` by ``[0,1]``; ``round`` is the exact linear minimisation
oracle over that hull (top-``budget`` scores in each group), which Frank-Wolfe solvers use.

Ties are broken deterministically: among equal scores the lower input index is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

__all__ = [
    "PatternError",
    "PerRow",
    "NM",
    "Unstructured",
    "Columns",
    "Pattern",
    "parse_pattern",
    "topk_mask",
]


class PatternError(ValueError):
    """A pattern string is malformed or does not fit a layer's shape."""


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of each row of ``scores``, ties to the lower index.

    Parameters
    ----------
    scores : (..., n) tensor
    k : int, 0 ≤ k ≤ n

    Returns
    -------
    (..., n) bool tensor with exactly ``k`` True per row.
    """
    n = scores.shape[-1]
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    s = scores if scores.dtype in (torch.float32, torch.float64) else scores.to(torch.float32)
    s = torch.nan_to_num(s.detach(), nan=-float("inf"))
    # everything above each row's k-th largest score is kept, and of the scores equal to it
    # the lowest-indexed ones until the row has k
    kth = kth_largest(s, k)
    kept = s >= kth
    if bool((kept.sum(dim=-1) == k).all()):  # the usual case: no tie straddles the k-th place
        return kept
    above = s > kth
    tied = s == kth
    room = k - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= room))


def kth_largest(s: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k``-th largest value, a selection (not a sort).

    s : (..., n) float32 / float64 without NaN; 1 ≤ k ≤ n. Returns (..., 1) of ``s``'s dtype
    on its device. On the CPU it is numpy's introselect (``np.partition``), about ten times
    faster there than ``torch.topk`` (docs/DECISIONS.md, "Mask selection on the CPU");
    elsewhere ``torch.topk`` of the shorter side.
    """
    return _kth_by_partition(s, k) if s.device.type == "cpu" else _kth_by_topk(s, k)


def _kth_by_partition(s: torch.Tensor, k: int) -> torch.Tensor:
    n = s.shape[-1]
    part = np.partition(s.numpy(), n - k, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(part[..., n - k:n - k + 1]))


def _kth_by_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    n = s.shape[-1]
    if k <= n - k:
        return torch.topk(s, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    # the (n − k + 1)-th smallest
    return torch.topk(s, n - k + 1, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)


def _parse_count_or_fraction(text: str, what: str) -> tuple[int | None, float | None]:
    try:
        if "." in text or "e" in text.lower():
            f = float(text)
            if not 0.0 <= f < 1.0 or f != f:
                raise PatternError(f"{what}: pruned fraction must lie in [0, 1), got {text}")
            return None, f
        return int(text), None
    except ValueError as exc:
        if isinstance(exc, PatternError):
            raise
        raise PatternError(f"{what}: expected an integer count or a decimal fraction, got {text!r}") from None


def _pruned_count(fraction: float, n: int) -> int:
    return int(round(fraction * n))


@dataclass(frozen=True)
class PerRow:
    """Every row keeps exactly ``keep`` weights (or prunes ``fraction`` of its inputs)."""

    keep: int | None = None
    fraction: float | None = None

    name = "per-row"
    couples_rows = False

    def bind(self, d_out: int, d_in: int) -> "PerRow":
        """Resolve a fraction to a count for this layer width and check the range."""
        keep = self.keep if self.keep is not None else d_in - _pruned_count(self.fraction, d_in)
        if not 0 <= keep <= d_in:
            raise PatternError(f"per-row: K={keep} out of range [0, d_in={d_in}]")
        return PerRow(keep=keep)

    def budget(self, d_out: int, d_in: int) -> int:
        """Total number of kept weights."""
        return d_out * self.bind(d_out, d_in).keep

    def round(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-``keep`` scores of each row. scores: (d_out, d_in) → bool mask."""
        p = self.bind(*scores.shape)
        return topk_mask(scores, p.keep)

    def violation(self, mask: torch.Tensor) -> str | None:
        p = self.bind(*mask.shape)
        counts = mask.sum(dim=1)
        bad = (counts != p.keep).nonzero()
        if len(bad):
            r = int(bad[0])
            return f"row {r} keeps {int(counts[r])} weights, pattern needs {p.keep}"
        return None

    def __str__(self) -> str:
        return f"per-row:{self.keep}" if self.keep is not None else f"per-row:{self.fraction}"


@dataclass(frozen=True)
class NM:
    """``n`` kept in every block of ``m`` consecutive inputs of each row."""

    n: int
    m: int

    name = "nm"
    couples_rows = False

    def bind(self, d_out: int, d_in: int) -> "NM":
        if self.m <= 0 or not 0 <= self.n <= self.m:
            raise PatternError(f"nm: need 0 <= N <= M and M > 0, got {self.n}:{self.m}")
        if d_in % self.m:
            raise PatternError(f"nm: d_in={d_in} is not divisible by M={self.m}")
        return self

    def budget(self, d_out: int, d_in: int) -> int:
        self.bind(d_out, d_in)
        return d_out * (d_in // self.m) * self.n

    def round(self, scores: torch.Tensor) -> torch.Tensor:
        d_out, d_in = scores.shape
        self.bind(d_out, d_in)
        blocks = scores.reshape(d_out, d_in // self.m, self.m)
        return topk_mask(blocks, self.n).reshape(d_out, d_in)

    def violation(self, mask: torch.Tensor) -> str | None:
        d_out, d_in = mask.shape
        self.bind(d_out, d_in)
        counts = mask.reshape(d_out, d_in // self.m, self.m).sum(dim=2)
        bad = (counts != self.n).nonzero()
        if len(bad):
            r, b = (int(v) for v in bad[0])
            return f"row {r} block {b} keeps {int(counts[r, b])} of {self.m}, pattern needs {self.n}"
        return None

    def __str__(self) -> str:
        return f"nm:{self.n}:{self.m}"


@dataclass(frozen=True)
class Unstructured:
    """The whole layer keeps ``d_out·d_in − round(fraction·d_out·d_in)`` weights."""

    fraction: float

    name = "unstructured"
    couples_rows = True

    def bind(self, d_out: int, d_in: int) -> "Unstructured":
        if not 0.0 <= self.fraction < 1.0:
            raise PatternError(f"unstructured: pruned fraction must lie in [0, 1), got {self.fraction}")
        return self

    def budget(self, d_out: int, d_in: int) -> int:
        return d_out * d_in - _pruned_count(self.fraction, d_out * d_in)

    def round(self, scores: torch.Tensor) -> torch.Tensor:
        d_out, d_in = scores.shape
        return topk_mask(scores.reshape(1, -1), self.budget(d_out, d_in)).reshape(d_out, d_in)

    def violation(self, mask: torch.Tensor) -> str | None:
        need = self.budget(*mask.shape)
        have = int(mask.sum())
        return None if have == need else f"layer keeps {have} weights, pattern needs {need}"

    def __str__(self) -> str:
        return f"unstructured:{self.fraction}"


@dataclass(frozen=True)
class Columns:
    """``keep`` whole input channels kept (or ``fraction`` of the columns pruned)."""

    keep: int | None = None
    fraction: float | None = None

    name = "columns"
    couples_rows = True

    def bind(self, d_out: int, d_in: int) -> "Columns":
        keep = self.keep if self.keep is not None else d_in - _pruned_count(self.fraction, d_in)
        if not 0 <= keep <= d_in:
            raise PatternError(f"columns: K={keep} out of range [0, d_in={d_in}]")
        return Columns(keep=keep)

    def budget(self, d_out: int, d_in: int) -> int:
        return d_out * self.bind(d_out, d_in).keep

    def round(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the columns with the largest total score. scores: (d_out, d_in) or (d_in,)."""
        col = scores if scores.dim() == 1 else scores.to(torch.float64).sum(dim=0)
        d_in = col.shape[0]
        d_out = 1 if scores.dim() == 1 else scores.shape[0]
        keep = self.bind(d_out, d_in).keep
        cols = topk_mask(col.reshape(1, -1), keep).reshape(-1)
        return cols.expand(d_out, d_in).clone()

    def violation(self, mask: torch.Tensor) -> str | None:
        keep = self.bind(*mask.shape).keep
        if not bool((mask == mask[:1]).all()):
            return "columns: rows differ; a column must be kept or pruned in every row"
        have = int(mask[0].sum()) if mask.shape[0] else keep
        return None if have == keep else f"columns: {have} columns kept, pattern needs {keep}"

    def __str__(self) -> str:
        return f"columns:{self.keep}" if self.keep is not None else f"columns:{self.fraction}"


Pattern = Union[PerRow, NM, Unstructured, Columns]


def parse_pattern(text: str) -> Pattern:
    """Parse ``per-row:K | per-row:0.5 | nm:N:M | unstructured:S | columns:K | columns:0.3``."""
    parts = str(text).strip().split(":")
    kind = parts[0].lower()
    if kind == "per-row" and len(parts) == 2:
        keep, frac = _parse_count_or_fraction(parts[1], "per-row")
        return PerRow(keep=keep, fraction=frac)
    if kind == "columns" and len(parts) == 2:
        keep, frac = _parse_count_or_fraction(parts[1], "columns")
        return Columns(keep=keep, fraction=frac)
    if kind == "nm" and len(parts) == 3:
        try:
            n, m = int(parts[1]), int(parts[2])
        except ValueError:
            raise PatternError(f"nm: expected integers N:M, got {text!r}") from None
        if m <= 0 or not 0 <= n <= m:
            raise PatternError(f"nm: need 0 <= N <= M and M > 0, got {text!r}")
        return NM(n, m)
    if kind == "unstructured" and len(parts) == 2:
        try:
            s = float(parts[1])
        except ValueError:
            raise PatternError(f"unstructured: expected a pruned fraction, got {text!r}") from None
        return Unstructured(s).bind(1, 1)
    raise PatternError(
        f"unknown pattern {text!r}: use per-row:K, per-row:0.5, nm:N:M, unstructured:S or columns:K")

