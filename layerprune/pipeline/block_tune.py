r"""Block reconstruction after the layer-wise solve (``--block-tune``; EBFT, Guo et al. 2024,
whose public code is sunggo/EBFT).

Each layer's problem sees only its own output. Once every target linear of a block has been
solved and written, their kept weights ``V_l`` are tuned together so that the block's output
matches the dense block's on the same inputs::

    min_{V : supp V_l ⊆ M_l}  (1 / (N·H)) Σ_batches ‖f(X̃; V) − f(X̃; W)‖²

``X̃`` (N tokens × H) the inputs the block sees in the pruned model, ``f(·; W)`` the block before
pruning, ``M_l`` each linear's mask from the layer-wise solve (fixed). This is the layer target
lifted to the block (``target="block"``, EBFT's): a linear's error now counts through what follows
it in the block (the attention softmax, the MLP's gate, the residual stream). Everything else in
the block (norms, linears outside the plan) stays as it was.

``target="dense"`` replaces the target by the dense model's own block output ``f(X; W)``, ``X``
the inputs the block sees in the dense model (a dense stream of calibration hidden states runs
beside the pruned one, one more copy of them): each block then also makes up, as far as its kept
weights can, for the error the blocks before it left in its inputs. Same cost per block (the
targets' forward runs on the dense stream instead of the pruned one).

Optimiser (as EBFT's ``train``): AdamW with β = (0.9, 0.95), gradient-norm clip 1, the learning
rate decaying linearly to 0 over the run, no warm-up; one step per ``batch`` calibration
sequences (:data:`DEFAULT_BLOCK_TUNE_BATCH`; None: each calibration mini-batch whole), ``epochs``
passes over them in a seeded order; no weight decay (EBFT's 0.1 would also shrink
the kept weights). Pruned entries get zero gradient and are zeroed again after every step, so
each mask holds exactly. Cost per block: ``epochs`` forward and backward passes of the block
over the calibration set, one more forward for the targets and one for the error before (the
error after comes from the forward that gives the next block its inputs); memory: one more
copy of the block's input hidden states (the targets), AdamW's two moments of the tuned
weights and one mini-batch's activations.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .capture import _Batch, _call_block, _propagate, _sequences

__all__ = ["BlockTuning", "BlockTuned", "DEFAULT_BLOCK_TUNE_EPOCHS", "DEFAULT_BLOCK_TUNE_LR", "DEFAULT_BLOCK_TUNE_BATCH",
           "BLOCK_TUNE_TARGETS", "DEFAULT_BLOCK_TUNE_TARGET", "DEFAULT_PRUNE_BLOCK_TUNE_TARGET", "dense_targets",
           "tune_block"]

#: the learning rate and the sequences per step measured on the bundled model (docs/DECISIONS.md:
#: EBFT's 2e-4 over its 320 steps per block moves a weight about as far as 1e-3 over the 64 steps
#: of 2 epochs of 2-sequence steps at 64 calibration sequences)
DEFAULT_BLOCK_TUNE_LR, DEFAULT_BLOCK_TUNE_BATCH = 1e-3, 2
#: epochs of the default prune's block tuning (``layerprune prune`` with no ``--solver``, see
#: :func:`layerprune.pipeline.config.with_defaults`)
DEFAULT_BLOCK_TUNE_EPOCHS = 4
#: what a tuned block's output matches: the dense block on the pruned model's inputs (``block``,
#: EBFT's) or on the dense model's (``dense``); module docstring
BLOCK_TUNE_TARGETS = ("block", "dense")
DEFAULT_BLOCK_TUNE_TARGET = "block"
#: the default prune's target (docs/DECISIONS.md: better on both texts at 50%, same cost)
DEFAULT_PRUNE_BLOCK_TUNE_TARGET = "dense"
#: AdamW's betas and the gradient-norm clip (EBFT's defaults)
BETAS, CLIP = (0.9, 0.95), 1.0


@dataclass(frozen=True)
class BlockTuned:
    """One block's tuning: its output error (mean square over the calibration tokens and hidden
    units, against the targets: the dense block's output on the same inputs, or under
    ``target="dense"`` on the dense model's) before and after, the steps taken and the seconds
    (targets and both errors included)."""

    block: int
    error_before: float
    error_after: float
    steps: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class BlockTuning:
    """``--block-tune``'s settings, and ``log``: each tuned block's :class:`BlockTuned`, in
    order, filled while the prune runs (an interrupted prune keeps the blocks it finished)."""

    epochs: int
    lr: float = DEFAULT_BLOCK_TUNE_LR
    seed: int = 0
    batch: int | None = DEFAULT_BLOCK_TUNE_BATCH   # sequences per step (None: each calibration mini-batch whole)
    target: str = DEFAULT_BLOCK_TUNE_TARGET        # one of BLOCK_TUNE_TARGETS
    log: list = field(default_factory=list)

    def __post_init__(self):
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"block tuning needs epochs ≥ 1, got {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"block tuning needs a finite learning rate > 0, got {self.lr!r}")
        if self.batch is not None and not (isinstance(self.batch, int) and self.batch >= 1):
            raise ValueError(f"block tuning needs a batch of ≥ 1 sequences, got {self.batch!r}")
        if self.target not in BLOCK_TUNE_TARGETS:
            raise ValueError(f"block tuning's target is one of {', '.join(BLOCK_TUNE_TARGETS)}, got {self.target!r}")

    def to_json(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "seed": self.seed, "batch": self.batch, "target": self.target,
                "blocks": [b.to_json() for b in self.log]}


def dense_targets(block: nn.Module, batches: list[_Batch],
                  inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The block's outputs on each mini-batch before any of its weights change: (B, T, H) each.
    ``inputs`` ((B, T, H) each, the dense stream's hidden states) replace the batches' own."""
    hidden = [b.hidden for b in batches] if inputs is None else inputs
    with torch.no_grad():
        return [_call_block(block, _Batch(h, b.args, b.kwargs)).detach().clone() for h, b in zip(hidden, batches)]


def _error(outputs, targets: list[torch.Tensor]) -> float:
    """Mean square of the block's outputs (one (B, T, H) tensor per mini-batch) minus the targets,
    over every token and hidden unit."""
    total = sum(float((out.float() - t.float()).pow(2).sum()) for out, t in zip(outputs, targets))
    return total / sum(t.numel() for t in targets)


def tune_block(index: int, block: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
               batches: list[_Batch], targets: list[torch.Tensor], tuning: BlockTuning) -> BlockTuned:
    """Tune the kept weights of ``linears`` (each masked by ``masks[name]``, (d_out, d_in) bool)
    so the block's output on ``batches`` matches ``targets`` (:func:`dense_targets`); the
    block's other parameters stay as they are. Then the tuned block runs on ``batches``: each
    one's hidden states become its outputs, the next block's inputs (as
    :func:`~.capture._propagate`). Appends the result to ``tuning.log``."""
    start = time.perf_counter()
    with torch.no_grad():
        before = _error((_call_block(block, b) for b in batches), targets)
    weights = [linears[name].weight for name in masks]
    keep = [masks[name].to(device=w.device, dtype=w.dtype) for name, w in zip(masks, weights)]
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    steps = tuning.epochs * len(_steps(batches, tuning.batch))
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        _train(block, weights, keep, batches, targets, tuning, steps)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
            p.grad = None
    _propagate(block, batches)
    done = BlockTuned(index, before, _error((b.hidden for b in batches), targets), steps, time.perf_counter() - start)
    tuning.log.append(done)
    return done


def _steps(batches: list[_Batch], size: int | None) -> list[tuple[int, int, int]]:
    """One epoch's steps: ``(mini-batch index, first sequence, end)``, ``size`` sequences each
    (None: each mini-batch whole)."""
    out = []
    for i, b in enumerate(batches):
        n = b.hidden.shape[0]
        step = n if size is None else size
        out += [(i, s, min(s + step, n)) for s in range(0, n, step)]
    return out


def _train(block: nn.Module, weights: list[torch.Tensor], keep: list[torch.Tensor], batches: list[_Batch],
           targets: list[torch.Tensor], tuning: BlockTuning, steps: int) -> None:
    """AdamW steps with masked gradients and a linear learning-rate decay (module docstring)."""
    opt = torch.optim.AdamW(weights, lr=tuning.lr, betas=BETAS, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))
    order = torch.Generator().manual_seed(tuning.seed)
    parts = _steps(batches, tuning.batch)
    with torch.enable_grad():
        for _ in range(tuning.epochs):
            for k in torch.randperm(len(parts), generator=order).tolist():
                i, start, stop = parts[k]
                out = _call_block(block, _sequences(batches[i], start, stop))
                loss = (out.float() - targets[i][start:stop].float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for w, m in zip(weights, keep):
                    w.grad.mul_(m)
                torch.nn.utils.clip_grad_norm_(weights, CLIP)
                opt.step()
                schedule.step()
                with torch.no_grad():
                    for w, m in zip(weights, keep):
                        w.mul_(m)
