r"""Sparsity across layers: each layer's pruned fraction, given the model-wide one.

Three ways to get a per-layer map ``{qualified layer name: pruned fraction}``:

``uniform``
    every layer takes the fraction of ``--pattern`` (``per-row:0.5`` → 0.5 everywhere).
``owl``
    Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024; code luuyin/OWL,
    ``lib/prune_all.py``, ``prune_wanda_outlier``). On the *dense* model (a first pass over the
    calibration set, hidden states propagated through the unpruned blocks), each decoder block
    gets its layerwise outlier distribution

    .. math:: \mathrm{LOD}_b = \frac{1}{|S_b|}\#\{s \in S_b : s > M \cdot \overline{S_b}\},
              \qquad S_b = \{|W_{ij}|\,\|X_j\|\}

    over the Wanda scores of *all* target linears of the block together (``‖X_j‖`` from the
    diagonal of the layer's Gram matrix; a common scale of the norms changes nothing). The
    block's kept fraction is then, exactly as in the published code,

    .. math:: D_b = 2\lambda\,\frac{\mathrm{LOD}_b - \min \mathrm{LOD}}{\max \mathrm{LOD} - \min \mathrm{LOD}}
              - \overline{(\cdot)} + (1 - S), \qquad s_b = 1 - D_b,

    so the block sparsities average to the target ``S`` (blocks are equal in size, so the
    parameter-weighted total is ``S`` too, up to per-row rounding) and span exactly ``2λ``:
    more outliers, lower sparsity. Every linear of a block takes its block's fraction. The
    ratios need every block's LOD (min, max and mean over blocks), so they cannot be decided
    inside the pruning loop; the dense first pass costs about one calibration forward.
``knapsack``
    our own, an optimisation problem: on the dense model (first pass as for OWL, full Gram
    matrices this time) each layer's error curve is measured at a few sparsity levels
    (``target + k·step``, ``|k| ≤ 2``, step 0.05): the mask objective of Wanda's mask at that
    level (:func:`layer_error_curves`), normalised by the layer's dense output energy
    ``tr(W G Wᵀ)`` (``relative``, the default) or not (``raw``). One level per layer is then
    chosen to minimise the sum of the normalised errors with the kept weights no more than
    uniform's: a multiple-choice knapsack, solved to optimality by OR-Tools CP-SAT on the
    errors scaled to integers (:func:`solve_knapsack`).
``--sparsity-map FILE.json``
    the fractions read from a file (the map a previous run wrote, or one's own); layers the
    map does not name take ``--pattern``'s fraction. A name that is no target layer is an error.

A per-layer fraction becomes a per-layer pattern of the same kind as ``--pattern``
(:func:`layer_pattern`); only patterns given as a fraction (``per-row:F``, ``unstructured:F``,
``columns:F``) can be allocated — ``nm:N:M`` fixes every layer's sparsity at ``1 − N/M``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from layerprune.problems import PatternError, parse_pattern
from layerprune.problems.patterns import NM, Columns, PerRow, Unstructured
from layerprune.settings import SettingError

from .capture import CALIB_BATCH, _Batch, _call_block, _propagate, capture_block_inputs
from .structure import _eval_mode, _model_device, _on_device, _qualified, find_blocks, find_linears

__all__ = ["ALLOCATIONS", "Allocation", "target_fraction", "layer_pattern", "read_sparsity_map",
           "sparsity_map_json", "owl_sparsities", "outlier_ratio", "block_outlier_ratios", "owl_allocation",
           "check_owl_range", "check_allocatable", "layer_error_curves", "solve_knapsack",
           "knapsack_allocation", "check_map_names", "uniform_allocation", "MAP_FILE"]

#: the ``--allocate`` choices
ALLOCATIONS = ("uniform", "owl", "knapsack")
#: the knapsack's sparsity levels per layer: target + k · KNAPSACK_STEP, |k| ≤ KNAPSACK_LEVELS
KNAPSACK_STEP = 0.05
KNAPSACK_LEVELS = 2
#: how a layer's error is normalised before the errors are summed over layers
KNAPSACK_NORMS = ("relative", "raw")
#: the file a job writes beside its report (and into its model directory)
MAP_FILE = "sparsity_map.json"


@dataclass
class Allocation:
    """A per-layer map and how it was made (the report's ``allocation``)."""

    method: str                                  # uniform | owl | map
    target: Optional[float]                      # the model-wide pruned fraction asked for
    fractions: dict[str, float]                  # qualified layer name → pruned fraction
    details: dict = field(default_factory=dict)  # e.g. OWL's per-block LOD and sparsity

    def to_json(self) -> dict:
        return {"method": self.method, "target": self.target, **self.details, "fractions": dict(self.fractions)}


# ---------------------------------------------------------------------------- patterns
def target_fraction(pattern: str) -> Optional[float]:
    """The pruned fraction of a fraction pattern (``per-row:0.5`` → 0.5), else None
    (counts such as ``per-row:288``, and ``nm:N:M``)."""
    pat = parse_pattern(pattern)
    if isinstance(pat, (PerRow, Columns)):
        return pat.fraction
    if isinstance(pat, Unstructured):
        return pat.fraction
    return None


def layer_pattern(pattern: str, fraction: float) -> str:
    """The pattern of ``pattern``'s kind with pruned fraction ``fraction``
    (``layer_pattern("per-row:0.5", 0.42)`` → ``"per-row:0.42"``)."""
    pat = parse_pattern(pattern)
    if isinstance(pat, NM) or target_fraction(pattern) is None:
        raise PatternError(f"pattern {pattern} gives no pruned fraction to allocate "
                           f"(use per-row:F, unstructured:F or columns:F)")
    text = repr(float(fraction))
    return f"{pat.name}:{text}"


def check_allocatable(pattern: str, what: str) -> float:
    """The target fraction of ``pattern``, or one line saying why ``what`` cannot use it."""
    if isinstance(parse_pattern(pattern), NM):
        raise SettingError(f"{what} cannot be used with pattern {pattern}: N:M fixes every layer's "
                           f"sparsity (use per-row:F, unstructured:F or columns:F)")
    target = target_fraction(pattern)
    if target is None:
        raise SettingError(f"{what} needs the pattern as a pruned fraction (e.g. per-row:0.5), got {pattern}")
    return target


def check_owl_range(target: float, lam: float) -> None:
    """OWL's block sparsities lie in ``[target − 2λ, target + 2λ]`` (span 2λ, mean target):
    that interval must lie in ``[0, 1)``, checked before any work."""
    if not (target - 2 * lam >= 0.0 and target + 2 * lam < 1.0):
        raise SettingError(f"--owl-lambda {lam}: OWL's block sparsities can reach target ± 2λ = "
                           f"[{target - 2 * lam:.4g}, {target + 2 * lam:.4g}], outside [0, 1)")


# ---------------------------------------------------------------------------- map files
def read_sparsity_map(path: Union[str, Path]) -> dict[str, float]:
    """A sparsity-map file: one JSON object ``{layer name: pruned fraction}``, every name a
    non-empty string given once, every fraction a number in ``[0, 1)``.

    Raises
    ------
    SettingError
        "--sparsity-map FILE: why" (checked before the model is loaded; the names are checked
        against the model's layers once it is).
    """
    path = Path(path).expanduser()
    what = f"--sparsity-map {path}"
    if not path.is_file():
        raise SettingError(f"{what}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"{what}: cannot read it ({exc.__class__.__name__})") from None

    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                raise SettingError(f"{what}: layer {k!r} is given twice")
            seen[k] = v
        return seen

    try:
        obj = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise SettingError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise SettingError(f"{what}: expected a JSON object {{layer name: pruned fraction}}, "
                           f"got {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        if not name.strip():
            raise SettingError(f"{what}: a layer name is empty")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{what}: layer {name!r}: expected a pruned fraction, got {json.dumps(value)}")
        v = float(value)
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise SettingError(f"{what}: layer {name!r}: pruned fraction must lie in [0, 1), got {value}")
        out[name] = v
    return out


def check_map_names(fractions: dict[str, float], layer_names: Sequence[str]) -> None:
    """Every entry of a sparsity map names a target layer of the model (one line if not)."""
    known = set(layer_names)
    unknown = [k for k in fractions if k not in known]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        example = next(iter(layer_names), None)
        raise SettingError(f"--sparsity-map entry {unknown[0]!r}{more} names no layer of the model"
                           + (f" (layers are named like {example!r})" if example else ""))


def sparsity_map_json(fractions: dict[str, float]) -> str:
    """The map file's text (what :func:`read_sparsity_map` reads back)."""
    return json.dumps({k: float(v) for k, v in fractions.items()}, indent=2) + "\n"


# ---------------------------------------------------------------------------- OWL
def owl_sparsities(lods: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL's block sparsities from the blocks' outlier ratios (published code's formula):
    min-max normalised to ``[0, 2λ]``, centred, the kept fraction ``1 − target`` added;
    sparsity = 1 − kept. Equal LODs (no spread to normalise) give the uniform target."""
    lod = torch.as_tensor(list(lods), dtype=torch.float64)
    if lod.numel() == 0:
        return []
    span = float(lod.max() - lod.min())
    if span <= 0.0:
        return [float(target)] * lod.numel()
    d = (lod - lod.min()) / span * (2 * lam)
    keep = d - d.mean() + (1.0 - target)
    return [float(1.0 - k) for k in keep]


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of the scores (all tensors together) above ``m`` × their mean."""
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    return float((flat > m * flat.mean()).double().mean())


class _SquareSum:
    """Forward pre-hook summing ``x_j²`` over tokens per input feature (float64)."""

    def __init__(self, d_in: int, device: torch.device):
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.n = 0

    def __call__(self, module, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum += (x * x).sum(dim=0)
        self.n += x.shape[0]


def _block_wanda_scores(block: nn.Module, batches: list[_Batch]) -> dict[str, torch.Tensor]:
    """Each target linear's Wanda scores ``|W_ij| · ‖X_j‖`` (``‖X_j‖²`` = mean over tokens,
    as the pipeline's Gram diagonal) on the block's inputs."""
    linears = find_linears(block)
    accs, handles = {}, []
    for name, lin in linears.items():
        accs[name] = _SquareSum(lin.in_features, lin.weight.device)
        handles.append(lin.register_forward_pre_hook(accs[name]))
    try:
        with torch.no_grad():
            for b in batches:
                _call_block(block, b)
    finally:
        for h in handles:
            h.remove()
    return {name: linears[name].weight.detach().abs().to(torch.float64) * (acc.sum / max(acc.n, 1)).sqrt()
            for name, acc in accs.items() if acc.n > 0}


def block_outlier_ratios(model: nn.Module, calib_ids: torch.Tensor, m: float = 5.0, *,
                         device: Union[None, str, torch.device] = None,
                         batch_size: int = CALIB_BATCH) -> list[float]:
    """Each decoder block's LOD on the dense model: the calibration ids through the unpruned
    blocks one at a time (as :func:`~.loop.prune_model` moves them), the Wanda scores of all
    the block's target linears pooled. Nothing in the model changes."""
    blocks, _ = find_blocks(model)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    lods = []
    with _eval_mode(model):
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        for block in blocks:
            with _on_device(block, device, home):
                scores = _block_wanda_scores(block, batches)
                lods.append(outlier_ratio(list(scores.values()), m) if scores else 0.0)
                _propagate(block, batches)
    return lods


def owl_allocation(model: nn.Module, calib_ids: torch.Tensor, pattern: str, *, m: float = 5.0,
                   lam: float = 0.08, device: Union[None, str, torch.device] = None,
                   batch_size: int = CALIB_BATCH) -> Allocation:
    """OWL's per-layer map for ``pattern``'s target fraction (every linear of a block takes its
    block's sparsity). ``lm_head`` is not allocated (it takes the pattern's fraction)."""
    target = check_allocatable(pattern, "--allocate owl")
    check_owl_range(target, lam)
    lods = block_outlier_ratios(model, calib_ids, m, device=device, batch_size=batch_size)
    sparsities = owl_sparsities(lods, target, lam)
    blocks, path = find_blocks(model)
    fractions = {_qualified(path, i, local): s
                 for i, (block, s) in enumerate(zip(blocks, sparsities)) for local in find_linears(block)}
    details = {"owl_m": m, "owl_lambda": lam,
               "blocks": [{"block": i, "lod": lod, "sparsity": s} for i, (lod, s) in enumerate(zip(lods, sparsities))]}
    return Allocation("owl", target, fractions, details)


def uniform_allocation(layer_names: Sequence[str], pattern: str,
                       given: Optional[dict[str, float]] = None) -> Optional[Allocation]:
    """The map of a run without ``--allocate``: the pattern's fraction everywhere, the
    entries of ``given`` (a ``--sparsity-map``) in their place; None for a pattern with no
    fraction (``nm:N:M``, counts) and no map."""
    target = target_fraction(pattern)
    if target is None:
        return None
    fractions = {name: (given or {}).get(name, target) for name in layer_names}
    return Allocation("map" if given else "uniform", target, fractions)


# ---------------------------------------------------------------------------- knapsack
def knapsack_levels(target: float, step: float = KNAPSACK_STEP, levels: int = KNAPSACK_LEVELS) -> list[float]:
    """The sparsity levels every layer may take: ``target + k·step`` inside ``[0, 1)``."""
    out = [round(target + k * step, 12) for k in range(-levels, levels + 1)]
    return [v for v in out if 0.0 <= v < 1.0]


def layer_error_curves(model: nn.Module, calib_ids: torch.Tensor, pattern: str, levels: Sequence[float], *,
                       device: Union[None, str, torch.device] = None,
                       batch_size: int = CALIB_BATCH) -> dict[str, dict]:
    """Each target linear's error curve on the dense model: ``{name: {"kept": [...],
    "error": [...], "dense": tr(W G Wᵀ)}}`` with, per level, the kept weight count and the
    mask objective of Wanda's mask of ``pattern``'s kind at that level. Nothing changes."""
    from layerprune.problems import LayerProblem
    from layerprune.solvers import make_solver

    from .capture import _accumulate, linear_groups

    wanda = make_solver("wanda")
    blocks, path = find_blocks(model)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    curves: dict[str, dict] = {}
    with _eval_mode(model):
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        for i, block in enumerate(blocks):
            with _on_device(block, device, home):
                linears = find_linears(block)
                groups = linear_groups(block, linears, batches[0])
                accs = _accumulate(block, batches, linears, groups, stop_early=False)
                for g in groups:
                    G = accs[g[0]].gram()
                    for local in g:
                        W = linears[local].weight.detach().to(torch.float64)
                        curve = {"kept": [], "error": [], "dense": float(((W @ G) * W).sum())}
                        for s in levels:
                            problem = LayerProblem.create(W, G, pattern=layer_pattern(pattern, s), objective="mask")
                            curve["kept"].append(int(problem.pattern.budget(*W.shape)))
                            curve["error"].append(float(wanda.solve(problem).objective))
                        curves[_qualified(path, i, local)] = curve
                del accs
                _propagate(block, batches)
    return curves


def solve_knapsack(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], budget: int,
                   time_limit: float = 60.0) -> list[int]:
    """One option per item minimising the total cost with the total weight ≤ ``budget``
    (a multiple-choice knapsack), solved to optimality by CP-SAT. Costs are scaled to
    integers (the largest total to 10¹²), so the optimum is exact up to that rounding.

    Raises
    ------
    SettingError
        No choice fits the budget, or CP-SAT proved nothing optimal within ``time_limit``.
    """
    from ortools.sat.python import cp_model

    top = sum(max(c) for c in costs) or 1.0
    scale = 1e12 / top
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x{i}_{j}") for j in range(len(c))] for i, c in enumerate(costs)]
    for row in x:
        m.AddExactlyOne(row)
    m.Add(sum(int(w) * v for ws, row in zip(weights, x) for w, v in zip(ws, row)) <= int(budget))
    m.Minimize(sum(int(round(c * scale)) * v for cs, row in zip(costs, x) for c, v in zip(cs, row)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 1
    status = solver.Solve(m)
    if status == cp_model.INFEASIBLE:
        raise SettingError(f"knapsack: no choice of levels keeps at most {budget} weights")
    if status != cp_model.OPTIMAL:
        raise SettingError(f"knapsack: CP-SAT proved no optimum within {time_limit:g} s "
                           f"({solver.StatusName(status)})")
    return [next(j for j, v in enumerate(row) if solver.Value(v)) for row in x]


def knapsack_allocation(model: nn.Module, calib_ids: torch.Tensor, pattern: str, *, norm: str = "relative",
                        device: Union[None, str, torch.device] = None,
                        batch_size: int = CALIB_BATCH) -> Allocation:
    """Each layer's level chosen by :func:`solve_knapsack` over its measured error curve,
    the kept weights at most uniform's (the model-wide sparsity at least the target)."""
    if norm not in KNAPSACK_NORMS:
        raise SettingError(f"knapsack normalisation must be one of {', '.join(KNAPSACK_NORMS)}, got {norm!r}")
    target = check_allocatable(pattern, "--allocate knapsack")
    levels = knapsack_levels(target)
    curves = layer_error_curves(model, calib_ids, pattern, levels, device=device, batch_size=batch_size)
    names = list(curves)
    at = levels.index(round(target, 12))
    budget = sum(curves[n]["kept"][at] for n in names)
    costs = [[e / (curves[n]["dense"] if norm == "relative" and curves[n]["dense"] > 0 else 1.0)
              for e in curves[n]["error"]] for n in names]
    choice = solve_knapsack(costs, [curves[n]["kept"] for n in names], budget)
    fractions = {n: levels[j] for n, j in zip(names, choice)}
    kept = sum(curves[n]["kept"][j] for n, j in zip(names, choice))
    details = {"norm": norm, "levels": levels, "budget_kept": budget, "kept": kept,
               "cost": sum(c[j] for c, j in zip(costs, choice)),
               "uniform_cost": sum(c[at] for c in costs),
               "curves": {n: {"error": curves[n]["error"], "dense": curves[n]["dense"]} for n in names}}
    return Allocation("knapsack", target, fractions, details)
