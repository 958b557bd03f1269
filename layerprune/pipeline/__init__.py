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
   - with ``block_tuning`` (``--block-tune``), the kept weights of the block's pruned linears
     tuned together toward the dense block's outputs on the same inputs (:mod:`.block_tune`);
   - the block re-run with pruned weights produces the next block's inputs (errors propagate
     as they will at inference). With ``sequential_order=True`` each group is pruned before
     the next group's Gram matrix is captured from the partially pruned block.

Only one block's activations live in memory. Embeddings and ``lm_head`` stay dense unless
``prune_lm_head``.

:func:`run` is the whole job behind ``layerprune prune``: load, calibrate, measure dense,
prune, measure pruned, save, report.

The code lives in one module per stage: :mod:`.structure` (blocks, linears, devices),
:mod:`.capture` (block inputs, linear groups, Gram matrices, propagation), :mod:`.plan` (the
validated layer → solver plan), :mod:`.loop` (:func:`prune_model`), :mod:`.measure`
(perplexity, sparsity, memory), :mod:`.allocate` (each layer's sparsity: uniform, OWL,
knapsack, a map file), :mod:`.config` (:class:`PruneConfig` and the checks before
loading) and :mod:`.job` (:func:`run`).
"""
from .allocate import knapsack_allocation, owl_allocation, read_sparsity_map
from .block_tune import BlockTuning
from .capture import CALIB_BATCH, capture_block_inputs, iter_layer_problems, layer_problems, linear_groups
from .config import PruneConfig
from .job import run
from .loop import PruningInterrupted, prune_model
from .measure import EVAL_BATCH, EVAL_LOGITS_BYTES, NLL_CHUNK_ELEMENTS, perplexity, release_memory, sparsity
from .structure import find_blocks, find_linears

__all__ = ["PruneConfig", "PruningInterrupted", "prune_model", "BlockTuning", "perplexity", "sparsity", "run", "release_memory",
           "find_blocks", "find_linears", "capture_block_inputs", "linear_groups", "layer_problems",
           "iter_layer_problems",
           "owl_allocation", "knapsack_allocation", "read_sparsity_map",
           "CALIB_BATCH", "EVAL_BATCH", "EVAL_LOGITS_BYTES", "NLL_CHUNK_ELEMENTS"]
