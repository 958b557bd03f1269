"""Instance files (CONTRACT.md): an ``.npz`` holding ``W`` and ``G`` (or ``X`` instead of ``G``)."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .problem import LayerProblem, ProblemError

__all__ = ["load_instance", "save_instance", "atomic_write"]


def load_instance(path, *, pattern="per-row:0.5", objective: str = "mask") -> LayerProblem:
    """Read ``W`` and ``G`` (or ``X``) from an ``.npz`` and validate them into a problem.

    Extra arrays are ignored. Raises :class:`ProblemError` with one clear line on any fault.
    """
    path = Path(path)
    if not path.is_file():
        raise ProblemError(f"instance file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k in ("W", "G", "X")}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ProblemError(f"cannot read {path} as .npz: {exc}") from None
    if "W" not in arrays:
        raise ProblemError(f"{path} holds no array 'W'")
    if "G" not in arrays and "X" not in arrays:
        raise ProblemError(f"{path} holds neither 'G' nor 'X'")
    G = arrays.get("G")
    X = None if G is not None else arrays["X"]
    return LayerProblem.create(arrays["W"], G, X=X, pattern=pattern, objective=objective)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (same directory).

    The file gets the ordinary permissions the umask allows (a temporary file is private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_instance(path, W, G) -> None:
    """Write an instance file atomically (``W``, ``G`` as float64)."""
    W = W.detach().cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W)
    G = G.detach().cpu().numpy() if isinstance(G, torch.Tensor) else np.asarray(G)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, W=W.astype(np.float64), G=G.astype(np.float64))

    atomic_write(path, write)
