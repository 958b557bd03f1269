"""Instance files (CONTRACT.md): an ``.npz`` holding ``W`` and ``G`` (or ``X`` instead of ``G``)."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .problem import LayerProblem, ProblemError

__all__ = ["load_instance", "save_instance", "atomic_write", "atomic_write_all", "check_writable",
           "check_parent_writable"]


#: the arrays an instance file may hold that this version reads (CONTRACT.md); others are ignored
_READ = ("W", "G", "X", "C", "G0")


def load_instance(path, *, pattern="per-row:0.5", objective: str = "mask") -> LayerProblem:
    """Read ``W`` and ``G`` (or ``X``) from an ``.npz`` and validate them into a problem.

    Extra arrays are ignored. The dense targets ``C`` and ``G0`` (CONTRACT.md) must come
    together, be d_in × d_in, finite and fit ``G`` (:meth:`LayerProblem.create` checks them);
    the problem's objective is then the CONTRACT error against the dense outputs. Raises
    :class:`ProblemError` with one clear line on any fault.
    """
    path = Path(path)
    if not path.exists():
        raise ProblemError(f"instance file not found: {path}")
    if not path.is_file():
        raise ProblemError(f"instance {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ProblemError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic[:2] != b"PK":  # .npz files are zip archives; np.load would try to unpickle others
        kind = "a .npy array" if magic[:4] == b"\x93NUM" else "not a zip archive"
        raise ProblemError(f"{path} is not an .npz instance file ({kind}); write one with numpy.savez(W=..., G=...)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k in _READ}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ProblemError(f"cannot read {path} as .npz: {_first_line(exc)}") from None
    if "W" not in arrays:
        raise ProblemError(f"{path} holds no array 'W'")
    if "G" not in arrays and "X" not in arrays:
        raise ProblemError(f"{path} holds neither 'G' nor 'X'")
    for name, a in arrays.items():
        if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
            raise ProblemError(f"{name} must be a float32 or float64 array, got {a.dtype}")
    G = arrays.get("G")
    X = None if G is not None else arrays["X"]
    return LayerProblem.create(arrays["W"], G, X=X, pattern=pattern, objective=objective,
                               C=arrays.get("C"), G0=arrays.get("G0"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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


def check_writable(path, *, what: str = "output") -> Path:
    """Check before any work that ``path`` can be written by :func:`atomic_write_all`; return it.

    The path must not be a directory or a special file, and its nearest existing ancestor
    must be a directory where a file can be created: a temporary file is created there and
    removed again (``os.access`` alone is fooled by e.g. ``/proc`` as root). Missing parent
    directories are fine (they are created when writing). Raises :class:`ProblemError`.
    """
    if str(path) == "":
        raise ProblemError(f"{what}: empty path")
    p = Path(path)
    if p.is_dir():
        raise ProblemError(f"{what} {p} is a directory")
    if p.exists() and not p.is_file():
        raise ProblemError(f"{what} {p} exists and is not a regular file")
    check_parent_writable(p, what=what)
    return p


def check_parent_writable(path, *, what: str = "output") -> None:
    """The nearest existing ancestor of ``path`` is a directory a file can be created in
    (a temporary file is created there and removed again). Raises :class:`ProblemError`."""
    p = Path(path)
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():  # a dangling link on the way
            raise ProblemError(f"cannot write {what} {p}: {anc} is a broken link")
        anc = anc.parent
    if not anc.is_dir():
        raise ProblemError(f"cannot write {what} {p}: {anc} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".layerprune-probe.", dir=anc)
    except OSError as exc:
        raise ProblemError(f"cannot write {what} {p}: {exc.strerror or exc} in {anc}") from None
    os.close(fd)
    os.unlink(probe)


def atomic_write_all(writes) -> None:
    """Write several files all or none: ``writes`` is a list of ``(path, write)`` pairs.

    Every ``write(tmp_path)`` goes to a temporary file beside its target (missing parent
    directories are created); only when all have been written are they renamed onto their
    targets. On any failure the temporaries and the directories made here are removed, and
    targets already renamed are put back as they were (a previous file is restored from a
    hard link taken before the renames), so a failure leaves the file system as it was.
    Raises :class:`OSError` (or whatever ``write`` raises).
    """
    items = [(Path(p), w) for p, w in writes]
    if len({os.path.abspath(p) for p, _ in items}) != len(items):
        raise ValueError("the same output path is given twice")
    made_dirs: list[Path] = []
    temps: list[tuple[str, Path]] = []
    backups: dict[Path, str] = {}
    renamed: list[Path] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, write in items:
            missing = []
            d = path.parent
            while not d.exists():
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                d.mkdir()
                made_dirs.append(d)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)
        for _, path in temps:  # keep what a rename would replace, to undo it on failure
            if path.is_file():
                fd, bak = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bak", dir=path.parent)
                os.close(fd)
                os.unlink(bak)
                try:
                    os.link(path, bak)
                except OSError:  # no hard links here: the old file cannot be restored
                    continue
                backups[path] = bak
        for tmp, path in temps:
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException:
        for path in reversed(renamed):
            if path in backups:
                os.replace(backups.pop(path), path)
            elif path.exists():
                path.unlink()
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for bak in backups.values():
            if os.path.exists(bak):
                os.unlink(bak)
        for d in reversed(made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    for bak in backups.values():
        os.unlink(bak)


def save_instance(path, W, G, *, C=None, G0=None, extras=None) -> None:
    """Write an instance file atomically (``W``, ``G`` and the dense targets ``C``, ``G0`` when
    given, as float64).

    ``extras`` : optional ``{name: array}`` written as they are (readers ignore them, CONTRACT.md;
    e.g. a cut's provenance). Names the CONTRACT reads (``W``, ``G``, ``X``, ``C``, ``G0``) and
    object arrays (which would need pickle to read) are refused with :class:`ProblemError`.
    """
    arrays = {"W": W, "G": G}
    if C is not None or G0 is not None:
        arrays.update(C=C, G0=G0)
    arrays = {k: (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float64)
              for k, a in arrays.items() if a is not None}
    for name, a in (extras or {}).items():
        if name in _READ:
            raise ProblemError(f"extra array {name!r} would be read as part of the instance")
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise ProblemError(f"extra array {name!r} holds Python objects (not readable without pickle)")
        arrays[name] = a

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)
