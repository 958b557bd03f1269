r"""Text for calibration and evaluation: bundled novels, local files, ``datasets`` names.

Bundled corpora come from two Debian packages of R data, read **without R and without root**:

- ``r-cran-janeaustenr``: Jane Austen's six novels (``emma``, ``mansfieldpark``,
  ``northangerabbey``, ``persuasion``, ``prideprejudice``, ``sensesensibility``), each a
  character vector of lines;
- ``r-cran-tokenizers``: ``mobydick``, one string (Project Gutenberg's e-text #2701).

:func:`prepare_bundled_corpora` is the one idempotent preparation step: ``apt-get download``
(works as an ordinary user) or an already-downloaded ``.deb`` in ``<cache>/debs/``, or an
installed R library, then ``dpkg-deb -x`` (or a pure-Python ``ar``/``tar`` reader), then the
R lazy-load database ``data/Rdata.rdx`` / ``Rdata.rdb`` decoded with the ``rdata`` package:
the ``.rdx`` index is a gzip-compressed R serialisation of a list whose ``variables`` entry
maps each object name to ``(offset, length)`` in the ``.rdb``; there each object is a 4-byte
big-endian uncompressed length followed by a zlib stream of another R serialisation. Each text
is written to ``<cache>/corpora/<name>.txt`` (UTF-8, ``\n`` line ends) atomically.

Texts are normalised to ``\n`` line ends without a byte-order mark; Moby Dick keeps only the
book between Project Gutenberg's ``*** START OF`` and ``*** END OF`` lines (the licence
boilerplate is not Melville).

Defaults: calibration on ``austen-calib`` (five Austen novels, fixed order), evaluation on
``persuasion`` (held-out Austen) and ``mobydick`` (another author): disjoint by construction.
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from layerprune.problems import atomic_write

__all__ = ["DataError", "CACHE_DIR", "BUNDLED", "DEFAULT_CALIBRATION", "DEFAULT_EVALUATION",
           "resolve_cache_dir", "prepare_bundled_corpora", "read_rdata_objects", "load_text", "text_name", "tokenize",
           "calibration_batch", "calibration_windows", "random_windows", "eval_tokens", "sources_overlap", "KNOWN_DATASETS"]


class DataError(RuntimeError):
    """A text source cannot be obtained or is unfit (one clear line)."""


def resolve_cache_dir(path=None) -> Path:
    """The cache directory: ``path``, else env ``LAYERPRUNE_CACHE``, else ``~/.cache/layerprune``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("LAYERPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerprune"


#: default cache directory (read at import; functions re-read the environment on each call)
CACHE_DIR = resolve_cache_dir()


@dataclass(frozen=True)
class Bundled:
    """A bundled text: one object of a Debian R-data package, or a group of such texts."""
    description: str
    package: Optional[str] = None  # Debian package holding it (None for a group)
    members: tuple = ()  # group members, concatenated in this order


_AUSTEN = "r-cran-janeaustenr"
_TOKENIZERS = "r-cran-tokenizers"

#: R package name inside each Debian package (``usr/lib/R/site-library/<name>``)
_R_NAME = {_AUSTEN: "janeaustenr", _TOKENIZERS: "tokenizers"}

BUNDLED: dict[str, Bundled] = {
    "sensesensibility": Bundled("Jane Austen, Sense and Sensibility (1811)", _AUSTEN),
    "prideprejudice": Bundled("Jane Austen, Pride and Prejudice (1813)", _AUSTEN),
    "mansfieldpark": Bundled("Jane Austen, Mansfield Park (1814)", _AUSTEN),
    "emma": Bundled("Jane Austen, Emma (1815)", _AUSTEN),
    "northangerabbey": Bundled("Jane Austen, Northanger Abbey (1817)", _AUSTEN),
    "persuasion": Bundled("Jane Austen, Persuasion (1817)", _AUSTEN),
    "mobydick": Bundled("Herman Melville, Moby-Dick (1851)", _TOKENIZERS),
    "austen-calib": Bundled("Austen's novels except Persuasion, in publication order",
                            members=("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                                     "northangerabbey")),
}

DEFAULT_CALIBRATION = "austen-calib"
DEFAULT_EVALUATION = ("persuasion", "mobydick")

#: ``datasets`` shortcuts: name -> (path, config, split, data_files, text column)
KNOWN_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", None, "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", None, "sentence"),
    "c4": ("allenai/c4", None, "validation",
           {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "text"),
}


def _files(package: str) -> list[str]:
    return [n for n, b in BUNDLED.items() if b.package == package]


def _expand(name: str) -> tuple:
    b = BUNDLED[name]
    return tuple(m for member in b.members for m in _expand(member)) if b.members else (name,)


# ---------------------------------------------------------------- bundled corpora: obtaining


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"layerprune: {msg}", file=sys.stderr)


def _cached_deb(debs: Path, package: str) -> Optional[Path]:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _apt_download(package: str, debs: Path) -> Path:
    """``apt-get download PACKAGE`` in a temporary directory; the ``.deb`` moved into ``debs``."""
    if shutil.which("apt-get") is None:
        raise DataError("apt-get not found")
    with tempfile.TemporaryDirectory(prefix="layerprune-apt-") as tmp:
        os.chmod(tmp, 0o755)  # lets apt's sandbox user write when run as root
        try:
            proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                                  text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DataError(f"apt-get download {package} failed: {exc}") from None
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not got:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.startswith("E:")]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            if "Unable to locate package" in why:
                why += " (the package lists are missing: run 'apt-get update' as root once)"
            raise DataError(f"apt-get download {package} failed: {why}")
        debs.mkdir(parents=True, exist_ok=True)
        target = debs / got[-1].name
        atomic_write(target, lambda tmp_path: (shutil.copyfile(got[-1], tmp_path), os.chmod(tmp_path, 0o644)))
        return target


def _read_ar(deb: Path) -> dict[str, bytes]:
    """Members of a Debian ``ar`` archive (name -> bytes)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{deb} is not a Debian package")
    out, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def _extract_deb(deb: Path, dest: Path) -> None:
    """``dpkg-deb -x DEB DEST``, or the same in pure Python where dpkg-deb is missing."""
    if shutil.which("dpkg-deb"):
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
    members = _read_ar(deb)
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise DataError(f"{deb} holds no data.tar member")
    if data[:4] == b"\x28\xb5\x2f\xfd":
        raise DataError(f"{deb} is zstd-compressed and dpkg-deb is not available to extract it")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(dest, filter="data")


def _rdata_dir(root: Path, package: str) -> Path:
    return root / "usr" / "lib" / "R" / "site-library" / _R_NAME[package] / "data"


def _installed_rdata(package: str) -> Optional[Path]:
    """An R library already installed on the system holding the data (no download needed)."""
    for lib in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"):
        d = Path(lib) / _R_NAME[package] / "data"
        if (d / "Rdata.rdx").is_file() and (d / "Rdata.rdb").is_file():
            return d
    return None


def read_rdata_objects(data_dir: Path, names: Optional[Sequence[str]] = None) -> dict:
    """Objects of an R lazy-load database ``data_dir/Rdata.{rdx,rdb}``, decoded by ``rdata``.

    Returns name -> converted Python object (character vectors become numpy string arrays).
    """
    import rdata
    import warnings

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    try:
        index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
        rdb = (data_dir / "Rdata.rdb").read_bytes()
        out = {}
        for name, (offset, length) in variables.items():
            if names is not None and name not in names:
                continue
            block = rdb[offset:offset + length]
            size = int.from_bytes(block[:4], "big")
            raw = zlib.decompress(block[4:])
            if len(raw) != size:
                raise DataError(f"R object {name!r}: {len(raw)} bytes, index says {size}")
            out[name] = parse(raw)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding fault is one clear error
        raise DataError(f"cannot read R data in {data_dir}: {type(exc).__name__}: {exc}") from None
    return out


def _to_text(name: str, obj) -> str:
    """An R character vector (lines, or one string) as one ``\\n``-terminated text."""
    lines = ["" if s is None else str(s) for s in list(obj)]
    text = "\n".join(lines).replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    if name == "mobydick":
        text = _strip_gutenberg(text)
    return text.strip("\n") + "\n"


def _strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's ``*** START OF`` and ``*** END OF`` lines."""
    start = text.find("*** START OF")
    if start >= 0:
        text = text[text.find("\n", start) + 1:]
    ends = [i for i in (text.find("*** END OF"), text.find("End of Project Gutenberg")) if i >= 0]
    return text[:min(ends)] if ends else text


def prepare_bundled_corpora(cache_dir=None, *, quiet: bool = False) -> Path:
    """Make every bundled text available as ``<cache>/corpora/<name>.txt``; idempotent.

    For each Debian package whose texts are missing: use an installed R library if there is
    one, else a ``.deb`` in ``<cache>/debs/``, else ``apt-get download`` it (no root needed);
    extract it, decode its R data and write each text atomically. Texts already present are
    not touched.

    Returns
    -------
    Path
        The ``corpora`` directory.

    Raises
    ------
    DataError
        If a package can be neither found nor downloaded (no apt-get, no network, …).
    """
    root = resolve_cache_dir(cache_dir)
    corpora, debs = root / "corpora", root / "debs"
    for package in (_AUSTEN, _TOKENIZERS):
        wanted = _files(package)
        missing = [n for n in wanted if not _ready(corpora / f"{n}.txt")]
        if not missing:
            continue
        with tempfile.TemporaryDirectory(prefix="layerprune-deb-") as tmp:
            data_dir = _installed_rdata(package)
            if data_dir is None:
                deb = _cached_deb(debs, package)
                if deb is None:
                    _say(quiet, f"downloading Debian package {package} (apt-get download) ...")
                    try:
                        deb = _apt_download(package, debs)
                    except DataError as exc:
                        raise DataError(
                            f"cannot obtain the bundled texts: {exc}. Put {package}_*.deb "
                            f"(from any Debian mirror) into {debs}, or pass --calib/--eval "
                            f"text files") from None
                _extract_deb(deb, Path(tmp))
                data_dir = _rdata_dir(Path(tmp), package)
                if not (data_dir / "Rdata.rdx").is_file():
                    raise DataError(f"{deb.name} holds no R data at {data_dir.relative_to(tmp)}")
            objects = read_rdata_objects(data_dir, missing)
            for name in missing:
                if name not in objects:
                    raise DataError(f"{package} holds no R object {name!r}")
                text = _to_text(name, objects[name])
                atomic_write(corpora / f"{name}.txt", lambda p, t=text: _write_text(p, t))
            _say(quiet, f"prepared {', '.join(missing)} in {corpora}")
    return corpora


def _write_text(path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")
    os.chmod(path, 0o644)


def _ready(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# ---------------------------------------------------------------- loading texts


def _is_dataset(source: str) -> bool:
    return source.startswith("hf:") or source in KNOWN_DATASETS


def load_text(source: Union[str, os.PathLike], cache_dir=None) -> str:
    """The text of ``source``.

    ``source`` is, in this order of precedence: a bundled name (:data:`BUNDLED`, prepared on
    demand), a known dataset name (:data:`KNOWN_DATASETS`) or ``hf:NAME[:CONFIG[:SPLIT]]``
    (needs the ``datasets`` package and a network or its cache), a text file, or a directory
    (its ``*.txt`` files concatenated in sorted order, separated by a blank line). Write
    ``./emma`` for a file that shares a bundled name.

    Raises
    ------
    DataError
        Unknown, unreadable or empty source.
    """
    if isinstance(source, str) and source in BUNDLED:
        corpora = prepare_bundled_corpora(cache_dir, quiet=False)
        parts = [_read_file(corpora / f"{n}.txt") for n in _expand(source)]
        return "\n\n".join(p.strip("\n") for p in parts) + "\n"
    if isinstance(source, str) and _is_dataset(source):
        return _nonempty(_load_dataset(source), source)
    path = Path(source).expanduser()
    if path.is_file():
        return _nonempty(_read_file(path), path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"directory {path} holds no *.txt files")
        return _nonempty("\n\n".join(_read_file(p).strip("\n") for p in files) + "\n", path)
    raise DataError(f"unknown text source {str(source)!r}: not a bundled name "
                    f"({', '.join(BUNDLED)}), dataset name ({', '.join(KNOWN_DATASETS)}, "
                    f"hf:NAME[:CONFIG[:SPLIT]]), file or directory")


def _nonempty(text: str, source) -> str:
    if not text.strip():
        raise DataError(f"text source {str(source)!r} is empty")
    return text


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").lstrip("\ufeff").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_dataset(source: str) -> str:
    """A ``datasets`` split's text column, joined by blank lines (as SparseGPT/Wanda do)."""
    if source in KNOWN_DATASETS:
        path, config, split, data_files, column = KNOWN_DATASETS[source]
    else:
        parts = source[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise DataError(f"bad dataset source {source!r}: want hf:NAME[:CONFIG[:SPLIT]]")
        path, config, split = parts[0], parts[1] if len(parts) > 1 and parts[1] else None, \
            parts[2] if len(parts) > 2 else "test"
        data_files, column = None, None
    try:
        import datasets
    except ImportError:
        raise DataError(f"text source {source!r} needs the 'datasets' package "
                        f"(pip install datasets) and a network") from None
    try:
        ds = datasets.load_dataset(path, config, split=split, data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - network, missing split, …: one clear line
        raise DataError(f"cannot load dataset {source!r}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if column is None:
        column = "text" if "text" in ds.column_names else next(
            (c for c in ds.column_names if str(ds.features[c]).startswith("Value('string")
             or getattr(ds.features[c], "dtype", None) == "string"), None)
        if column is None:
            raise DataError(f"dataset {source!r} has no text column ({', '.join(ds.column_names)})")
    return "\n\n".join(ds[column])


def text_name(source) -> str:
    """Short name of a text source for reports: the bundled or dataset name, or the file stem."""
    if isinstance(source, str) and (source in BUNDLED or source in KNOWN_DATASETS):
        return source
    if isinstance(source, str) and source.startswith("hf:"):
        return source[3:].replace("/", "-").replace(":", "-")
    path = Path(source)
    return path.stem if path.suffix else path.name or str(source)


def sources_overlap(a, b) -> bool:
    """Whether two text sources share text (bundled groups expanded, paths resolved)."""
    def parts(s):
        if isinstance(s, str) and s in BUNDLED:
            return set(_expand(s))
        if isinstance(s, str) and _is_dataset(s):
            return {s}
        p = Path(s).expanduser().resolve()
        return set(p.glob("*.txt")) if p.is_dir() else {p}
    return bool(parts(a) & parts(b))


# ---------------------------------------------------------------- tokens

#: characters per tokenizer call (long texts are cut at line or word boundaries)
CHUNK_CHARS = 100_000


def _chunks(text: str, size: int) -> list[str]:
    r"""Cut ``text`` into pieces of about ``size`` characters at boundaries a BPE pre-tokenizer
    also splits at: after a ``\n`` that follows a non-space and precedes a non-space, else
    before a single space that precedes a letter or digit, else anywhere."""
    out, start, n = [], 0, len(text)
    while n - start > size:
        cut = -1
        lo, hi = start + size // 2, start + size
        pos = text.rfind("\n", lo, hi)
        while pos > lo and cut < 0:
            if not text[pos - 1].isspace() and pos + 1 < n and not text[pos + 1].isspace():
                cut = pos + 1
            else:
                pos = text.rfind("\n", lo, pos)
        if cut < 0:
            pos = text.rfind(" ", lo, hi)
            while pos > lo and cut < 0:
                if not text[pos - 1].isspace() and pos + 1 < n and text[pos + 1].isalnum():
                    cut = pos
                else:
                    pos = text.rfind(" ", lo, pos)
        if cut < 0:
            cut = hi
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return [c for c in out if c]


def _encode(tokenizer, pieces: list[str]) -> list[list[int]]:
    try:
        enc = tokenizer(pieces, add_special_tokens=False, verbose=False)
    except TypeError:  # tokenizers without the ``verbose`` keyword
        enc = tokenizer(pieces, add_special_tokens=False)
    return enc["input_ids"]


def tokenize(tokenizer, text: str, max_tokens: Optional[int] = None, *,
             chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), shape ``(T,)``, at most ``max_tokens``.

    The text is cut into pieces of about ``chunk_chars`` characters at whitespace boundaries
    that the tokenizer's pre-tokenizer splits at anyway, so long texts neither trigger the
    maximum-length warning nor change their tokens; with ``max_tokens`` only as many pieces
    as needed are encoded.
    """
    pieces = _chunks(text, chunk_chars)
    parts: list[torch.Tensor] = []  # one tensor per call: no list of a million Python ints
    count = 0
    batch = 8  # pieces per tokenizer call (the fast tokenizer parallelises a batch)
    for i in range(0, len(pieces), batch):
        rows = _encode(tokenizer, pieces[i:i + batch])
        part = torch.tensor([t for row in rows for t in row], dtype=torch.long)
        parts.append(part)
        count += part.numel()
        if max_tokens is not None and count >= max_tokens:
            break
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens].clone()
    return ids


def calibration_batch(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` consecutive tokens of ``text``.

    The text is tokenized once; start offsets are drawn uniformly from ``[0, T − seqlen]``
    with a ``torch.Generator`` seeded by ``seed`` (windows may overlap, as in Wanda and
    SparseGPT).

    Returns
    -------
    torch.LongTensor
        Shape ``(nsamples, seqlen)``.

    Raises
    ------
    DataError
        When ``T < nsamples·seqlen`` or ``T < seqlen + 1``: the text cannot supply as many
        tokens as requested, "text too short for N×L calibration tokens (has T tokens)".
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"need nsamples ≥ 1 and seqlen ≥ 1, got {nsamples} × {seqlen}")
    return calibration_windows(tokenize(tokenizer, text), nsamples, seqlen, seed)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """:func:`calibration_batch` of an already tokenized text ``ids``, shape ``(T,)``.

    Raises
    ------
    DataError
        When ``T < nsamples·seqlen`` or ``T < seqlen + 1``.
    """
    T = int(ids.numel())
    if T < max(nsamples * seqlen, seqlen + 1):
        raise DataError(f"text too short for {nsamples}×{seqlen} calibration tokens (has {T} tokens)")
    return random_windows(ids, nsamples, seqlen, seed)


def random_windows(ids: torch.Tensor, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``seqlen`` consecutive tokens of ``ids`` (1-D, ``T ≥ seqlen + 1``
    tokens), their starts drawn uniformly from ``[0, T − seqlen]`` by a ``torch.Generator``
    seeded by ``seed``; windows may overlap and repeat.

    Returns
    -------
    torch.LongTensor
        Shape ``(count, seqlen)``.
    """
    ids = ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise DataError(f"text too short for one window of {seqlen} tokens (has {ids.numel()} tokens)")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=gen)
    return ids[starts[:, None] + torch.arange(seqlen)[None, :]]


def eval_tokens(tokenizer, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of ``text`` (all when ``None``), shape ``(1, T)``."""
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be ≥ 1, got {max_tokens}")
    ids = tokenize(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise DataError(f"evaluation text has {ids.numel()} tokens; need at least 2")
    return ids[None, :]
