"""Hypothesis strategies for tiny instances (brute force can enumerate them)."""
from __future__ import annotations

from hypothesis import strategies as st

from .generators import make_arrays
from .problem import LayerProblem

__all__ = ["patterns_for", "tiny_problems"]


def patterns_for(d_in: int, d_out: int, *, coupled: bool = True) -> st.SearchStrategy[str]:
    """Valid pattern strings for a d_out × d_in layer (``coupled`` adds unstructured/columns)."""
    opts = [st.integers(1, d_in - 1).map(lambda k: f"per-row:{k}")]
    ms = [m for m in (2, 4) if d_in % m == 0]
    if ms:
        opts.append(st.sampled_from(ms).flatmap(lambda m: st.integers(1, m - 1).map(lambda n: f"nm:{n}:{m}")))
    if coupled:
        opts.append(st.integers(1, d_in - 1).map(lambda k: f"columns:{k}"))
        opts.append(st.sampled_from([0.25, 0.5, 0.75]).map(lambda s: f"unstructured:{s}"))
    return st.one_of(*opts)


@st.composite
def tiny_problems(draw, *, max_d_in: int = 6, max_d_out: int = 2, objectives=("mask", "reconstruct"),
                  coupled: bool = True, rank_deficient: bool = True) -> LayerProblem:
    """A tiny validated problem: d_in ≤ ``max_d_in``, d_out ≤ ``max_d_out``, any pattern."""
    d_in = draw(st.integers(2, max_d_in))
    d_out = draw(st.integers(1, max_d_out))
    seed = draw(st.integers(0, 2**31 - 1))
    rank = draw(st.sampled_from([None, max(1, d_in - 2)])) if rank_deficient else None
    W, G = make_arrays(d_out, d_in, seed=seed, n_tokens=4 * d_in, rank=rank)
    pattern = draw(patterns_for(d_in, d_out, coupled=coupled))
    objective = draw(st.sampled_from(list(objectives)))
    return LayerProblem.create(W, G, pattern=pattern, objective=objective)
