"""The instance library: channel/row selection, cuts with provenance, synthetic families, cut specs
and cutting from a model (a tiny random one; the bundled one in a slow test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from layerprune.library import CutSpec, cut_model_instances, instance_path, parse_cut
from layerprune.problems import (FAMILIES, ProblemError, Provenance, cut_instance, load_instance, make_family,
                                 read_provenance, save_cut, save_instance, select_channels, select_rows)
from layerprune.problems.library import column_scores

transformers = pytest.importorskip("transformers")


def _layer(d_out=6, d_in=40, n=200, seed=0):
    """W, X and G = XᵀX/n with a few loud channels."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d_in)) * rng.uniform(0.5, 1.5, d_in)
    X[:, [3, 17, 31]] *= 30.0
    W = rng.standard_normal((d_out, d_in))
    return W, X, X.T @ X / n


# ---------------------------------------------------------------- selection and cuts


def test_wanda_channels_are_the_top_column_scores_over_the_rows():
    W, _, G = _layer()
    rows = [1, 4]
    score = np.abs(W[rows]).sum(0) * np.sqrt(np.diag(G))
    np.testing.assert_allclose(column_scores(W, G, rows).numpy(), score)
    got = select_channels(W, G, 10, "wanda", rows=rows)
    assert got.dtype == torch.long and got.tolist() == sorted(np.argsort(-score, kind="stable")[:10].tolist())


def test_wanda_ties_go_to_the_lower_index():
    W, G = np.ones((2, 8)), np.eye(8)
    assert select_channels(W, G, 3, "wanda").tolist() == [0, 1, 2]


def test_random_channels_and_rows_are_seeded_distinct_and_sorted():
    W, _, G = _layer()
    a = select_channels(W, G, 12, "random", seed=5)
    assert torch.equal(a, select_channels(W, G, 12, "random", seed=5))
    assert not torch.equal(a, select_channels(W, G, 12, "random", seed=6))
    assert a.unique().numel() == 12 and a.tolist() == sorted(a.tolist())
    r = select_rows(W, 3, "random", seed=2)
    assert torch.equal(r, select_rows(W, 3, "random", seed=2)) and r.unique().numel() == 3
    assert select_rows(W, 2, "first").tolist() == [0, 1]


def test_outlier_channels_are_always_kept():
    W, _, G = _layer()
    loud = np.argsort(-np.diag(G), kind="stable")[:3].tolist()
    assert sorted(loud) == [3, 17, 31]
    for seed in range(4):
        got = set(select_channels(W, G, 16, "outliers", seed=seed).tolist())
        assert set(loud[:2]) <= got and len(got) == 16  # max(1, 16 // 8) = 2 loudest always in
    assert set(loud) <= set(select_channels(W, G, 24, "outliers").tolist())  # 24 // 8 = 3


@pytest.mark.parametrize("call, match", [
    (lambda W, G: select_channels(W, G, 0, "wanda"), "size must be in 1..40"),
    (lambda W, G: select_channels(W, G, 41, "random"), "size must be in 1..40"),
    (lambda W, G: select_channels(W, G, 4, "best"), "channel rule must be one of"),
    (lambda W, G: select_rows(W, 7), "rows must be in 1..6"),
    (lambda W, G: cut_instance(W, G, [0, 0], [1, 2]), "rows: repeated"),
    (lambda W, G: cut_instance(W, G, [0], [40]), "channels: indices must be in 0..39"),
    (lambda W, G: cut_instance(W, G, [0], [1], C=G), "C and G0 together"),
])
def test_bad_selection_is_one_clear_error(call, match):
    W, _, G = _layer()
    with pytest.raises(ProblemError, match=match):
        call(W, G)


def test_cut_is_the_principal_block_and_the_gram_of_the_kept_inputs():
    W, X, G = _layer()
    rows, chans = [0, 5], [2, 3, 9, 30]
    W_sub, G_sub, C_sub, G0_sub = cut_instance(W, G, rows, chans, C=2 * G, G0=3 * G)
    np.testing.assert_array_equal(W_sub, W[[0, 5]][:, [2, 3, 9, 30]])
    np.testing.assert_allclose(G_sub, X[:, chans].T @ X[:, chans] / X.shape[0], rtol=1e-12)
    np.testing.assert_array_equal(C_sub, 2 * G_sub)
    np.testing.assert_array_equal(G0_sub, 3 * G_sub)
    Wt, Gt = cut_instance(torch.as_tensor(W), torch.as_tensor(G), torch.tensor(rows), torch.tensor(chans))
    assert torch.equal(Wt, torch.as_tensor(W_sub)) and torch.equal(Gt, torch.as_tensor(G_sub))


def _provenance(rows, chans):
    return Provenance(model="smollm2", block=3, layer="q_proj", rows=tuple(rows), channels=tuple(chans),
                      how="wanda", calib="austen-calib", nsamples=16, seqlen=128, seed=0,
                      module="model.layers.3.self_attn.q_proj", layer_shape=(6, 40))


def test_provenance_round_trips_and_readers_ignore_it(tmp_path):
    W, _, G = _layer()
    rows = select_rows(W, 2, seed=1)
    chans = select_channels(W, G, 8, "wanda", rows=rows)
    W_sub, G_sub = cut_instance(W, G, rows, chans)
    prov = _provenance(rows.tolist(), chans.tolist())
    path = tmp_path / "cut.npz"
    save_cut(path, W_sub, G_sub, prov)
    assert read_provenance(path) == prov
    problem = load_instance(path, pattern="per-row:4")
    assert tuple(problem.W.shape) == (2, 8)
    np.testing.assert_array_equal(problem.G.numpy(), G_sub)
    save_instance(tmp_path / "plain.npz", W_sub, G_sub)
    assert read_provenance(tmp_path / "plain.npz") is None


def test_save_instance_refuses_extras_that_readers_would_read_or_unpickle(tmp_path):
    W, _, G = _layer()
    with pytest.raises(ProblemError, match="'G' would be read"):
        save_instance(tmp_path / "a.npz", W, G, extras={"G": G})
    with pytest.raises(ProblemError, match="Python objects"):
        save_instance(tmp_path / "a.npz", W, G, extras={"meta": np.array([{"a": 1}], dtype=object)})
    assert not (tmp_path / "a.npz").exists()


# ---------------------------------------------------------------- synthetic families


def _condition(G):
    e = np.linalg.eigvalsh(G)
    return e[-1] / e[0]


def test_families_have_the_property_they_name():
    d = 64
    assert _condition(make_family("iid", 4, d, seed=0)[1]) < 6  # Marchenko–Pastur at n = 8d: ≈ 4.2
    _, G = make_family("outliers", 4, d, seed=1, outlier_strength=20.0, n_outliers=2)
    scale = np.sort(np.sqrt(np.diag(G)))
    assert 20 / 1.25 < scale[-2] / np.median(scale) < 20 * 1.25 and scale[-3] < 1.5
    for rho in (0.5, 0.9):
        _, G = make_family("correlated", 4, d, seed=2, correlation=rho)
        s = np.sqrt(np.diag(G))
        assert abs(np.mean(np.diag(G, 1) / (s[1:] * s[:-1])) - rho) < 0.05
    for cond in (1e3, 1e6):
        c = _condition(make_family("ill_conditioned", 4, d, seed=3, condition=cond)[1])
        assert cond / 5 < c < cond * 5
    for name in FAMILIES:
        W, G = make_family(name, 5, 32, seed=4)
        assert W.shape == (5, 32) and G.shape == (32, 32) and np.allclose(G, G.T)
        assert np.array_equal(W, make_family(name, 5, 32, seed=4)[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="lowrank"), "family must be one of"),
    (dict(name="correlated", correlation=1.0), "correlation must be in"),
    (dict(name="ill_conditioned", condition=0.5), "condition must be"),
    (dict(name="outliers", outlier_strength=0.0), "outlier_strength must be"),
])
def test_bad_family_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_family(name, 4, 16, **kwargs)


# ---------------------------------------------------------------- cut specs

GOOD = dict(model="smollm2", blocks=[3, 14], layers=["q_proj", "down_proj"], sizes=[16, 32, 64], rows=2,
            channels="wanda", seed=0)


def test_parse_cut_takes_the_contract_example():
    spec = parse_cut(GOOD)
    assert spec == CutSpec(blocks=(3, 14), layers=("q_proj", "down_proj"), sizes=(16, 32, 64), rows=2,
                           channels="wanda")
    assert (spec.nsamples, spec.seqlen, spec.calib) == (16, 128, "austen-calib")


@pytest.mark.parametrize("change, match", [
    (dict(colour="red"), r"^cut: unknown key 'colour'"),
    (dict(rows=None), r"^cut.rows: missing"),
    (dict(blocks=3), r"^cut.blocks: must be a list"),
    (dict(blocks=[30]), r"^cut.blocks: block 30 out of range: smollm2 has 30 blocks"),
    (dict(blocks=[-1]), r"^cut.blocks: each entry must be a non-negative integer"),
    (dict(blocks=[]), r"^cut.blocks: must be a non-empty list"),
    (dict(layers=["qproj"]), r"^cut.layers: unknown layer 'qproj'"),
    (dict(sizes=[16, 16]), r"^cut.sizes: repeated entries"),
    (dict(sizes=[600]), r"^cut.sizes: size 600 exceeds smollm2 q_proj's d_in = 576"),
    (dict(layers=["k_proj"], rows=193), r"^cut.rows: 193 rows exceed smollm2 k_proj's d_out = 192"),
    (dict(rows=True), r"^cut.rows: must be a positive integer"),
    (dict(channels="best"), r"^cut.channels: must be one of wanda, random, outliers"),
    (dict(seed=-1), r"^cut.seed: must be an integer ≥ 0"),
    (dict(nsamples=0), r"^cut.nsamples: must be an integer ≥ 1"),
    (dict(model=""), r"^cut.model: must be a non-empty string"),
])
def test_parse_cut_errors_are_one_line_naming_the_key(change, match):
    raw = {**GOOD, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=match) as info:
        parse_cut(raw)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- cutting from a model


def tiny_llama(layers: int = 3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_cut(monkeypatch):
    """cut_model_instances on a tiny random LLaMA (model path 'tiny'); counts the loads."""
    import layerprune.library as library

    loads = []
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))

    def load(spec, cache_dir):
        loads.append(spec.model)
        return tiny_llama(), ids

    monkeypatch.setattr(library, "_load", load)
    return loads, ids


def test_cut_writes_instances_with_provenance_and_is_idempotent(tmp_path, tiny_cut):
    from layerprune.pipeline import layer_problems

    loads, ids = tiny_cut
    spec = CutSpec(model="tiny", blocks=(0, 2), layers=("q_proj", "down_proj"), sizes=(8, 16), rows=2,
                   channels="wanda", nsamples=4, seqlen=16)
    paths = cut_model_instances(spec, tmp_path / "lib")
    assert [p.name for p in paths[:2]] == ["tiny-b0-q_proj-8-r2-wanda-s0.npz", "tiny-b0-q_proj-16-r2-wanda-s0.npz"]
    assert len(paths) == 8 and all(p.is_file() for p in paths) and loads == ["tiny"]
    full = layer_problems(tiny_llama(), ids, 2)["model.layers.2.mlp.down_proj"]
    path = instance_path(spec, tmp_path / "lib", 2, "down_proj", 16)
    prov = read_provenance(path)
    assert (prov.block, prov.layer, prov.module, prov.layer_shape) == (2, "down_proj", "model.layers.2.mlp.down_proj",
                                                                        (32, 64))
    assert len(prov.rows) == 2 and len(prov.channels) == 16
    assert prov.channels == tuple(select_channels(full.W, full.G, 16, "wanda", rows=list(prov.rows)).tolist())
    problem = load_instance(path)
    W_sub, G_sub = cut_instance(full.W, full.G, list(prov.rows), list(prov.channels))
    torch.testing.assert_close(problem.W, W_sub)
    torch.testing.assert_close(problem.G, G_sub)
    small = read_provenance(instance_path(spec, tmp_path / "lib", 2, "down_proj", 8))
    assert small.rows == prov.rows and set(small.channels) <= set(prov.channels)  # nested sizes
    before = {p: p.stat().st_mtime_ns for p in paths}
    assert cut_model_instances(spec, tmp_path / "lib") == paths and loads == ["tiny"]  # no model loaded
    assert {p: p.stat().st_mtime_ns for p in paths} == before


def test_cut_fills_in_missing_files_only(tmp_path, tiny_cut):
    loads, _ = tiny_cut
    spec = CutSpec(model="tiny", blocks=(1,), layers=("o_proj",), sizes=(4, 8), rows=1, channels="random",
                   nsamples=4, seqlen=16)
    first, second = cut_model_instances(spec, tmp_path)
    kept = first.stat().st_mtime_ns
    data = second.read_bytes()
    second.unlink()
    assert cut_model_instances(spec, tmp_path) == [first, second] and len(loads) == 2
    assert first.stat().st_mtime_ns == kept and second.read_bytes() == data  # deterministic


def test_cut_refuses_before_writing(tmp_path, tiny_cut):
    loads, _ = tiny_cut
    spec = CutSpec(model="tiny", blocks=(0, 1), layers=("q_proj",), sizes=(8,), rows=2, channels="outliers",
                   nsamples=4, seqlen=16)
    foreign = instance_path(spec, tmp_path, 1, "q_proj", 8)
    save_instance(foreign, np.ones((2, 8)), np.eye(8))
    with pytest.raises(ValueError, match="exists and is not this cut's instance"):
        cut_model_instances(spec, tmp_path)
    assert loads == [] and sorted(tmp_path.iterdir()) == [foreign]
    for bad, match in ((dict(blocks=(3,)), "cut.blocks: block 3 out of range: tiny has 3 blocks"),
                       (dict(layers=("c_attn",)), "cut.layers: unknown layer 'c_attn' in block 0"),
                       (dict(sizes=(33,)), "cut.sizes: size 33 exceeds tiny block 0 q_proj's d_in = 32")):
        spec_bad = CutSpec(**{**spec.__dict__, **bad})
        with pytest.raises(ValueError, match=match):
            cut_model_instances(spec_bad, tmp_path / "new")
        assert not (tmp_path / "new").exists()


def test_the_bundled_models_names_are_one_model_for_idempotence():
    from layerprune.library import _matches

    spec = parse_cut({**GOOD, "model": "SmolLM2-135M-Instruct", "layers": ["q_proj"], "sizes": [8], "rows": 1})
    prov = Provenance(model="smollm2", block=3, layer="q_proj", rows=(5,), channels=tuple(range(8)), how="wanda",
                      calib="austen-calib", nsamples=16, seqlen=128, seed=0)
    assert spec.model_tag() == "smollm2" and _matches(prov, spec, 3, "q_proj", 8)
    assert not _matches(prov, spec, 3, "q_proj", 16) and not _matches(prov, spec, 14, "q_proj", 8)
    assert not _matches(Provenance(**{**prov.__dict__, "nsamples": 32}), spec, 3, "q_proj", 8)


def test_iter_layer_problems_matches_one_block_at_a_time():
    from layerprune.pipeline import iter_layer_problems, layer_problems

    model = tiny_llama(layers=4)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    got = dict(iter_layer_problems(model, ids, [3, -4, 1, 3]))
    assert list(got) == [0, 1, 3]
    for b, probs in got.items():
        one = layer_problems(model, ids, b)
        assert list(one) == list(probs)
        for name in one:
            torch.testing.assert_close(probs[name].G, one[name].G, rtol=1e-12, atol=1e-12)
    with pytest.raises(ProblemError, match="block 4 out of range"):
        next(iter_layer_problems(model, ids, [0, 4]))


# ---------------------------------------------------------------- the bundled model


@pytest.mark.slow
def test_cut_from_the_bundled_model_gives_problems_bnb_solves(tmp_path):
    from layerprune.solvers import Params, make_solver

    spec = parse_cut(dict(model="smollm2", blocks=[1, 4], layers=["o_proj", "down_proj"], sizes=[16, 32], rows=2,
                          channels="wanda", seed=0, nsamples=4, seqlen=64))
    paths = cut_model_instances(spec, tmp_path)
    assert len(paths) == 8
    for path in paths:
        prov = read_provenance(path)
        problem = load_instance(path, pattern="per-row:0.5")
        assert tuple(problem.W.shape) == (2, len(prov.channels)) and prov.model == "smollm2"
        assert len(set(prov.channels)) == len(prov.channels) and max(prov.channels) < prov.layer_shape[1]
        if len(prov.channels) == 16:
            res = make_solver("bnb").solve(problem, params=Params(time_limit=20))
            assert res.status == "optimal", (path.name, res.status)
