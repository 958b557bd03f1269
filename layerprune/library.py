r"""Cut real sub-instances from a model's layers (the instance library; CONTRACT.md's ``cut`` key).

A :class:`CutSpec` names blocks, layers, sizes, rows and a channel rule;
:func:`cut_model_instances` loads the model once, captures the Gram matrix of each named block
(:func:`layerprune.pipeline.capture.iter_layer_problems`: one pass through the model up to
the last named block; the dense model's inputs from seeded
calibration windows, as ``layerprune prune`` builds them), and writes one CONTRACT instance
file per (block, layer, size):

- rows: ``rows`` output rows drawn at random (seeded), the same rows for every size of a layer;
- channels: ``size`` input channels by the spec's rule (``wanda`` | ``random`` | ``outliers``,
  :mod:`layerprune.problems.library`); with one seed the channel sets of a layer are nested
  across sizes (a top-k or a prefix of one random permutation) except ``outliers``, whose
  always-kept outliers grow with the size (``max(1, size // 8)``);
- ``W_sub = W[rows, channels]``, ``G_sub = G[channels, channels]``, with a
  :class:`~layerprune.problems.library.Provenance` stored as an extra array.

Random choices use a seed derived from ``(seed, block, layer)`` (CRC-32 of their text), so
layers of the same shape get different rows; the provenance records the indices themselves.
File names are deterministic: ``{model}-b{block}-{layer}-{size}-r{rows}-{channels}-s{seed}.npz``.
"""
from __future__ import annotations

import re
import sys
import time
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from layerprune.problems import ProblemError
from layerprune.problems.io import check_parent_writable
from layerprune.problems.library import (CHANNEL_RULES, Provenance, cut_instance, read_provenance, save_cut,
                                         select_channels, select_rows)

__all__ = ["CutSpec", "parse_cut", "cut_model_instances", "instance_path", "BUNDLED_SHAPES"]

#: the bundled SmolLM2-135M's blocks and its linears' (d_out, d_in): a spec for it is checked
#: against these before any model is loaded (other models are checked once loaded)
BUNDLED_BLOCKS = 30
BUNDLED_SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                  "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
_BUNDLED_NAMES = ("smollm2", "SmolLM2-135M-Instruct")
_ROW_RULE = "random"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class CutSpec:
    """What to cut. Validated on construction (:class:`ValueError`, one line naming the key).

    Attributes
    ----------
    model : ``"smollm2"`` (the bundled SmolLM2-135M-Instruct), a model directory, ``.gguf`` or hub id
    blocks : decoder block indices (0-based, distinct)
    layers : linear short names within a block (``"q_proj"``, ``"down_proj"``, …; distinct)
    sizes : input channels per instance (distinct, each ≤ the layer's d_in)
    rows : output rows per instance (≤ the layer's d_out); one instance per (block, layer, size)
    channels : channel rule, ``wanda`` | ``random`` | ``outliers``
    seed : seed of the calibration windows and of the random rows/channels
    nsamples, seqlen : calibration windows and tokens per window (small: a Gram of a few
        thousand tokens is plenty for instances of ≤ 64 channels; ``prune`` uses 64 × 256)
    calib : calibration text (:func:`layerprune.data.load_text`: a bundled name, file, directory
        or dataset name); default ``austen-calib``, as ``layerprune prune``
    """

    model: str = "smollm2"
    blocks: tuple[int, ...]
    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    rows: int
    channels: str
    seed: int = 0
    nsamples: int = 16
    seqlen: int = 128
    calib: str = "austen-calib"

    def __post_init__(self):
        for key in ("blocks", "layers", "sizes"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        _check_spec(self)

    @property
    def bundled(self) -> bool:
        return self.model in _BUNDLED_NAMES

    def model_tag(self) -> str:
        """The model's part of a file name: ``smollm2``, or the path's last part, sanitised."""
        if self.bundled:
            return "smollm2"
        return re.sub(r"[^A-Za-z0-9_.]+", "_", Path(self.model.rstrip("/")).name) or "model"


def _fail(key: str, why: str):
    raise ValueError(f"cut.{key}: {why}")


def _check_spec(spec: CutSpec) -> None:
    if not isinstance(spec.model, str) or not spec.model.strip():
        _fail("model", f"must be a non-empty string, got {spec.model!r}")
    _check_list(spec.blocks, "blocks", lambda b: _is_int(b) and b >= 0, "a non-negative integer")
    _check_list(spec.layers, "layers", lambda n: isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9_.]+", n),
                "a layer name such as 'q_proj'")
    _check_list(spec.sizes, "sizes", lambda s: _is_int(s) and s >= 1, "a positive integer")
    if not _is_int(spec.rows) or spec.rows < 1:
        _fail("rows", f"must be a positive integer, got {spec.rows!r}")
    if spec.channels not in CHANNEL_RULES:
        _fail("channels", f"must be one of {', '.join(CHANNEL_RULES)}, got {spec.channels!r}")
    for key in ("seed", "nsamples", "seqlen"):
        v, low = getattr(spec, key), (0 if key == "seed" else 1)
        if not _is_int(v) or v < low:
            _fail(key, f"must be an integer ≥ {low}, got {v!r}")
    if not isinstance(spec.calib, str) or not spec.calib.strip():
        _fail("calib", f"must be a non-empty string, got {spec.calib!r}")
    if spec.bundled:
        _check_bundled(spec)


def _check_list(values, key: str, ok, what: str) -> None:
    if not values:
        _fail(key, "must be a non-empty list")
    for v in values:
        if not ok(v):
            _fail(key, f"each entry must be {what}, got {v!r}")
    if len(set(values)) != len(values):
        _fail(key, f"repeated entries in {list(values)}")


def _check_bundled(spec: CutSpec) -> None:
    """The spec against the bundled model's known structure (no model loaded)."""
    for b in spec.blocks:
        if b >= BUNDLED_BLOCKS:
            _fail("blocks", f"block {b} out of range: smollm2 has {BUNDLED_BLOCKS} blocks (0..{BUNDLED_BLOCKS - 1})")
    for name in spec.layers:
        if name not in BUNDLED_SHAPES:
            _fail("layers", f"unknown layer {name!r}; smollm2's are {', '.join(BUNDLED_SHAPES)}")
    _check_shapes(spec, {name: BUNDLED_SHAPES[name] for name in spec.layers}, "smollm2")


def _check_shapes(spec: CutSpec, shapes: dict[str, tuple[int, int]], where: str) -> None:
    for name, (d_out, d_in) in shapes.items():
        if spec.rows > d_out:
            _fail("rows", f"{spec.rows} rows exceed {where} {name}'s d_out = {d_out}")
        big = [s for s in spec.sizes if s > d_in]
        if big:
            _fail("sizes", f"size {big[0]} exceeds {where} {name}'s d_in = {d_in}")


def parse_cut(raw: dict) -> CutSpec:
    """A validated :class:`CutSpec` from a study spec's ``cut`` table.

    Raises :class:`ValueError` with one line naming the key: unknown or missing key, wrong type
    or value, and (for ``smollm2``, whose structure is known without loading it) a block out of
    range, an unknown layer name, rows or sizes larger than the layer.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"cut: must be a table, got {type(raw).__name__}")
    known = {f.name for f in fields(CutSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"cut: unknown key {unknown[0]!r} (known: {', '.join(f.name for f in fields(CutSpec))})")
    for key in ("blocks", "layers", "sizes", "rows", "channels"):
        if key not in raw:
            _fail(key, "missing")
    values = dict(raw)
    for key in ("blocks", "layers", "sizes"):
        if not isinstance(values[key], (list, tuple)):
            _fail(key, f"must be a list, got {values[key]!r}")
    return CutSpec(**values)


def instance_path(spec: CutSpec, out_dir: Path, block: int, layer: str, size: int) -> Path:
    """The file of one (block, layer, size) of ``spec`` in ``out_dir``."""
    return Path(out_dir) / (f"{spec.model_tag()}-b{block}-{layer}-{size}-r{spec.rows}-"
                            f"{spec.channels}-s{spec.seed}.npz")


def _matches(prov: Optional[Provenance], spec: CutSpec, block: int, layer: str, size: int) -> bool:
    """Whether a stored provenance is that of this spec's (block, layer, size) (the bundled
    model's two names are one model)."""
    same_model = prov is not None and (prov.model == spec.model or {prov.model, spec.model} <= set(_BUNDLED_NAMES))
    return (same_model and prov.block == block and prov.layer == layer
            and len(prov.channels) == size and len(prov.rows) == spec.rows and prov.how == spec.channels
            and prov.seed == spec.seed and prov.nsamples == spec.nsamples and prov.seqlen == spec.seqlen
            and prov.calib == spec.calib and prov.row_rule == _ROW_RULE)


def _plan(spec: CutSpec, out_dir: Path) -> dict[tuple[int, str, int], Path]:
    """Every (block, layer, size) → file; checks the existing ones (ValueError on a foreign file)."""
    plan = {}
    for block in spec.blocks:
        for layer in spec.layers:
            for size in spec.sizes:
                path = instance_path(spec, out_dir, block, layer, size)
                if path.exists():
                    try:
                        prov = read_provenance(path) if path.is_file() else None
                    except ProblemError:
                        prov = None
                    if not _matches(prov, spec, block, layer, size):
                        raise ValueError(f"{path} exists and is not this cut's instance (other calibration "
                                         f"settings or not a cut file): remove it or choose another directory")
                else:
                    check_parent_writable(path, what="instance")
                plan[(block, layer, size)] = path
    return plan


def _say(message: str) -> None:
    print(f"layerprune cut: {message}", file=sys.stderr, flush=True)


def _sub_seed(spec: CutSpec, block: int, layer: str) -> int:
    return zlib.crc32(f"{spec.seed}-{block}-{layer}".encode())


def _resolve_layers(spec: CutSpec, linears: dict, block: int) -> dict[str, str]:
    """Spec layer name → the block's local linear name (``q_proj`` → ``self_attn.q_proj``)."""
    out = {}
    for name in spec.layers:
        hits = [local for local in linears if local == name or local.endswith("." + name)]
        if len(hits) != 1:
            short = sorted({local.rsplit(".", 1)[-1] for local in linears})
            why = "unknown" if not hits else f"ambiguous ({', '.join(hits)})"
            _fail("layers", f"{why} layer {name!r} in block {block} of {spec.model}; its linears: {', '.join(short)}")
        out[name] = hits[0]
    return out


def cut_model_instances(spec: CutSpec, out_dir: Path, *, device=None, cache_dir=None) -> list[Path]:
    """Cut every (block, layer, size) of ``spec`` into ``out_dir``; return the files in spec order.

    Idempotent: when every file already exists with this spec's provenance no model is loaded;
    otherwise the model is loaded once and only the blocks with missing files are captured. Each
    file is written atomically as soon as it is cut (an interrupted run keeps what it finished).
    Everything checkable is checked before any file is written: existing files that belong to
    another cut, blocks out of range, unknown layers, rows/sizes larger than the layer.
    Progress lines go to stderr.

    Parameters
    ----------
    spec : CutSpec
    out_dir : directory for the instance files (created if missing)
    device : where the blocks run (default: the model's, the CPU)
    cache_dir : the layerprune cache (model and texts), default :func:`layerprune.data.resolve_cache_dir`

    Raises
    ------
    ValueError
        The spec does not fit the model or the directory (one line).
    layerprune.problems.ProblemError, layerprune.data.DataError, layerprune.models.ModelError
        An unwritable directory, a calibration text or model that cannot be loaded (one line).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"cut output {out_dir} exists and is not a directory")
    plan = _plan(spec, out_dir)
    todo = sorted({block for (block, _, _), path in plan.items() if not path.exists()})
    if not todo:
        _say(f"all {len(plan)} instances already in {out_dir}")
        return list(plan.values())
    model, calib_ids = _load(spec, cache_dir)
    _check_model(spec, model)
    _cut_blocks(spec, model, calib_ids, todo, plan, device)
    return list(plan.values())


def _load(spec: CutSpec, cache_dir):
    """The model and its calibration windows, (nsamples, seqlen), as ``prune`` draws them."""
    from layerprune import data
    from layerprune.models import load_model

    text = data.load_text(spec.calib, cache_dir=cache_dir)
    _say(f"loading {spec.model} ...")
    model, tokenizer = load_model(spec.model, cache_dir=cache_dir)
    calib_ids = data.calibration_batch(tokenizer, text, spec.nsamples, spec.seqlen, spec.seed)
    return model, calib_ids


def _check_model(spec: CutSpec, model) -> None:
    """Blocks, layer names and shapes against the loaded model (before anything is cut)."""
    from layerprune.pipeline.structure import find_blocks, find_linears

    blocks, _ = find_blocks(model)
    for b in spec.blocks:
        if b >= len(blocks):
            _fail("blocks", f"block {b} out of range: {spec.model} has {len(blocks)} blocks")
        linears = find_linears(blocks[b])
        names = _resolve_layers(spec, linears, b)
        shapes = {n: (linears[local].out_features, linears[local].in_features) for n, local in names.items()}
        _check_shapes(spec, shapes, f"{spec.model} block {b}")


def _cut_blocks(spec: CutSpec, model, calib_ids, todo: list[int], plan: dict, device) -> None:
    """Capture the blocks' Grams in one pass and write their missing instance files."""
    from layerprune.pipeline.capture import iter_layer_problems
    from layerprune.pipeline.structure import _qualified, find_blocks, find_linears

    blocks, path = find_blocks(model)
    start = time.perf_counter()
    for block, problems in iter_layer_problems(model, calib_ids, todo, device=device):
        _say(f"block {block}: Grams of {calib_ids.numel()} tokens after {time.perf_counter() - start:.1f} s")
        for layer, local in _resolve_layers(spec, find_linears(blocks[block]), block).items():
            module = _qualified(path, block, local)
            _cut_layer(spec, problems[module], block, layer, module, plan)


def _cut_layer(spec: CutSpec, problem, block: int, layer: str, module: str, plan: dict) -> None:
    """Write the missing instance files of one layer: the same rows for every size."""
    W, G = problem.W.cpu(), problem.G.cpu()
    seed = _sub_seed(spec, block, layer)
    rows = select_rows(W, spec.rows, _ROW_RULE, seed)
    for size in spec.sizes:
        target = plan[(block, layer, size)]
        if target.exists():
            continue
        channels = select_channels(W, G, size, spec.channels, rows=rows, seed=seed)
        W_sub, G_sub = cut_instance(W, G, rows, channels)
        prov = Provenance(model=spec.model, block=block, layer=layer, rows=tuple(rows.tolist()),
                          channels=tuple(channels.tolist()), how=spec.channels, calib=spec.calib,
                          nsamples=spec.nsamples, seqlen=spec.seqlen, seed=spec.seed, module=module,
                          row_rule=_ROW_RULE, layer_shape=tuple(W.shape))
        save_cut(target, W_sub, G_sub, prov)
        _say(f"wrote {target.name} ({spec.rows} × {size})")
