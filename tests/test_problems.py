"""The problem object: validation, patterns, exact objectives, refit, scaling, files."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from layerprune.problems import (NM, Columns, LayerProblem, PatternError, PerRow, ProblemError,
                                 Unstructured, load_instance, make_arrays, make_instance,
                                 parse_pattern, save_instance, topk_mask)
from layerprune.problems.strategies import tiny_problems


def _wg(d_out=3, d_in=8, seed=0, **kw):
    return make_arrays(d_out, d_in, seed=seed, **kw)


# ------------------------------------------------------------------ validation: one error per fault
@pytest.mark.parametrize("make, match", [
    (lambda W, G: (W[0], G), "2-D"),
    (lambda W, G: (W, G[:, :-1]), "square"),
    (lambda W, G: (W, G[:-1, :-1]), "d_in"),
    (lambda W, G: (W, G + np.triu(np.ones_like(G), 1)), "not symmetric"),
    (lambda W, G: (W, G - 10 * np.abs(G).max() * np.eye(len(G))), "not positive semi-definite"),
    (lambda W, G: (np.where(np.eye(*W.shape) > 0, np.nan, W), G), "NaN or inf"),
    (lambda W, G: (W, np.where(np.eye(len(G)) > 0, np.inf, G)), "NaN or inf"),
])
def test_bad_arrays_raise_one_clear_error(make, match):
    W, G = _wg()
    W2, G2 = make(W, G)
    with pytest.raises(ProblemError, match=match):
        LayerProblem.create(W2, G2, pattern="per-row:4")


@pytest.mark.parametrize("pattern, match", [
    ("per-row:9", "out of range"), ("per-row:-1", "out of range"), ("columns:9", "out of range"),
    ("nm:2:3", "not divisible"), ("nm:5:4", "N <= M"), ("unstructured:1.5", r"\[0, 1\)"),
    ("rows:3", "unknown pattern"), ("per-row:x", "integer"),
])
def test_bad_patterns(pattern, match):
    W, G = _wg()
    with pytest.raises((ProblemError, PatternError), match=match):
        LayerProblem.create(W, G, pattern=pattern)


def test_objective_kind_and_inputs_checked():
    W, G = _wg()
    with pytest.raises(ProblemError, match="objective"):
        LayerProblem.create(W, G, objective="fancy")
    with pytest.raises(ProblemError, match="exactly one"):
        LayerProblem.create(W)
    with pytest.raises(ProblemError, match="n × d_in"):
        LayerProblem.create(W, X=np.ones((5, 3)))


def test_psd_within_tolerance_accepted():
    W, G = _wg(d_in=8, rank=4)  # exactly rank-deficient: eigenvalues ~ ±1e-16
    p = LayerProblem.create(W, G, pattern="per-row:4")
    assert p.G.shape == (8, 8) and torch.equal(p.G, p.G.T)


# ------------------------------------------------------------------ patterns
def test_parse_fraction_and_count_forms():
    assert parse_pattern("per-row:0.5").bind(4, 10).keep == 5
    assert parse_pattern("per-row:3").bind(4, 10).keep == 3
    assert parse_pattern("columns:0.25").bind(4, 8).keep == 6
    assert parse_pattern("nm:2:4") == NM(2, 4)
    assert parse_pattern("unstructured:0.6").budget(10, 10) == 40


def test_topk_ties_go_to_lower_index():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert topk_mask(s, 2).tolist() == [[False, True, True, False, False]]


@given(st.integers(1, 5), st.integers(1, 12), st.data(), st.sampled_from([torch.float32, torch.float64,
                                                                          torch.float16]))
def test_topk_mask_is_the_stable_top_k_of_each_row(rows, n, data, dtype):
    """Against a stable sort (descending score, then ascending index), ties and NaNs included:
    NaN counts as the lowest score. Few distinct values, so ties straddle the k-th place often."""
    k = data.draw(st.integers(0, n))
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, -2.0, 3.5, float("nan")]),
                                min_size=rows * n, max_size=rows * n))
    s = torch.tensor(values, dtype=dtype).reshape(rows, n)
    key = torch.nan_to_num(s.to(torch.float64), nan=-float("inf"))
    order = torch.sort(-key, dim=-1, stable=True).indices[:, :k]
    expected = torch.zeros(rows, n, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(topk_mask(s, k), expected)
    assert torch.equal(topk_mask(s.reshape(1, rows, n), k)[0], expected)  # leading dims


@given(st.integers(1, 9), st.data(), st.sampled_from([torch.float32, torch.float64]))
def test_both_selections_of_the_kth_largest_agree(n, data, dtype):
    """The CPU's ``np.partition`` and the other devices' ``torch.topk`` give the same value."""
    from layerprune.problems.patterns import _kth_by_partition, _kth_by_topk

    k = data.draw(st.integers(1, n))
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, -2.0, 3.5, -float("inf")]),
                                min_size=3 * n, max_size=3 * n))
    s = torch.tensor(values, dtype=dtype).reshape(3, n)
    expected = torch.sort(s, dim=-1, descending=True).values[:, k - 1:k]
    assert torch.equal(_kth_by_partition(s, k), expected)
    assert torch.equal(_kth_by_topk(s, k), expected)


@given(tiny_problems(max_d_in=8, max_d_out=3), st.integers(0, 10**6))
def test_round_is_feasible_and_maximises_the_linear_score(problem, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(problem.shape, generator=g, dtype=torch.float64)
    mask = problem.round(scores)
    assert problem.is_feasible(mask)
    # the LMO: no feasible mask has a larger total score (compare with brute force over masks)
    lin = LayerProblem(problem.W, problem.G, problem.pattern, "mask")
    assert float(scores[mask].sum()) >= _best_linear(lin, scores) - 1e-9


def _best_linear(problem, scores):
    """max Σ scores over feasible masks by enumeration (tiny)."""
    import itertools
    d_out, d_in = problem.shape
    best = -np.inf
    n = d_out * d_in
    if n > 16:
        return -np.inf
    for bits in itertools.product([False, True], repeat=n):
        m = torch.tensor(bits).reshape(d_out, d_in)
        if problem.pattern.violation(m) is None:
            best = max(best, float(scores[m].sum()))
    return best


def test_violations_are_explained():
    assert "row 0" in PerRow(keep=2).violation(torch.tensor([[True, False, False]]))
    assert "block" in NM(1, 2).violation(torch.tensor([[True, True, False, True]]))
    assert "rows differ" in Columns(keep=1).violation(torch.tensor([[True, False], [False, True]]))
    assert Unstructured(0.5).violation(torch.tensor([[True, False], [False, True]])) is None


# ------------------------------------------------------------------ objectives
def test_mask_objective_matches_formula():
    W, G = _wg(seed=3)
    p = LayerProblem.create(W, G, pattern="per-row:4")
    mask = p.round(torch.as_tensor(np.abs(W)))
    U = W * (1 - mask.numpy())
    assert p.objective(mask) == pytest.approx(np.einsum("ri,ij,rj->", U, G, U), rel=1e-12)


def test_reconstruct_refit_matches_least_squares():
    W, G = _wg(d_out=4, d_in=10, seed=5)
    p = LayerProblem.create(W, G, pattern="per-row:5", objective="reconstruct")
    mask = p.round(torch.as_tensor(np.abs(W)))
    V = p.refit(mask).numpy()
    total = 0.0
    for r in range(4):
        S = mask[r].numpy()
        v = np.zeros(10)
        v[S] = np.linalg.lstsq(G[np.ix_(S, S)], (G @ W[r])[S], rcond=None)[0]
        assert np.allclose(V[r], v, rtol=1e-8, atol=1e-10)
        total += (W[r] - v) @ G @ (W[r] - v)
    assert p.objective(mask) == pytest.approx(total, rel=1e-10)
    assert not (V[~mask.numpy()]).any()


def test_refit_exact_on_singular_gram():
    W, G = _wg(d_out=3, d_in=8, seed=2, rank=3)
    p = LayerProblem.create(W, G, pattern="per-row:5", objective="reconstruct")
    mask = p.round(torch.as_tensor(np.abs(W)))
    V = p.refit(mask)
    assert torch.isfinite(V).all()
    # optimality: the gradient of the error on the support vanishes
    grad = ((V - p.W) @ p.G) * mask
    assert float(grad.abs().max()) < 1e-8 * float(p.G.abs().max() * p.W.abs().max())


def test_weights_objective_and_support_check():
    W, G = _wg()
    p = LayerProblem.create(W, G, pattern="per-row:4", objective="reconstruct")
    mask = p.round(torch.as_tensor(np.abs(W)))
    V = p.refit(mask)
    assert p.objective(weights=V) == pytest.approx(p.objective(mask), rel=1e-12)
    with pytest.raises(ProblemError, match="does not fit"):
        p.objective(weights=p.W)
    with pytest.raises(ProblemError, match="outside the mask"):
        p.objective(mask, weights=p.W)


@given(tiny_problems(max_d_in=7, max_d_out=3))
def test_scaling_leaves_both_objectives_unchanged(problem):
    scaled, d = problem.scaled()
    assert scaled.G.dtype == problem.dtype  # stored like the problem (float32 problems: rounded)
    rel = 1e-9 if problem.dtype == torch.float64 else 1e-5
    diag = torch.diagonal(scaled.G)[torch.diagonal(problem.G) > 0].double()
    assert torch.allclose(diag, torch.ones_like(diag), rtol=rel)
    mask = problem.round(problem.W.abs())
    # a float32 problem stores the scaled G rounded: a near-singular G_SS turns that rounding
    # (eps32 ≈ 6e-8 of the scale) into an absolute change of the refit error of that order
    absolute = (1e-12 if problem.dtype == torch.float64 else 1e-6) * problem.scale
    assert scaled.objective(mask) == pytest.approx(problem.objective(mask), rel=rel, abs=absolute)


@given(tiny_problems(max_d_in=7, max_d_out=3, objectives=("mask",)))
def test_reconstruct_never_worse_than_mask(problem):
    mask = problem.round(problem.W.abs())
    rec = problem.replace(objective="reconstruct")
    assert rec.objective(mask) <= problem.objective(mask) * (1 + 1e-9) + 1e-12 * problem.scale


def test_to_device_dtype():
    p = make_instance(2, 8, pattern="nm:2:4")
    q = p.to(dtype=torch.float32)
    assert q.W.dtype == torch.float32 and q.pattern == p.pattern


# ------------------------------------------------------------------ files
def test_instance_round_trip_with_G_and_X(tmp_path):
    W, G = _wg()
    save_instance(tmp_path / "a.npz", W, G)
    p = load_instance(tmp_path / "a.npz", pattern="nm:2:4", objective="reconstruct")
    assert np.allclose(p.G.numpy(), G) and p.objective_kind == "reconstruct"
    X = np.random.default_rng(0).standard_normal((20, 8))
    np.savez(tmp_path / "b.npz", W=W.astype(np.float32), X=X.astype(np.float32), extra=np.ones(3))
    q = load_instance(tmp_path / "b.npz", pattern="per-row:4")
    assert np.allclose(q.G.numpy(), X.astype(np.float32).astype(np.float64).T @ X.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("content, match", [
    (None, "not found"), (b"not a zip", "not an .npz"), (b"PK\x03\x04 truncated zip", "cannot read"),
    (b"\x93NUMPY", "a .npy array"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "x.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ProblemError, match=match):
        load_instance(path)


def test_missing_arrays(tmp_path):
    np.savez(tmp_path / "w.npz", G=np.eye(3))
    with pytest.raises(ProblemError, match="'W'"):
        load_instance(tmp_path / "w.npz")
    np.savez(tmp_path / "g.npz", W=np.ones((2, 3)))
    with pytest.raises(ProblemError, match="neither"):
        load_instance(tmp_path / "g.npz")


def test_generator_is_seeded_and_llm_like():
    a = make_arrays(4, 64, seed=7)
    b = make_arrays(4, 64, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    d = np.diag(a[1])
    assert d.max() / np.median(d) > 50  # outlier channels
    _, G = make_arrays(2, 16, seed=1, rank=6)
    assert np.linalg.matrix_rank(G) == 6


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os
    from pathlib import Path

    from layerprune.problems import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").read_text() == "x"
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_values_that_overflow_are_refused():
    W = np.ones((2, 3))
    with pytest.raises(ProblemError, match="does not fit float32"):
        LayerProblem.create(W, 1e39 * np.eye(3), dtype=torch.float32)
    with pytest.raises(ProblemError, match="too large"):
        LayerProblem.create(1e160 * W, np.eye(3))
    with pytest.raises(ProblemError, match="XᵀX overflows"):
        LayerProblem.create(W, X=np.full((4, 3), 1e200))
    p = LayerProblem.create(1e100 * W, np.eye(3))  # large but every objective fits float64
    assert np.isfinite(p.scale) and p.G.dtype == torch.float64


def test_dense_targets_in_files(tmp_path):
    W, G = np.ones((2, 3)), np.eye(3)
    np.savez(tmp_path / "same.npz", W=W, G=G, C=G, G0=G)  # C = G0 = G: the file's own problem
    same = load_instance(tmp_path / "same.npz", pattern="per-row:3")
    assert same.objective(np.ones((2, 3), bool)) == 0.0 and not same.has_target
    np.savez(tmp_path / "half.npz", W=W, G=G, C=0.5 * G, G0=G)  # X̃, X correlated by 1/2: ‖X̃w − Xw‖² = ‖w‖²
    half = load_instance(tmp_path / "half.npz", pattern="per-row:3")
    assert half.has_target and half.objective(np.ones((2, 3), bool)) == pytest.approx(2 * 3)
    for name, extra, match in [("c.npz", dict(C=G), "without G0"), ("g0.npz", dict(G0=G), "without C"),
                               ("diff.npz", dict(C=2.0 * G, G0=G), "do not fit G"),
                               ("nan.npz", dict(C=G, G0=np.full((3, 3), np.nan)), "NaN")]:
        np.savez(tmp_path / name, W=W, G=G, **extra)
        with pytest.raises(ProblemError, match=match):
            load_instance(tmp_path / name)
