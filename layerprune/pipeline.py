r"""Sequential layer-wise pruning of a causal language model.

The job (:func:`prune_model`):

1. **Capture** the real call of the first decoder block: a forward pre-hook with kwargs records
   its ``hidden_states`` and every keyword (attention mask, ``position_ids``,
   ``position_embeddings``, ``cache_position``, …) and stops the forward. Replaying the recorded
   call works across ``transformers`` releases and model families.
2. For each block (moved to the compute device alone):

   - linears reading the *same input tensor* form a group (LLaMA: ``q,k,v`` → ``o`` →
     ``gate,up`` → ``down``), ordered by the forward pass; one Gram matrix per group,
     accumulated by a forward pre-hook in float64,
     :math:`G = \frac{1}{n}\sum_t x_t x_t^T` (running mean over the ``n`` calibration tokens);
   - one :class:`~layerprune.problems.LayerProblem` per linear, solved by the chosen backend
     (per-module overrides), the pruned weights written back in the layer's dtype;
   - the block re-run with pruned weights produces the next block's inputs (errors propagate
     as they will at inference). With ``sequential_order=True`` each group is pruned before
     the next group's Gram matrix is captured from the partially pruned block.

Only one block's activations live in memory. Embeddings and ``lm_head`` stay dense unless
``prune_lm_head``.

:func:`run` is the whole job behind ``layerprune prune``: load, calibrate, measure dense,
prune, measure pruned, save, report.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from layerprune.problems import LayerProblem, PatternError, ProblemError, parse_pattern
from layerprune.solvers import Params, Solver, SolverError, get_solver_class, make_solver

from .report import LayerRecord, PruneReport, pack_mask, plot_layer_errors, write_json_atomic

__all__ = ["PruneConfig", "PruningInterrupted", "prune_model", "perplexity", "sparsity", "run", "release_memory",
           "find_blocks", "find_linears", "capture_block_inputs", "linear_groups", "layer_problems"]

#: calibration sequences per forward mini-batch
CALIB_BATCH = 8
#: evaluation windows per forward mini-batch (at most)
EVAL_BATCH = 4
#: at most this many bytes of float32 logits per evaluation forward (fewer windows per batch
#: for large vocabularies / long windows, never fewer than one)
EVAL_LOGITS_BYTES = 64 * 2 ** 20
#: logits per slice of the NLL computation (16 MiB of float32)
NLL_CHUNK_ELEMENTS = 4 * 2 ** 20


class PruningInterrupted(KeyboardInterrupt):
    """Pruning stopped by Ctrl-C. The model is left partially pruned: ``records`` lists the
    layers already written (each layer is written whole or not at all)."""

    def __init__(self, records: list, total: int):
        super().__init__(f"interrupted after {len(records)} of {total} layers")
        self.records = records
        self.total = total


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


# ============================================================================ model structure
def find_blocks(model: nn.Module) -> tuple[Sequence[nn.Module], str]:
    """The decoder blocks of ``model`` and their attribute path (``models.decoder_layers``
    when it exists, else the longest ``ModuleList`` of identical modules holding linears)."""
    try:
        from layerprune.models import decoder_layers
    except ImportError:
        return _fallback_blocks(model)
    return decoder_layers(model)


def _fallback_blocks(model: nn.Module) -> tuple[Sequence[nn.Module], str]:
    best, best_path = None, None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best):
            best, best_path = mod, path
    if best is None:
        raise ProblemError(f"cannot find the decoder blocks of {type(model).__name__}")
    return list(best), best_path


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Target linears of one block, by name inside the block (``self_attn.q_proj``, …)."""
    try:
        from layerprune.models import target_linears
    except ImportError:
        return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    return target_linears(block)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(obj: Any, device) -> Any:
    """Move every tensor in a nested structure (tuple/list/dict) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device):
    """Move every parameter and buffer *not* in a decoder block to ``device`` (and back)."""
    inside = {id(m) for b in blocks for m in b.modules()}
    moved = []
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.device != device:
                    moved.append((t, t.data))
                    t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, old in moved:
            t.data = old


# ============================================================================ capture
@dataclass
class _Batch:
    """One mini-batch of a block's inputs: the hidden states and the rest of the real call."""

    hidden: torch.Tensor          # (B, T, H)
    args: tuple                   # extra positional arguments of the block's call
    kwargs: dict                  # attention mask, position ids / embeddings, cache position, …


def capture_block_inputs(model: nn.Module, blocks: Sequence[nn.Module], calib_ids: torch.Tensor,
                         device: torch.device, batch_size: int = CALIB_BATCH) -> list[_Batch]:
    """Run the calibration ids through the model up to the first block; record its calls.

    Parameters
    ----------
    calib_ids : (nsamples, seqlen) LongTensor

    Returns
    -------
    list of mini-batches, tensors on ``device``.
    """
    store: list[_Batch] = []

    def pre_hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items()}
        store.append(_Batch(hidden.detach().to(device), _to(rest, device), _to(kwargs, device)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with _outside_blocks_on(model, blocks, device), torch.no_grad():
            for chunk in calib_ids.split(batch_size):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    continue
                raise ProblemError("the first decoder block was never called by the model's forward")
    finally:
        handle.remove()
    return store


def _call_block(block: nn.Module, b: _Batch) -> torch.Tensor:
    out = block(b.hidden, *b.args, **b.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def linear_groups(block: nn.Module, linears: dict[str, nn.Linear], probe: _Batch) -> list[list[str]]:
    """Group the block's linears by shared input tensor, groups in forward order.

    A probe forward on one sequence records, for each linear's first call, its input tensor;
    linears handed the same tensor object (``q,k,v``; ``gate,up``) share one Gram matrix.
    Linears never called are left out.
    """
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, lin in linears.items():
        def hook(module, args, _name=name):
            if not any(n == _name for n, _ in seen):
                seen.append((_name, args[0]))
        handles.append(lin.register_forward_pre_hook(hook))
    one = _Batch(probe.hidden[:1], probe.args, _slice_kwargs(probe.kwargs, probe.hidden.shape[0]))
    try:
        with torch.no_grad():
            _call_block(block, one)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in seen:
        for g, xin in zip(groups, inputs):
            if xin is x:
                g.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    return groups


def _slice_kwargs(kwargs: dict, batch: int) -> dict:
    """First sequence of batched tensors in the block kwargs (batch dim = dim 0 of size ``batch``)."""
    def first(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(first(o) for o in v)
        return v
    return {k: first(v) for k, v in kwargs.items()}


class _GramAccumulator:
    """Forward pre-hook accumulating ``Σ xᵀx`` over tokens in float64.

    ``stop=True`` ends the forward right after (the rest of the block is not needed).
    """

    def __init__(self, d_in: int, device: torch.device, stop: bool = False):
        self.sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.n = 0
        self.stop = stop

    def __call__(self, module, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]
        if self.stop:
            raise _Stop

    def gram(self) -> torch.Tensor:
        """``G = Σ xᵀx / n``: (d_in, d_in) float64."""
        if self.n == 0:
            raise ProblemError("no calibration tokens reached this layer")
        return self.sum / self.n


def _accumulate(block: nn.Module, batches: list[_Batch], linears: dict[str, nn.Linear],
                groups: list[list[str]], stop_early: bool) -> dict[str, _GramAccumulator]:
    """Run the block over all batches; return one Gram accumulator per group (keyed by its
    first member). With ``stop_early`` (a single group) the forward stops at that group."""
    accs, handles = {}, []
    for g in groups:
        lin = linears[g[0]]
        acc = _GramAccumulator(lin.in_features, lin.weight.device, stop=stop_early)
        accs[g[0]] = acc
        handles.append(lin.register_forward_pre_hook(acc))
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    _call_block(block, b)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return accs


def _qualified(path: str, block: int, local: str) -> str:
    """A block linear's name in the model (``model.layers.3.mlp.down_proj``)."""
    return f"{path}.{block}.{local}" if path else f"{block}.{local}"


def _propagate(block: nn.Module, batches: list[_Batch]) -> None:
    """Replace each batch's hidden states by the block's outputs (the next block's inputs)."""
    with torch.no_grad():
        for b in batches:
            b.hidden = _call_block(block, b)


def layer_problems(model: nn.Module, calib_ids: torch.Tensor, block: int, *, pattern: str = "per-row:0.5",
                   objective: str = "mask", device: Union[None, str, torch.device] = None,
                   batch_size: int = CALIB_BATCH) -> dict[str, LayerProblem]:
    """The layer problems of one decoder block of the (unchanged) model: real instances.

    The calibration ids run through the dense model up to block ``block``; each target linear
    of that block gets its problem with ``W`` its weights and ``G`` the mean ``xᵀx`` of its
    inputs (float64), as :func:`prune_model` would build them had the earlier blocks been kept
    dense. Nothing in the model changes. ``save_instance(path, p.W, p.G)`` (from
    ``layerprune.problems``) writes one as a CONTRACT instance file.

    Parameters
    ----------
    model : a Hugging Face causal LM
    calib_ids : (nsamples, seqlen) LongTensor
    block : index of the decoder block (negative counts from the end)
    pattern, objective : of the problems (fractions resolve per layer width)

    Returns
    -------
    {qualified module name: LayerProblem}, in forward order.
    """
    blocks, path = find_blocks(model)
    if not -len(blocks) <= block < len(blocks):
        raise ProblemError(f"block {block} out of range: the model has {len(blocks)} blocks")
    block %= len(blocks)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    out: dict[str, LayerProblem] = {}
    was_training = model.training
    model.eval()
    try:
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        for i in range(block + 1):
            blocks[i].to(device)
            try:
                if i < block:
                    _propagate(blocks[i], batches)
                    continue
                linears = find_linears(blocks[i])
                groups = linear_groups(blocks[i], linears, batches[0])
                accs = _accumulate(blocks[i], batches, linears, groups, stop_early=False)
                for g in groups:
                    G = accs[g[0]].gram()
                    for local in g:
                        out[_qualified(path, i, local)] = LayerProblem.create(linears[local].weight.detach(), G,
                                                        pattern=pattern, objective=objective)
            finally:
                blocks[i].to(home)
    finally:
        model.train(was_training)
    return out


# ============================================================================ pruning
def _wanda_result(problem: LayerProblem, params: Params):
    return make_solver("wanda").solve(problem, params=params)


def _resolve_solver(qualified: str, default: str, overrides: dict[str, str]) -> str:
    """Solver for a layer: an override whose key is the layer's name or a substring of it
    (the longest matching key wins), else the default."""
    hits = [k for k in overrides if k == qualified or k in qualified]
    if not hits:
        return default
    return overrides[max(hits, key=len)]


def _check_solver_takes(name: Union[str, Solver], pattern: str, objective: str, what: str) -> None:
    cls = type(name) if isinstance(name, Solver) else get_solver_class(name)
    name = cls.name
    missing = cls.missing_packages()
    if missing:
        raise SolverError(f"{what}: solver {name!r} needs the package(s) {', '.join(missing)}")
    kind = parse_pattern(pattern).name
    if kind not in cls.patterns:
        raise SolverError(f"{what}: solver {name!r} cannot take pattern {pattern} "
                          f"(takes {', '.join(sorted(cls.patterns))})")
    if objective not in cls.objectives:
        raise SolverError(f"{what}: solver {name!r} cannot take objective {objective!r}")


@dataclass
class _Layer:
    block: int
    local: str          # name inside the block
    qualified: str      # name in the model
    linear: nn.Linear
    solver: str


def _plan(model: nn.Module, blocks: Sequence[nn.Module], path: str, pattern: str, objective: str,
          solver: str, overrides: dict[str, str], init: Optional[str],
          prune_lm_head: bool = False) -> list[list[_Layer]]:
    """Every target linear, validated against the pattern and its solver *before* any change."""
    from layerprune.problems import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ProblemError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    pat = parse_pattern(pattern)
    plan, used = [], set()
    _check_solver_takes(solver, pattern, objective, "--solver")
    if init is not None:
        _check_solver_takes(init, pattern, objective, "--init")
    for name in set(overrides.values()):
        _check_solver_takes(name, pattern, objective, "--override")
    for i, block in enumerate(blocks):
        layers = []
        for local, lin in find_linears(block).items():
            qualified = _qualified(path, i, local)
            d_out, d_in = lin.weight.shape
            try:
                pat.bind(d_out, d_in)
            except PatternError as exc:
                raise ProblemError(f"pattern {pattern} does not fit layer {qualified} "
                                   f"({d_out}×{d_in}): {exc}") from None
            name = _resolve_solver(qualified, getattr(solver, "name", solver), overrides)
            used.update(k for k in overrides if k == qualified or k in qualified)
            layers.append(_Layer(i, local, qualified, lin, name))
        plan.append(layers)
    if prune_lm_head:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ProblemError(f"the output projection is a {type(head).__name__}, not a Linear")
        try:
            pat.bind(*head.weight.shape)
        except PatternError as exc:
            raise ProblemError(f"pattern {pattern} does not fit layer lm_head: {exc}") from None
        used.update(k for k in overrides if k in "lm_head")
    unused = sorted(set(overrides) - used)
    if unused:
        raise SolverError(f"--override names no layer of the model: {', '.join(unused)}")
    return plan


def _solve_layer(layer: _Layer, G: torch.Tensor, ntokens: int, *, pattern: str, objective: str,
                 solvers: dict[str, Solver], init: Optional[str], params: Params) -> LayerRecord:
    """Build the layer's problem, solve it, write the pruned weights back, return its record."""
    lin = layer.linear
    problem = LayerProblem.create(lin.weight.detach(), G, pattern=pattern, objective=objective)
    try:
        wanda = _wanda_result(problem, params)
    except SolverError:
        wanda = None
    solver = solvers[layer.solver]
    init_mask = None
    if init is not None:
        init_mask = wanda.mask if (init == "wanda" and wanda is not None) else \
            solvers[init].solve(problem, params=params).mask
    elif wanda is not None and solver.init_solver == "wanda":
        init_mask = wanda.mask  # the start it would compute itself: reuse the reference
    try:
        if wanda is not None and solver.name == "wanda" and not solver.options:
            res = wanda  # the reference is this solve
        else:
            res = solver.solve(problem, params=params, init=init_mask)
    except SolverError as exc:
        raise SolverError(f"layer {layer.qualified}: {exc}") from None
    status, limit = res.status.value, res.limit
    if res.mask is None:  # e.g. a MIP stopped before its first incumbent: fall back, say so
        fallback = init_mask if init is not None else (wanda.mask if wanda is not None else None)
        if fallback is None:
            raise SolverError(f"layer {layer.qualified}: solver {layer.solver!r} found no mask ({status})")
        weights = problem.refit(fallback) if objective == "reconstruct" else problem.W.to(torch.float64) * fallback
        mask, value = fallback, problem.objective(fallback)
        limit = f"{limit or status}; fell back to {'init' if init is not None else 'wanda'} mask"
    else:
        weights, mask, value = res.weights, res.mask, res.objective
    lin.weight.data.copy_(weights.to(device=lin.weight.device, dtype=lin.weight.dtype))
    lower = res.lower_bound
    gap = res.gap if res.mask is not None else None
    return LayerRecord(
        block=layer.block, name=layer.qualified, shape=tuple(lin.weight.shape),
        pattern=str(problem.pattern), objective_kind=objective, solver=layer.solver,
        objective=value, wanda_objective=None if wanda is None else wanda.objective,
        lower_bound=lower, bound_source=res.bound_source, gap=gap, status=status, limit=limit,
        seconds=res.seconds, ntokens=ntokens, packed_mask=pack_mask(mask))


def prune_model(model: nn.Module, calib_ids: torch.Tensor, *, solver: Union[str, Solver] = "wanda",
                pattern: str = "per-row:0.5", objective: str = "mask",
                overrides: Optional[dict[str, str]] = None, solver_options: Optional[dict] = None,
                init: Optional[str] = None, params: Optional[Params] = None,
                device: Union[None, str, torch.device] = None, sequential_order: bool = False,
                prune_lm_head: bool = False, progress: bool = True,
                callback: Optional[Callable[[LayerRecord], Any]] = None,
                batch_size: int = CALIB_BATCH) -> list[LayerRecord]:
    """Prune every target linear of every decoder block, block after block.

    Parameters
    ----------
    model : a Hugging Face causal LM (``model(input_ids=…)``), modified in place
    calib_ids : (nsamples, seqlen) LongTensor of calibration tokens
    solver : registry name of the default backend, or a :class:`Solver` instance
    pattern : pattern string; fractions (``per-row:0.5``) resolve per layer width
    objective : ``mask`` or ``reconstruct``
    overrides : {module name or substring of it: solver name}, e.g. ``{"down_proj": "sparsegpt"}``;
        a key that names no layer is an error
    solver_options : constructor options of the default solver
    init : solver name whose mask warm-starts each layer's solve
    params : common solver parameters (time limit per layer, seed, …)
    device : where each block runs (default: the model's device); blocks move there one at
        a time and back
    sequential_order : prune groups of linears sharing an input one after the other
        (``q,k,v`` → ``o`` → ``gate,up`` → ``down``), re-capturing the Gram matrix of each
        group from the partially pruned block
    prune_lm_head : also prune the output projection (untied from the embeddings first)
    progress : tqdm bars over blocks and layers
    callback : called with each :class:`LayerRecord` once the layer is written

    Returns
    -------
    list of LayerRecord, in pruning order (masks attached, on CPU).

    Raises
    ------
    ProblemError : the pattern does not fit a layer (raised before any weight changes)
    SolverError : unknown or unable solver, override naming no layer
    PruningInterrupted : on Ctrl-C; the layers in ``.records`` have been written
    """
    from tqdm.auto import tqdm

    overrides = dict(overrides or {})
    params = params or Params()
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0 or calib_ids.shape[1] < 2:
        raise ProblemError(f"calibration ids must be (nsamples, seqlen) with seqlen ≥ 2, got {tuple(calib_ids.shape)}")
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    blocks, path = find_blocks(model)
    instance = solver if isinstance(solver, Solver) else None
    if instance is not None:
        _check_solver_takes(instance, pattern, objective, "solver")
        solver = instance.name
    plan = _plan(model, blocks, path, pattern, objective, instance or solver, overrides, init, prune_lm_head)
    names = {*overrides.values()} | ({init} if init else set()) | ({solver} if instance is None else set())
    solvers = {n: make_solver(n, **((solver_options or {}) if n == solver else {})) for n in names}
    if instance is not None:
        solvers[solver] = instance
    total = sum(len(layers) for layers in plan) + int(prune_lm_head)
    records: list[LayerRecord] = []
    kw = dict(pattern=pattern, objective=objective, solvers=solvers, init=init, params=params)

    def done(rec: LayerRecord) -> None:
        records.append(rec)
        if callback is not None:
            callback(rec)

    was_training = model.training
    model.eval()
    current = None
    try:
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        bar = tqdm(total=total, disable=not progress, desc="pruning", unit="layer")
        for i, (block, layers) in enumerate(zip(blocks, plan)):
            bar.set_postfix_str(f"block {i + 1}/{len(blocks)}")
            current = block
            block.to(device)
            by_local = {lay.local: lay for lay in layers}
            linears = {lay.local: lay.linear for lay in layers}
            groups = linear_groups(block, linears, batches[0])
            if sequential_order:
                for g in groups:
                    acc = _accumulate(block, batches, linears, [g], stop_early=True)[g[0]]
                    G = acc.gram()
                    for local in g:
                        done(_solve_layer(by_local[local], G, acc.n, **kw))
                        bar.update(1)
            else:
                accs = _accumulate(block, batches, linears, groups, stop_early=False)
                for g in groups:
                    G = accs[g[0]].gram()
                    for local in g:
                        done(_solve_layer(by_local[local], G, accs[g[0]].n, **kw))
                        bar.update(1)
                del accs
            called = {n for g in groups for n in g}
            bar.update(len(layers) - len(called))  # linears the forward never calls stay dense
            _propagate(block, batches)
            block.to(home)
            current = None
            release_memory()  # the block's forward and solver temporaries
        if prune_lm_head:
            head_solver = _resolve_solver("lm_head", solver, overrides)
            done(_prune_lm_head(model, calib_ids, device, batch_size, head_solver, **kw))
            bar.update(1)
        bar.close()
    except KeyboardInterrupt:
        raise PruningInterrupted(records, total) from None
    finally:
        if current is not None:
            current.to(home)
        model.train(was_training)
    return records


def _prune_lm_head(model: nn.Module, calib_ids: torch.Tensor, device: torch.device, batch_size: int,
                   solver: str, **kw) -> LayerRecord:
    """Prune the output projection on the inputs it sees from the (already pruned) model."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ProblemError(f"the output projection is a {type(head).__name__}, not a Linear")
    emb = model.get_input_embeddings()
    if emb is not None and head.weight is emb.weight:  # tied: prune a copy, keep embeddings dense
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    home = _model_device(model)
    model.to(device)
    try:
        acc = _GramAccumulator(head.in_features, device, stop=True)
        handle = head.register_forward_pre_hook(acc)
        try:
            with torch.no_grad():
                for chunk in calib_ids.split(batch_size):
                    try:
                        model(input_ids=chunk.to(device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        layer = _Layer(-1, "lm_head", "lm_head", head, solver)
        return _solve_layer(layer, acc.gram(), acc.n, **kw)
    finally:
        model.to(home)


# ============================================================================ measurement
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, device=None,
               batch_size: Optional[int] = None) -> float:
    r"""Perplexity on non-overlapping windows of ``seqlen`` tokens.

    :math:`\exp\big(\frac{1}{N}\sum -\log p(t_{k+1} \mid t_{\le k})\big)`, the next-token NLL
    averaged over every predicted token of every window (``seqlen − 1`` per window); the
    trailing ``T mod seqlen`` tokens are dropped.

    Memory: the logits of one forward are ``batch × seqlen × vocab`` floats (SmolLM2: 48 MiB
    per 256-token window), often more than a decoder block's activations. Windows are batched
    only while their logits stay under :data:`EVAL_LOGITS_BYTES`, and the NLL is taken over
    slices of at most :data:`NLL_CHUNK_ELEMENTS` logits, so no full-size ``log_softmax`` or
    reshaped copy of the logits is made.

    Parameters
    ----------
    ids : (1, T) or (T,) LongTensor
    batch_size : windows per forward (default: as many as fit :data:`EVAL_LOGITS_BYTES`, at
        most :data:`EVAL_BATCH`, at least 1)
    """
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if seqlen < 2 or n == 0:
        raise ProblemError(f"evaluation text has {ids.numel()} tokens: fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].reshape(n, seqlen)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    if batch_size is None:
        vocab = _vocab_size(model)
        batch_size = EVAL_BATCH if vocab is None else \
            max(1, min(EVAL_BATCH, EVAL_LOGITS_BYTES // (seqlen * vocab * 4)))
    was_training = model.training
    model.eval()
    if device != home:
        model.to(device)
    total, count = 0.0, 0
    try:
        with torch.no_grad():  # not inference_mode: buffers a model caches here stay usable later
            for chunk in windows.split(batch_size):
                chunk = chunk.to(device)
                logits = model(input_ids=chunk, use_cache=False).logits
                total += _nll_sum(logits, chunk)
                count += chunk.shape[0] * (seqlen - 1)
                del logits
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)
        release_memory()
    return math.exp(total / count)


def _vocab_size(model: nn.Module) -> Optional[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if n else None


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """``Σ −log softmax(logits[b, t])[ids[b, t+1]]`` over ``t < T−1``, in float32 slices.

    logits : (B, T, V); ids : (B, T). Each slice holds at most :data:`NLL_CHUNK_ELEMENTS`
    logits (plus its ``log_softmax``), whatever ``B·T·V``.
    """
    B, T, V = logits.shape
    step = max(1, NLL_CHUNK_ELEMENTS // V)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)  # one sync per batch
    for b in range(B):
        for s in range(0, T - 1, step):
            e = min(T - 1, s + step)
            total += torch.nn.functional.cross_entropy(
                logits[b, s:e].float(), ids[b, s + 1:e + 1], reduction="sum").double()
    return float(total)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system.

    glibc keeps freed chunks below its (adaptive, up to 32 MiB) ``mmap`` threshold in its
    arenas; after a forward pass that is tens to hundreds of MiB of resident memory nobody
    uses. ``malloc_trim(0)`` returns it (a no-op where the C library is not glibc).
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return getattr(libc, "malloc_trim", None)
    except (OSError, AttributeError):
        return None


def sparsity(model: nn.Module, *, include_lm_head: bool = False) -> float:
    """Fraction of exact zeros in the target linears of the decoder blocks (and ``lm_head``)."""
    blocks, _ = find_blocks(model)
    zeros, total = 0, 0
    weights = [lin.weight for block in blocks for lin in find_linears(block).values()]
    if include_lm_head:
        head = model.get_output_embeddings()
        if head is not None:
            weights.append(head.weight)
    for w in weights:
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


# ============================================================================ the job
@dataclass
class PruneConfig:
    """Settings of one ``layerprune prune`` job (the CLI's flags)."""

    model: str = "smollm2"
    solver: str = "sparseswaps"
    pattern: str = "per-row:0.5"
    objective: str = "mask"
    nsamples: int = 64
    seqlen: int = 256
    calib: Optional[str] = None              # None: data's default calibration text
    eval: Optional[list] = None              # None: data's default evaluation texts
    eval_tokens: Optional[int] = 16384       # evaluation tokens per text (None: all)
    out: Optional[str] = None
    force: bool = False
    report: Optional[str] = None
    init: Optional[str] = None
    device: Optional[str] = None             # None: cuda if available, else cpu
    time_limit_per_layer: Optional[float] = None
    max_iter: Optional[int] = None           # iteration cap per layer (Params.max_iter)
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    sequential_order: bool = False
    prune_lm_head: bool = False
    solver_options: dict = field(default_factory=dict)
    dtype: str = "float32"
    progress: bool = True
    cache_dir: Optional[str] = None


def _dtype(name: str) -> torch.dtype:
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise ProblemError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return dt


def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size of this process, or with ``RUSAGE_CHILDREN`` of its largest
    finished child (Linux: ru_maxrss is in KiB; macOS: bytes)."""
    peak = int(resource.getrusage(who).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def run(config: PruneConfig, *, log: Callable[[str], Any] = print) -> PruneReport:
    """The whole job: load, calibrate, measure dense, prune, measure pruned, save, report.

    Nothing is written unless every step succeeded: the model directory atomically by
    ``models.save_pruned`` (with the report and masks), the report JSON atomically, and the
    plot ``layer_errors.png`` next to the report.
    """
    from layerprune import data, models

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if config.out is not None and Path(config.out).exists() and not config.force:
        raise models.ModelError(f"output directory {config.out} exists (use --force to overwrite)")
    if config.nsamples < 1 or config.seqlen < 2:
        raise data.DataError(f"need nsamples ≥ 1 and seqlen ≥ 2, got {config.nsamples} × {config.seqlen}")
    dtype = _dtype(config.dtype)
    device = torch.device(config.device) if config.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calib_src = config.calib if config.calib is not None else \
        getattr(data, "DEFAULT_CALIBRATION", "austen-calib")
    eval_srcs = list(config.eval) if config.eval else \
        list(getattr(data, "DEFAULT_EVALUATION", ("persuasion", "mobydick")))
    params = Params(time_limit=config.time_limit_per_layer, max_iter=config.max_iter, seed=config.seed)

    t = time.perf_counter()
    model, tokenizer = models.load_model(config.model, dtype=dtype, device="cpu", cache_dir=config.cache_dir)
    timings["load"] = time.perf_counter() - t
    release_memory()  # loader temporaries
    # validate pattern/solvers/overrides against the model before the costly steps
    blocks, path = find_blocks(model)
    _plan(model, blocks, path, config.pattern, config.objective, config.solver,
          dict(config.overrides or {}), config.init, config.prune_lm_head)
    make_solver(config.solver, **(config.solver_options or {}))  # unknown options: fail now

    t = time.perf_counter()
    calib_name = data.text_name(calib_src)
    calib_ids = data.calibration_batch(tokenizer, data.load_text(calib_src, cache_dir=config.cache_dir),
                                       config.nsamples, config.seqlen, config.seed)
    evals = {}
    for src in eval_srcs:
        name = data.text_name(src)
        overlap = getattr(data, "sources_overlap", lambda a, b: data.text_name(a) == data.text_name(b))
        if overlap(calib_src, src):
            raise data.DataError(f"evaluation text {name!r} overlaps the calibration text {calib_name!r}")
        evals[name] = data.eval_tokens(tokenizer, data.load_text(src, cache_dir=config.cache_dir),
                                       max_tokens=config.eval_tokens)
    timings["data"] = time.perf_counter() - t
    release_memory()  # the tokenized calibration text

    t = time.perf_counter()
    dense = {name: perplexity(model, ids, config.seqlen, device) for name, ids in evals.items()}
    timings["dense_eval"] = time.perf_counter() - t
    for name, v in dense.items():
        log(f"dense perplexity {name}: {v:.3f}")

    t = time.perf_counter()
    records = prune_model(model, calib_ids, solver=config.solver, pattern=config.pattern,
                          objective=config.objective, overrides=config.overrides,
                          solver_options=config.solver_options, init=config.init, params=params,
                          device=device, sequential_order=config.sequential_order,
                          prune_lm_head=config.prune_lm_head, progress=config.progress)
    timings["prune"] = time.perf_counter() - t

    t = time.perf_counter()
    pruned = {name: perplexity(model, ids, config.seqlen, device) for name, ids in evals.items()}
    timings["pruned_eval"] = time.perf_counter() - t

    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "force")}
    settings.update(calib=calib_name, calib_source=str(calib_src), eval=list(evals),
                    eval_sources=[str(s) for s in eval_srcs],
                    eval_tokens_used={k: int(v.numel()) for k, v in evals.items()},
                    calibration_tokens=int(calib_ids.numel()), device=str(device),
                    versions=_versions())
    size = _size(models, model)
    report = PruneReport(
        dense_perplexity=dense, perplexity=pruned,
        sparsity=sparsity(model, include_lm_head=config.prune_lm_head),
        seconds=0.0, peak_memory_bytes=0, layers=records, settings=settings, timings=timings,
        model_size_bytes=size,
        memory_target_bytes=_memory_target(size, model, calib_ids),
        peak_device_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    )

    t = time.perf_counter()
    report.peak_memory_bytes = _peak_rss_bytes()
    report.peak_child_memory_bytes = _peak_rss_bytes(resource.RUSAGE_CHILDREN) or None
    report.seconds = time.perf_counter() - t0
    if config.out is not None:
        report.out_dir = str(config.out)
        extra = {"prune_report.json": json.dumps(report.to_json(), indent=2) + "\n"}
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_layer_errors(records, Path(tmp) / "layer_errors.png")
            if png is not None:
                extra["layer_errors.png"] = png.read_bytes()
        masks = {r.name: r.packed_mask for r in records}
        models.save_pruned(model, tokenizer, config.out, masks=masks, force=config.force,
                           extra_files=extra)
    if config.report is not None:
        report.report_path = str(config.report)
        plot = plot_layer_errors(records, Path(config.report).parent / "layer_errors.png")
        report.plot_path = None if plot is None else str(plot)
    timings["save"] = time.perf_counter() - t
    report.seconds = time.perf_counter() - t0
    if config.report is not None:
        write_json_atomic(config.report, report.to_json())
    return report


def _memory_target(model_bytes: Optional[int], model: nn.Module, calib_ids: torch.Tensor) -> Optional[int]:
    """3 × the model's size plus one block's input and output hidden states (calibration set)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not model_bytes or not hidden:
        return None
    elem = next(model.parameters()).element_size()
    return int(3 * model_bytes + 2 * calib_ids.numel() * int(hidden) * elem)


def _size(models, model) -> Optional[int]:
    fn = getattr(models, "model_size_bytes", None)
    if fn is None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return int(fn(model))


def _versions() -> dict:
    import transformers

    import layerprune
    return {"layerprune": getattr(layerprune, "__version__", None), "torch": torch.__version__,
            "transformers": transformers.__version__}
