"""The ``--solver elsa`` stage of a ``layerprune prune`` job: its options and training windows,
prepared and checked before any long work, then the run on the planned linears."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .allocate import Allocation, layer_pattern
from .config import PruneConfig
from .elsa import ElsaLayer, ElsaOptions, ElsaResult, check_checkpoint, global_admm, parse_elsa_options, training_windows
from .plan import Plan

__all__ = ["ElsaStage"]


@dataclass
class ElsaStage:
    """Elsa's part of a job.

    Attributes
    ----------
    options : ElsaOptions
        The parsed ``--solver-option`` values.
    windows : (steps · batch, seqlen) LongTensor
        The training windows of the calibration text (seeded by ``--seed``, not the
        calibration set's windows; the evaluation texts are disjoint from the text).
    """

    options: ElsaOptions
    windows: torch.Tensor

    @classmethod
    def prepare(cls, calib_tokens: torch.Tensor, plan: Plan, config: PruneConfig,
                log: Callable[[str], Any]) -> "ElsaStage":
        """Options and windows from the tokenized calibration text ``calib_tokens`` (1-D), and
        the check that an existing ``checkpoint`` file is this run's (before the dense
        evaluation and the warm start); says where the run will resume."""
        options = parse_elsa_options(config.solver_options)
        windows = training_windows(calib_tokens, options.steps * options.batch, config.seqlen, config.seed)
        stage = cls(options, windows)
        step = check_checkpoint(options, stage.layers(plan, None, config), windows)
        if step is not None:
            log(f"elsa resumes from {options.checkpoint} at step {step} of {options.steps}")
        return stage

    def layers(self, plan: Plan, allocation: Optional[Allocation], config: PruneConfig) -> list[ElsaLayer]:
        """Every planned linear with its pattern (an allocation's where one was made)."""
        own = allocation.fractions if allocation is not None and allocation.method != "uniform" else None
        return [ElsaLayer(layer.qualified, layer.linear,
                          layer_pattern(config.pattern, own[layer.qualified]) if own else layer.pattern)
                for block in plan.blocks for layer in block]

    def run(self, model: nn.Module, plan: Plan, allocation: Optional[Allocation], config: PruneConfig,
            device: torch.device, log: Callable[[str], Any]) -> ElsaResult:
        """Elsa from the model as it stands (dense, or ``--init``'s layer-wise prune)."""
        options = self.options
        result = global_admm(model, self.windows, self.layers(plan, allocation, config), options, device=device,
                             progress=config.progress)
        if result.interrupted:
            resume = f"; its state is in {options.checkpoint}: the same command resumes" if options.checkpoint else ""
            log(f"elsa interrupted after {result.steps_done} of {options.steps} steps: projected onto the pattern, "
                f"evaluating and saving (Ctrl-C again to stop without writing){resume}")
        return result
