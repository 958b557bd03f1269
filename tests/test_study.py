"""`layerprune study` per CONTRACT.md ("Study spec and results table"): spec checks, a full study,
resumption after a kill, failing cases as error rows, instances cut from a model, schedulers."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import numpy as np
import pytest

import study_backends
from layerprune.cli import main
from layerprune.problems import make_arrays, save_instance
from layerprune.solvers import SOLVERS
from layerprune.studies import load_spec, plan_cases, relative_gap, run_study

CONTRACT_COLUMNS = ["case", "instance", "d_out", "d_in", "pattern", "objective_kind", "solver", "seed",
                    "status", "limit", "objective", "lower_bound", "best_bound", "best_objective", "gap",
                    "seconds", "iterations", "versions"]

GRID = """
[grid]
patterns = {patterns}
objectives = {objectives}
solvers = {solvers}
time_limit = {time_limit}
seeds = {seeds}
"""


def write_study(root: Path, *, n_instances=2, shape=(4, 12), files='["inst/*.npz"]', patterns='["per-row:0.5", "nm:2:4"]',
                objectives='["mask", "reconstruct"]', solvers='["wanda", "sparseswaps", "bnb"]', time_limit="1",
                seeds="[0]", extra="") -> Path:
    """Instance files ``root/inst/a{i}.npz`` and ``root/spec.toml``; returns the spec's path."""
    for i in range(n_instances):
        W, G = make_arrays(*shape, seed=i)
        save_instance(root / "inst" / f"a{i}.npz", W, G)
    spec = root / "spec.toml"
    spec.write_text(f"[instances]\nfiles = {files}\n{extra}\n"
                    + GRID.format(patterns=patterns, objectives=objectives, solvers=solvers,
                                  time_limit=time_limit, seeds=seeds))
    return spec


def check_table(df: pd.DataFrame) -> None:
    """Group columns equal a recomputation; every bound ≤ every objective of its group."""
    assert list(df.columns[:len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert df["case"].is_unique
    for _, group in df.groupby(["instance", "pattern", "objective_kind"]):
        bounds, objectives = group["lower_bound"].dropna(), group["objective"].dropna()
        best_bound = bounds.max() if len(bounds) else None
        assert (group["best_objective"] == objectives.min()).all()
        if best_bound is None:
            assert group["best_bound"].isna().all() and group["gap"].isna().all()
            continue
        assert (group["best_bound"] == best_bound).all()
        assert best_bound <= objectives.min() * (1 + 1e-7) + 1e-12
        for _, row in group.iterrows():
            expected = relative_gap(None if math.isnan(row["objective"]) else row["objective"], best_bound)
            assert (expected is None and math.isnan(row["gap"])) or row["gap"] == pytest.approx(expected, abs=1e-15)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- bad input
def _bad_instance(root):
    (root / "inst" / "bad.npz").write_bytes(b"not an npz")


BAD_SPECS = {
    "unknown section": (dict(extra="[other]\nx = 1"), "unknown section [other]"),
    "unknown key": (dict(extra="shape = 3"), "unknown key instances.shape"),
    "bad pattern": (dict(patterns='["nm:5:4"]'), "grid.patterns"),
    "pattern not a string": (dict(patterns="[3]"), "grid.patterns"),
    "unknown solver": (dict(solvers='["wanda", "nope"]'), "unknown solver 'nope'"),
    "unknown objective": (dict(objectives='["both"]'), "grid.objectives"),
    "zero time limit": (dict(time_limit="0"), "grid.time_limit"),
    "negative time limit": (dict(time_limit="-5"), "grid.time_limit"),
    "time limit as a string": (dict(time_limit='"60"'), "grid.time_limit"),
    "negative seed": (dict(seeds="[-1]"), "grid.seeds"),
    "glob matching nothing": (dict(files='["none/*.npz"]'), "matched no instance file"),
    "no instance": (dict(files="[]"), "no instance matched"),
    "solver twice": (dict(solvers='["wanda", "wanda"]'), "twice"),
    "cut missing a key": (dict(extra='cut = { model = "smollm2" }'), "instances.cut: cut.blocks: missing"),
    "invalid TOML": (dict(extra="[grid"), "not valid TOML"),
    "bad instance file": (dict(extra=""), "instance inst/bad.npz"),
    "no case any solver takes": (dict(solvers='["sparseswaps"]', objectives='["reconstruct"]'), "no case to run"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_spec_is_one_line_exit_2_nothing_written(name, tmp_path, capsys):
    kwargs, phrase = BAD_SPECS[name]
    spec = write_study(tmp_path, **kwargs)
    if name == "bad instance file":
        _bad_instance(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, "study", spec, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no DIR


def test_bad_flags_and_out_dirs(tmp_path, capsys):
    spec = write_study(tmp_path)
    (tmp_path / "afile").write_text("x")
    other, broken = tmp_path / "other", tmp_path / "broken"
    other.mkdir()
    (other / "spec.toml").write_text("[grid]\n")
    broken.mkdir()
    (broken / "spec.toml").write_text(spec.read_text())
    (broken / "results.parquet").write_bytes(b"PAR1 not a table")
    before = {p: p.is_file() and p.stat().st_mtime_ns for p in tmp_path.rglob("*")}  # a probe file touches dirs
    for argv, phrase in [(["--out", tmp_path / "afile"], "not a directory"),
                         (["--out", other], "holds another study"),
                         (["--out", broken], "cannot read its results.parquet"),
                         (["--out", tmp_path / "new", "--workers", "0"], "--workers"),
                         (["--out", tmp_path / "new", "--workers", "1", "--scheduler", "tcp://x:1"], "not both")]:
        code, out, err = run_cli(capsys, "study", spec, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and phrase in err, (argv, err)
    assert {p: p.is_file() and p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_second_run_into_a_directory_being_written_is_refused(tmp_path, capsys):
    import fcntl

    spec = write_study(tmp_path, n_instances=1, patterns='["per-row:0.5"]', objectives='["mask"]', solvers='["wanda"]')
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with open(out_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        code, _, err = run_cli(capsys, "study", spec, "--out", out_dir, "--workers", "1")
    assert code == 2 and "another study run is writing there" in err
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]


def test_case_ids_are_stable_and_key_on_content(tmp_path):
    spec = load_spec(write_study(tmp_path, seeds="[0, 1]"))
    first = plan_cases(spec, spec.files, [tmp_path])
    assert len(first.cases) == 2 * 2 * 2 * 3 * 2 - 2 * 2 * 2 and len({c.case for c in first.cases}) == len(first.cases)
    assert {s.solver for s in first.skipped} == {"sparseswaps"}  # it takes no reconstruct, and says so
    assert [c.case for c in plan_cases(spec, spec.files, [tmp_path]).cases] == [c.case for c in first.cases]
    W, G = make_arrays(4, 12, seed=7)
    save_instance(tmp_path / "inst" / "a0.npz", W, G)
    changed = {c.case for c in plan_cases(spec, spec.files, [tmp_path]).cases}
    assert len(changed & {c.case for c in first.cases}) == len(first.cases) // 2  # a1's cases only


# --------------------------------------------------------------------------- full study, resumption
def test_full_study_on_two_local_workers_then_nothing_to_rerun(tmp_path, capsys):
    spec = write_study(tmp_path)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "study", spec, "--out", out_dir, "--workers", "2")
    assert code == 0, err
    assert "skipped 4 case(s): solver 'sparseswaps' cannot take objective 'reconstruct'" in err
    assert err.count("] ") == 20  # a progress line per case
    df = pd.read_parquet(out_dir / "results.parquet")
    assert len(df) == 20 and set(df["status"]) <= {"optimal", "feasible"}
    assert df["solver"].value_counts().to_dict() == {"wanda": 8, "sparseswaps": 4, "bnb": 8}
    assert len(set(df["host"])) == 2  # both workers solved cases
    assert df.loc[df.solver == "wanda", "lower_bound"].isna().all() and df.loc[df.solver == "bnb", "lower_bound"].notna().all()
    assert json.loads(df["versions"][0])["layerprune"]
    check_table(df)
    assert (out_dir / "spec.toml").read_text() == spec.read_text()
    code, _, err = run_cli(capsys, "study", spec, "--out", out_dir, "--plots")
    assert code == 0 and "20 already in the table, 0 to run" in err
    assert pd.read_parquet(out_dir / "results.parquet").equals(df)
    assert sorted(p.name for p in (out_dir / "plots").iterdir()) == [
        "gaps_mask.png", "gaps_reconstruct.png", "loss_heatmap_mask.png", "loss_heatmap_reconstruct.png",
        "performance_profile_mask.png", "performance_profile_reconstruct.png"]
    gaps = pd.read_csv(out_dir / "gap_table.csv")
    assert gaps["cases"].sum() == 20
    want = df[df.status.isin(["optimal", "feasible"])].groupby(["solver", "d_in", "pattern", "objective_kind"])["gap"]
    got = gaps.set_index(["solver", "d_in", "pattern", "objective_kind"])["median_gap"]
    assert np.allclose(got.loc[want.median().index], want.median(), equal_nan=True)


def test_killed_run_resumes_without_losing_or_repeating_a_case(tmp_path):
    spec = write_study(tmp_path, patterns='["per-row:0.5"]', objectives='["mask"]', seeds="[0, 1, 2]")
    out_dir, table = tmp_path / "out", tmp_path / "out" / "results.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "layerprune", "study", str(spec), "--out", str(out_dir),
                             "--workers", "1"], env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if table.exists() and pq.read_metadata(table).num_rows >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = pd.read_parquet(table)
    assert 3 <= len(first) < 18, "the run was not interrupted midway"
    resumed = run_study(spec, out_dir, workers=1, progress=False)
    assert len(resumed) == 18 and resumed["case"].is_unique
    kept = resumed.set_index("case").loc[first["case"]]
    assert (kept["finished_at"].values == first["finished_at"].values).all()  # finished cases not run again
    assert (resumed["run"] != first["run"][0]).sum() == 18 - len(first)
    check_table(resumed)


# --------------------------------------------------------------------------- failures, cut, schedulers
@pytest.fixture(scope="module")
def cluster():
    """Two worker processes that know the test-only backends (study_backends)."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_kwargs={"allowed_failures": 0}) as cluster, Client(cluster) as client:
        client.register_plugin(study_backends.RegisterBackends())
        yield cluster


def test_hanging_crashing_and_failing_cases_are_error_rows(cluster, tmp_path, monkeypatch):
    for name, target in study_backends.NAMES.items():
        monkeypatch.setitem(SOLVERS, name, target)
    monkeypatch.setitem(sys.modules, "layerprune.solvers.study_backends", study_backends)
    spec = write_study(tmp_path, n_instances=1, patterns='["per-row:0.5"]', objectives='["mask"]',
                       solvers='["hang", "crash", "fail", "wanda"]', time_limit="0.5")
    started = time.monotonic()
    # grace 6 s: a restarted worker's first case must finish within 2 × 0.5 + 6 s on a loaded machine
    df = run_study(spec, tmp_path / "out", scheduler=cluster.scheduler_address, grace=6.0, progress=False)
    assert time.monotonic() - started < 90
    rows = df.set_index("solver")
    assert rows.loc["wanda", "status"] == "feasible", df[["solver", "status", "message"]].to_string()
    assert (rows.loc[["hang", "crash", "fail"], "status"] == "error").all()
    assert "no result 7 s after it started" in rows.loc["hang", "message"]
    assert "worker was restarted" in rows.loc["hang", "message"]
    assert "worker died" in rows.loc["crash", "message"]
    assert rows.loc["fail", "message"] == "RuntimeError: deliberate failure second line"
    check_table(df)


def test_cut_instances_go_to_the_study_directory(cluster, tmp_path, monkeypatch, capsys):
    made = []

    def parse_cut(raw):
        if raw.get("model") != "tiny":
            raise ValueError(f"unknown model {raw.get('model')!r}")
        return types.SimpleNamespace(sizes=tuple(raw["sizes"]))

    def cut_model_instances(cut, out_dir):
        paths = []
        for size in cut.sizes:
            W, G = make_arrays(2, size, seed=size)
            paths.append(out_dir / f"tiny-{size}.npz")
            save_instance(paths[-1], W, G)
        made.append(paths)
        return paths

    library = types.ModuleType("layerprune.library")
    library.parse_cut, library.cut_model_instances = parse_cut, cut_model_instances
    monkeypatch.setitem(sys.modules, "layerprune.library", library)
    bad = write_study(tmp_path, n_instances=0, files="[]", extra='cut = { model = "huge", sizes = [8] }')
    code, _, err = run_cli(capsys, "study", bad, "--out", tmp_path / "out")
    assert code == 2 and "instances.cut: unknown model 'huge'" in err and not (tmp_path / "out").exists()
    spec = write_study(tmp_path, n_instances=0, files="[]", extra='cut = { model = "tiny", sizes = [8, 16] }',
                       patterns='["per-row:0.5"]', objectives='["mask"]', solvers='["wanda"]')
    df = run_study(spec, tmp_path / "out", scheduler=cluster.scheduler_address, progress=False)
    assert sorted(df["instance"]) == ["instances/tiny-16.npz", "instances/tiny-8.npz"]
    assert sorted(df["d_in"]) == [8, 16] and made == [[tmp_path / "out" / "instances" / f"tiny-{s}.npz" for s in (8, 16)]]


@pytest.mark.slow
def test_scheduler_and_worker_started_from_the_dask_cli(tmp_path, capsys):
    spec = write_study(tmp_path, patterns='["per-row:0.5"]', solvers='["wanda", "bnb"]')
    address_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--no-dashboard",
                               "--port", "0", "--scheduler-file", str(address_file)],
                              env=env, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--nthreads", "1",
                                       "--no-dashboard", "--scheduler-file", str(address_file)],
                                      env=env, stderr=subprocess.DEVNULL, start_new_session=True))
        address = json.loads(address_file.read_text())["address"]
        code, _, err = run_cli(capsys, "study", spec, "--out", tmp_path / "out", "--scheduler", address)
        assert code == 0, err
        df = pd.read_parquet(tmp_path / "out" / "results.parquet")
        assert len(df) == 2 * 2 * 2 and set(df["status"]) <= {"optimal", "feasible"}
        check_table(df)
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    code, _, err = run_cli(capsys, "study", spec, "--out", tmp_path / "out2", "--scheduler", address)
    assert code == 2 and "cannot connect" in err and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_a_study_on_cuts_of_the_bundled_model(tmp_path, capsys):
    """The real instance library behind ``instances.cut``: a bad cut key is one line before
    anything is written; a good one cuts from SmolLM2 into DIR/instances and solves the cuts."""
    pytest.importorskip("layerprune.models")
    bad = write_study(tmp_path, n_instances=0, files="[]",
                      extra='cut = { model = "smollm2", blocks = [30], layers = ["q_proj"], sizes = [16], '
                            'rows = 2, channels = "wanda" }')
    code, _, err = run_cli(capsys, "study", bad, "--out", tmp_path / "bad")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cut.blocks" in err
    assert not (tmp_path / "bad").exists()
    spec = write_study(tmp_path, n_instances=0, files="[]",
                       extra='cut = { model = "smollm2", blocks = [1], layers = ["q_proj", "down_proj"], '
                             'sizes = [16], rows = 2, channels = "wanda", nsamples = 4, seqlen = 64 }',
                       patterns='["per-row:0.5"]', objectives='["mask"]', solvers='["wanda", "bnb"]',
                       time_limit="30")
    code, _, err = run_cli(capsys, "study", spec, "--out", tmp_path / "out", "--workers", "1")
    assert code == 0, err
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert sorted(set(df["instance"])) == ["instances/smollm2-b1-down_proj-16-r2-wanda-s0.npz",
                                           "instances/smollm2-b1-q_proj-16-r2-wanda-s0.npz"]
    assert (df.loc[df.solver == "bnb", "status"] == "optimal").all()
    check_table(df)
