r"""The instance library: sub-instances cut from a layer, and where they came from.

A real layer (``W``: d_out × d_in, ``G = XᵀX/n``: d_in × d_in) is too large for exact solvers;
a *sub-instance* keeps a few output rows ``R`` and ``k`` input channels ``S``:

``W_sub = W[R, S]`` (|R| × k) and ``G_sub = G[S, S]`` (the principal block of ``G``; likewise
``C_sub = C[S, S]``, ``G0_sub = G0[S, S]`` for dense targets).

``G_sub`` is exactly the Gram matrix of the calibration inputs restricted to ``S``
(``X[:, S]ᵀX[:, S]/n``), so a sub-instance is the true layer-wise problem of a layer that only
has the inputs ``S`` and the rows ``R``: its error counts only the interactions among the
channels kept in the cut (the pruned channels outside ``S`` are, in the full layer, coupled to
these through ``G``; the cut leaves that coupling out). It stays symmetric PSD.

Channel selection (``select_channels``), with the Wanda-style column score over the chosen rows

``s_j = Σ_{r∈R} |W_rj| · sqrt(G_jj)``  (``sqrt(G_jj) = ‖X_j‖₂/√n``, Wanda's activation norm),

- ``wanda``: the ``k`` channels with the largest ``s_j`` — the weights a pruner most wants to
  keep, where keep/prune decisions are hardest to separate from their neighbours;
- ``random``: ``k`` channels uniformly at random (seeded) — a typical slice of the layer;
- ``outliers``: the ``max(1, k // 8)`` channels with the largest activation scale
  ``sqrt(G_jj)`` (the activation outliers of LLMs) are always included, the rest drawn at random
  (seeded). The rest is random rather than by ``s_j``: the Wanda score already favours large
  ``sqrt(G_jj)`` (on layers with strong outliers the loudest channels are nearly all in the
  Wanda top-k; docs/DECISIONS.md), so a Wanda rest would mostly repeat ``wanda``; outliers
  among typical channels is the case that differs.

Ties are broken by the lower channel index (stable sort); returned indices are ascending, so the
cut keeps the layer's channel order. ``Provenance`` records where a cut came from; it is stored
in the instance file as the extra array ``provenance`` (a JSON string, read without pickle),
which :func:`load_instance` ignores (CONTRACT.md: extra arrays are ignored).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .io import save_instance
from .problem import ProblemError

__all__ = ["CHANNEL_RULES", "ROW_RULES", "PROVENANCE_KEY", "Provenance", "column_scores", "select_channels",
           "select_rows", "cut_instance", "save_cut", "read_provenance"]

#: channel selection rules of :func:`select_channels`
CHANNEL_RULES = ("wanda", "random", "outliers")
#: row selection rules of :func:`select_rows`
ROW_RULES = ("random", "first")
#: name of the extra array holding the provenance in an instance file
PROVENANCE_KEY = "provenance"
#: bumped when the provenance's fields change meaning
PROVENANCE_VERSION = 1


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties to the lower index; ascending."""
    order = torch.sort(-scores.to(torch.float64).cpu(), stable=True).indices
    return torch.sort(order[:k]).values


def column_scores(W, G, rows=None) -> torch.Tensor:
    """Wanda-style column scores ``s_j = Σ_{r∈rows} |W_rj|·sqrt(G_jj)``.

    Parameters
    ----------
    W : (d_out, d_in) array or tensor
    G : (d_in, d_in) array or tensor
    rows : indices of the rows summed over (default: all)

    Returns
    -------
    (d_in,) float64 tensor on the CPU.
    """
    W, G = _as_tensor(W).to(torch.float64).cpu(), _as_tensor(G).to(torch.float64).cpu()
    if rows is not None:
        W = W[torch.as_tensor(rows, dtype=torch.long)]
    return W.abs().sum(0) * torch.diagonal(G).clamp_min(0).sqrt()


def select_rows(W, n_rows: int, how: str = "random", seed: int = 0) -> torch.Tensor:
    """``n_rows`` output rows of ``W``: ``random`` (seeded, uniform without replacement) or
    ``first``. Returns an ascending (n_rows,) LongTensor; raises :class:`ProblemError`."""
    d_out = int(_as_tensor(W).shape[0])
    if how not in ROW_RULES:
        raise ProblemError(f"row rule must be one of {', '.join(ROW_RULES)}, got {how!r}")
    if not 1 <= n_rows <= d_out:
        raise ProblemError(f"rows must be in 1..{d_out} (the layer's d_out), got {n_rows}")
    if how == "first":
        return torch.arange(n_rows)
    return torch.sort(torch.randperm(d_out, generator=_generator(seed))[:n_rows]).values


def select_channels(W, G, size: int, how: str, *, rows=None, seed: int = 0) -> torch.Tensor:
    """``size`` input channels by rule ``how`` (module docstring: ``wanda``, ``random``, ``outliers``).

    Parameters
    ----------
    W : (d_out, d_in); G : (d_in, d_in)
    size : channels kept, 1 ≤ size ≤ d_in
    how : one of :data:`CHANNEL_RULES`
    rows : rows the Wanda score sums over (default: all)
    seed : seed of the random choices

    Returns
    -------
    (size,) LongTensor of ascending channel indices.
    """
    d_in = int(_as_tensor(W).shape[1])
    if how not in CHANNEL_RULES:
        raise ProblemError(f"channel rule must be one of {', '.join(CHANNEL_RULES)}, got {how!r}")
    if not 1 <= size <= d_in:
        raise ProblemError(f"size must be in 1..{d_in} (the layer's d_in), got {size}")
    if how == "wanda":
        return _top(column_scores(W, G, rows), size)
    gen = _generator(seed)
    if how == "random":
        return torch.sort(torch.randperm(d_in, generator=gen)[:size]).values
    scale = torch.diagonal(_as_tensor(G)).to(torch.float64).cpu().clamp_min(0).sqrt()
    outliers = _top(scale, max(1, size // 8))
    rest = torch.ones(d_in, dtype=torch.bool)
    rest[outliers] = False
    others = torch.nonzero(rest).flatten()
    drawn = others[torch.randperm(others.numel(), generator=gen)[:size - outliers.numel()]]
    return torch.sort(torch.cat([outliers, drawn])).values


def cut_instance(W, G, rows, channels, *, C=None, G0=None) -> tuple:
    """The sub-instance on ``rows`` × ``channels``: ``(W[rows][:, channels], G[channels][:, channels])``,
    followed by ``C_sub, G0_sub`` (the same principal blocks) when the dense targets are given.

    Arrays keep their type (tensor or ndarray) and dtype; raises :class:`ProblemError` on
    indices out of range, repeated, or a ``C`` without ``G0``.
    """
    if (C is None) != (G0 is None):
        raise ProblemError("give the dense targets C and G0 together, or neither")
    d_out, d_in = tuple(W.shape)
    r, s = _indices(rows, d_out, "rows"), _indices(channels, d_in, "channels")

    def block(M):
        return M[np.ix_(s, s)] if isinstance(M, np.ndarray) else M[s][:, s]

    W_sub = W[np.ix_(r, s)] if isinstance(W, np.ndarray) else W[r][:, s]
    out = (W_sub, block(G))
    return out if C is None else out + (block(C), block(G0))


def _indices(idx, n: int, what: str) -> np.ndarray:
    a = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
    if a.size == 0:
        raise ProblemError(f"{what}: no indices given")
    if a.min() < 0 or a.max() >= n:
        raise ProblemError(f"{what}: indices must be in 0..{n - 1}, got {int(a.min())}..{int(a.max())}")
    if np.unique(a).size != a.size:
        raise ProblemError(f"{what}: repeated indices")
    return a


@dataclass(frozen=True)
class Provenance:
    """Where a sub-instance came from: enough to cut it again.

    Attributes
    ----------
    model : model name or path as given (``"smollm2"`` = the bundled SmolLM2-135M-Instruct)
    block : decoder block index
    layer : the linear's short name (``"q_proj"``); ``module`` its qualified name
    rows, channels : the kept output rows and input channels of the full layer (ascending)
    how : channel rule (:data:`CHANNEL_RULES`); ``row_rule``: row rule (:data:`ROW_RULES`)
    calib, nsamples, seqlen : calibration text source, windows and tokens per window
    seed : seed of the calibration windows and of the random choices (a cutter may derive
        per-layer seeds from it; ``rows`` and ``channels`` record what was drawn)
    layer_shape : the full layer's ``(d_out, d_in)``
    """

    model: str
    block: int
    layer: str
    rows: tuple[int, ...]
    channels: tuple[int, ...]
    how: str
    calib: str
    nsamples: int
    seqlen: int
    seed: int
    module: str = ""
    row_rule: str = "random"
    layer_shape: tuple[int, ...] = ()
    version: int = PROVENANCE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Provenance":
        raw = json.loads(text)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ProblemError(f"provenance has unknown fields: {', '.join(unknown)}")
        for key in ("rows", "channels", "layer_shape"):
            if key in raw:
                raw[key] = tuple(int(v) for v in raw[key])
        return cls(**raw)


def save_cut(path, W_sub, G_sub, provenance: Provenance, *, C=None, G0=None) -> None:
    """Write a sub-instance atomically as a CONTRACT instance file with its provenance."""
    save_instance(path, W_sub, G_sub, C=C, G0=G0,
                  extras={PROVENANCE_KEY: np.array(provenance.to_json())})


def read_provenance(path) -> Optional[Provenance]:
    """The :class:`Provenance` stored in an instance file, or ``None`` when it holds none.

    Raises :class:`ProblemError` when the file cannot be read or the record is malformed.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if PROVENANCE_KEY not in data.files:
                return None
            text = str(data[PROVENANCE_KEY][()])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ProblemError(f"cannot read {path}: {exc}") from None
    try:
        return Provenance.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ProblemError(f"{path}: malformed provenance: {exc}") from None
