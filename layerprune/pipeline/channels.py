r"""Structured pruning of MLP channels (``layerprune prune --structure mlp:F``).

A gated MLP computes ``down(act(gate(x)) ⊙ up(x))``: intermediate channel ``j`` is row ``j``
of ``gate_proj`` and ``up_proj`` and input column ``j`` of ``down_proj``. Removing it removes
all three, so the block becomes physically smaller. Which channels go is the ``columns``
problem of ``down_proj`` on the intermediate activations the block sees in the pruned model
(its Gram ``G = XᵀX``, X the ``down_proj`` inputs): keep ``K`` columns ``S`` minimising

.. math::  \min_{|S| = K,\ V_{:,\bar S} = 0} \operatorname{tr}\big((W - V) G (W - V)^T\big)

with ``V`` re-optimised (``reconstruct``: ``V_{:,S} = W G_{:,S} G_{SS}^{-1}``, the same
``K × K`` solve for every row) or ``W`` kept (``mask``). The rows of ``gate_proj`` /
``up_proj`` of the pruned channels then go with them and ``down_proj`` is written as ``V``
restricted to ``S``. Every block keeps the same ``K`` (``K = I − round(F · I)``, ``I`` the
intermediate size), so the saved model is a standard checkpoint with a smaller
``intermediate_size`` that ``from_pretrained`` loads without custom code.

Blocks are pruned in order, each on the hidden states the already-pruned blocks produce.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from layerprune.problems import ProblemError
from layerprune.settings import SettingError
from layerprune.solvers import Params, Solver

from ..report import LayerRecord
from .capture import CALIB_BATCH, _accumulate, _propagate, capture_block_inputs
from .loop import SolveSettings, _check_calibration_ids, _interrupted_after, _Progress, _solve_layer
from .measure import release_memory
from .plan import _Layer, build_solvers
from .structure import _eval_mode, _model_device, _on_device, _qualified, find_blocks

__all__ = ["Structure", "parse_structure", "MLPParts", "mlp_parts", "check_structured_model",
           "prune_mlp_channels", "ChannelPruning", "STRUCTURE_SOLVER", "STRUCTURE_OBJECTIVE"]

#: the backend and objective ``--structure`` uses unless told otherwise
STRUCTURE_SOLVER = "alternating"
STRUCTURE_OBJECTIVE = "reconstruct"
#: the names of a gated MLP's three linears, as Llama, Mistral, Qwen2 and SmolLM name them
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Structure:
    """What structured pruning removes: ``kind`` (``mlp``: intermediate channels) and the
    ``fraction`` of them removed in every block."""

    kind: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.fraction:g}"

    def kept(self, size: int) -> int:
        """Channels kept out of ``size``: ``size − round(fraction · size)``, at least 1 removed
        and 1 kept (else one line)."""
        removed = int(round(self.fraction * size))
        if not 1 <= removed < size:
            raise ProblemError(f"--structure {self}: removes {removed} of {size} channels per block; "
                               f"it must remove at least one and keep at least one")
        return size - removed


def parse_structure(text: str) -> Structure:
    """``mlp:0.3`` → ``Structure("mlp", 0.3)``; one line (:class:`SettingError`) otherwise."""
    kind, _, value = str(text).partition(":")
    if kind == "heads":
        raise SettingError(f"--structure {text}: attention heads are not supported; use mlp:F")
    if kind != "mlp" or not value:
        raise SettingError(f"--structure {text!r}: expected mlp:F, F the fraction of MLP channels removed")
    try:
        fraction = float(value)
    except ValueError:
        raise SettingError(f"--structure {text!r}: {value!r} is not a number") from None
    if not 0.0 < fraction < 1.0:
        raise SettingError(f"--structure {text!r}: the fraction must be in (0, 1)")
    return Structure(kind, fraction)


@dataclass
class MLPParts:
    """One block's gated MLP: the module and its three linears, by their names in the model."""

    module: nn.Module
    path: str                       # the MLP's name inside the block (e.g. ``mlp``)
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @property
    def size(self) -> int:
        """The intermediate size (``down_proj``'s inputs)."""
        return self.down.in_features


def mlp_parts(block: nn.Module, where: str) -> MLPParts:
    """The gated MLP of ``block`` (the module holding ``gate_proj``, ``up_proj`` and
    ``down_proj`` linears whose shapes chain); one line naming ``where`` if there is none."""
    for path, module in block.named_modules():
        linears = [getattr(module, name, None) for name in MLP_LINEARS]
        if all(isinstance(lin, nn.Linear) for lin in linears):
            gate, up, down = linears
            if gate.weight.shape != up.weight.shape or down.in_features != gate.out_features:
                raise ProblemError(f"{where}: gate_proj {tuple(gate.weight.shape)}, up_proj "
                                   f"{tuple(up.weight.shape)} and down_proj {tuple(down.weight.shape)} do not chain")
            return MLPParts(module, path, gate, up, down)
    raise ProblemError(f"{where} has no gated MLP (Linear gate_proj, up_proj and down_proj): "
                       f"--structure mlp needs a Llama-style block")


def check_structured_model(model: nn.Module, structure: Structure) -> int:
    """Every decoder block has a gated MLP of one intermediate size ``I`` the model's config
    states, and ``structure`` removes a valid count of it; returns the kept count ``K``."""
    blocks, path = find_blocks(model)
    sizes = {mlp_parts(block, f"block {i} ({_qualified(path, i, '')})").size for i, block in enumerate(blocks)}
    if len(sizes) != 1:
        raise ProblemError(f"--structure mlp: the blocks' intermediate sizes differ ({sorted(sizes)}); "
                           f"one kept count cannot fit them all")
    size = sizes.pop()
    config_size = getattr(getattr(model, "config", None), "intermediate_size", None)
    if config_size != size:
        raise ProblemError(f"--structure mlp: the config's intermediate_size {config_size} is not the "
                           f"blocks' {size}; the smaller model could not be saved as a standard checkpoint")
    return structure.kept(size)


@dataclass
class ChannelPruning:
    """What :func:`prune_mlp_channels` did.

    records : one :class:`LayerRecord` per ``down_proj`` (its ``columns:K`` problem), in order
    kept : {``down_proj``'s qualified name: sorted kept channel indices of the dense model}
    intermediate_size : (before, after)
    decoder_parameters : the decoder blocks' parameter count (before, after)
    """

    records: list[LayerRecord]
    kept: dict[str, list[int]] = field(default_factory=dict)
    intermediate_size: tuple[int, int] = (0, 0)
    decoder_parameters: tuple[int, int] = (0, 0)

    def to_json(self, structure: Structure) -> dict:
        """The report's ``structure`` entry."""
        return {"kind": structure.kind, "fraction": structure.fraction,
                "intermediate_size": list(self.intermediate_size),
                "decoder_parameters": list(self.decoder_parameters), "kept_channels": self.kept}


def prune_mlp_channels(model: nn.Module, calib_ids: torch.Tensor, structure: Union[str, Structure], *,
                       solver: Union[str, Solver] = STRUCTURE_SOLVER, objective: str = STRUCTURE_OBJECTIVE,
                       solver_options: Optional[dict] = None, init: Optional[str] = None,
                       params: Optional[Params] = None,
                       device: Union[None, str, torch.device] = None, progress: bool = True,
                       callback: Optional[Callable[[LayerRecord], Any]] = None, batch_size: int = CALIB_BATCH,
                       reference: bool = True) -> ChannelPruning:
    """Remove ``structure.fraction`` of every block's MLP channels, block after block.

    Parameters
    ----------
    model : a Hugging Face causal LM with Llama-style gated MLPs, modified in place: each MLP's
        linears shrink to ``K`` channels and ``model.config.intermediate_size`` becomes ``K``
    calib_ids : (nsamples, seqlen) LongTensor of calibration tokens
    structure : ``"mlp:F"`` or a :class:`Structure`
    solver : backend of each ``down_proj``'s ``columns:K`` problem (registry name or instance)
    objective : ``reconstruct`` (``down_proj`` refitted on the kept channels) or ``mask``
    solver_options, init, params, device, progress, callback, batch_size, reference : as in
        :func:`~layerprune.pipeline.prune_model`

    Returns
    -------
    ChannelPruning

    Raises
    ------
    ProblemError, SettingError : the model or the structure does not fit (before any change)
    SolverError : the solver cannot take ``columns`` with this objective
    PruningInterrupted : on Ctrl-C; the blocks of ``.records`` have been shrunk
    """
    _check_calibration_ids(calib_ids)
    structure = parse_structure(structure) if isinstance(structure, str) else structure
    keep = check_structured_model(model, structure)
    blocks, path = find_blocks(model)
    pattern = f"columns:{keep}"
    settings = SolveSettings(pattern, objective, build_solvers(solver, {}, init, solver_options, pattern, objective),
                             init, params or Params(), reference=bool(reference))
    name = getattr(solver, "name", solver)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    size = mlp_parts(blocks[0], "block 0").size
    result = ChannelPruning([], intermediate_size=(size, keep), decoder_parameters=(_parameters(blocks), 0))
    written = _Progress(len(blocks), callback, progress)
    with _eval_mode(model), _interrupted_after(written), contextlib.closing(written):
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        for index, block in enumerate(blocks):
            written.block(index, len(blocks))
            parts = mlp_parts(block, f"block {index}")
            layer = _Layer(index, f"{parts.path}.down_proj", _qualified(path, index, f"{parts.path}.down_proj"),
                           parts.down, name, pattern)
            with _on_device(block, device, home):
                acc = _accumulate(block, batches, {"down": parts.down}, [["down"]], stop_early=True)["down"]
                solved = _solve_layer(layer, acc.gram(), acc.n, settings)
                kept = shrink_mlp(parts, solved.record.mask, solved.weights)
                _propagate(block, batches)
            result.kept[layer.qualified] = kept
            result.records.append(solved.record)
            written.add(solved.record)
            release_memory()
    model.config.intermediate_size = keep
    result.decoder_parameters = (result.decoder_parameters[0], _parameters(blocks))
    return result


def _parameters(blocks) -> int:
    """Parameters of the decoder blocks."""
    return sum(p.numel() for block in blocks for p in block.parameters())


def shrink_mlp(parts: MLPParts, mask: torch.Tensor, weights: torch.Tensor) -> list[int]:
    """Keep the channels whose ``down_proj`` column ``mask`` (d_out, I) keeps: rows of
    ``gate_proj`` / ``up_proj`` (and their biases), columns of ``weights`` (d_out, I) as the new
    ``down_proj``. Returns the kept indices (sorted)."""
    columns = mask.to(torch.bool).any(dim=0)
    if not bool((mask.to(torch.bool) == columns).all()):
        raise ProblemError("a columns mask differs between rows; cannot remove whole channels")
    kept = torch.nonzero(columns).flatten()
    for lin in (parts.gate, parts.up):
        _keep_rows(lin, kept)
    down = parts.down
    idx = kept.to(down.weight.device)
    down.weight = nn.Parameter(weights.to(device=down.weight.device, dtype=down.weight.dtype)[:, idx].contiguous(),
                               requires_grad=down.weight.requires_grad)
    down.in_features = int(kept.numel())
    if hasattr(parts.module, "intermediate_size"):
        parts.module.intermediate_size = int(kept.numel())
    return kept.tolist()


def _keep_rows(lin: nn.Linear, kept: torch.Tensor) -> None:
    idx = kept.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach()[idx].contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[idx].contiguous(), requires_grad=lin.bias.requires_grad)
    lin.out_features = int(idx.numel())
