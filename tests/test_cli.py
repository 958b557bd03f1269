"""`layerprune solve` and `layerprune solvers` exactly per CONTRACT.md."""
import json
import subprocess
import sys

import numpy as np
import pytest

from layerprune.cli import main
from layerprune.problems import make_arrays, save_instance
from layerprune.solvers import get_solver_class, solver_names

KEYS = {"solver", "status", "limit", "objective", "lower_bound", "gap", "seconds", "iterations"}


@pytest.fixture
def instance(tmp_path):
    W, G = make_arrays(3, 8, seed=4)
    path = tmp_path / "layer.npz"
    save_instance(path, W, G)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_json_and_saved_outputs(instance, tmp_path, capsys):
    mask_file, weights_file = tmp_path / "m.npy", tmp_path / "w.npy"
    code, out, err = run(capsys, "solve", instance, "--solver", "brute", "--pattern", "per-row:0.5",
                         "--objective", "reconstruct", "--save-mask", mask_file, "--save-weights", weights_file, "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert set(rec) == KEYS and rec["status"] == "optimal" and rec["gap"] == 0.0
    mask, weights = np.load(mask_file), np.load(weights_file)
    assert mask.dtype == bool and mask.shape == (3, 8) and (mask.sum(axis=1) == 4).all()
    assert weights.shape == (3, 8) and not weights[~mask].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.npz", "m.npy", "w.npy"]  # no temp files left


def test_solve_with_init_and_heuristic_has_null_bound(instance, capsys):
    code, out, _ = run(capsys, "solve", instance, "--solver", "wanda", "--pattern", "nm:2:4",
                       "--objective", "mask", "--json", "--init", "magnitude", "--seed", "3")
    rec = json.loads(out)
    assert code == 0 and rec["lower_bound"] is None and rec["gap"] is None and rec["status"] == "feasible"


def test_solve_human_readable(instance, capsys):
    code, out, _ = run(capsys, "solve", instance, "--solver", "brute", "--pattern", "columns:3", "--objective", "mask")
    assert code == 0 and "status     optimal" in out and "objective" in out


def _bad(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("setup, args, message", [
    (lambda p, t: t / "missing.npz", ["--solver", "brute", "--pattern", "per-row:4"], "not found"),
    (lambda p, t: _bad(t, "shape.npz", W=np.ones((2, 3)), G=np.eye(4)), ["--solver", "brute", "--pattern", "per-row:1"], "d_in"),
    (lambda p, t: _bad(t, "sym.npz", W=np.ones((2, 3)), G=np.triu(np.ones((3, 3)))), ["--solver", "brute", "--pattern", "per-row:1"], "symmetric"),
    (lambda p, t: _bad(t, "psd.npz", W=np.ones((2, 3)), G=-np.eye(3)), ["--solver", "brute", "--pattern", "per-row:1"], "positive semi-definite"),
    (lambda p, t: _bad(t, "nan.npz", W=np.full((2, 3), np.nan), G=np.eye(3)), ["--solver", "brute", "--pattern", "per-row:1"], "NaN"),
    (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:12"], "out of range"),
    (lambda p, t: p, ["--solver", "brute", "--pattern", "nm:2:3"], "not divisible"),
    (lambda p, t: p, ["--solver", "nosuch", "--pattern", "per-row:4"], "unknown solver"),
    (lambda p, t: p, ["--solver", "sparsegpt", "--pattern", "columns:4"], "cannot take pattern"),
    (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:4", "--init", "nosuch"], "unknown solver"),
    (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:4", "--time-limit", "-1"], "positive"),
    (lambda p, t: p, ["--solver", "brute", "--pattern", "bogus"], "unknown pattern"),
])
def test_bad_input_one_line_nothing_written(instance, tmp_path, capsys, setup, args, message):
    path = setup(instance, tmp_path)
    if "sparsegpt" in args and "columns" in get_solver_class("sparsegpt").patterns:
        pytest.skip("sparsegpt takes columns")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, "solve", path, *args, "--objective", "mask",
                         "--save-mask", tmp_path / "m.npy", "--save-weights", tmp_path / "w.npy")
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_backend_package_is_one_clear_line(instance, tmp_path, capsys, monkeypatch):
    cls = get_solver_class("wanda")
    monkeypatch.setattr(cls, "requires", ("surely_not_installed_pkg",))
    code, _, err = run(capsys, "solve", instance, "--solver", "wanda", "--pattern", "per-row:4",
                       "--objective", "mask", "--save-mask", tmp_path / "m.npy")
    assert code != 0 and "surely_not_installed_pkg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npy").exists()


def test_usage_error_is_one_line(capsys):
    code, _, err = run(capsys, "solve", "x.npz", "--pattern", "per-row:4", "--objective", "mask")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--solver" in err


def test_solvers_lists_every_backend(capsys):
    code, out, _ = run(capsys, "solvers", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == solver_names()
    assert all({"installed", "patterns", "objectives", "certifies"} <= set(r) for r in rows)
    code, out, _ = run(capsys, "solvers")
    assert all(name in out for name in solver_names())


def test_console_script_entry_point(instance):
    out = subprocess.run([sys.executable, "-m", "layerprune", "solve", str(instance), "--solver", "magnitude",
                          "--pattern", "unstructured:0.5", "--objective", "mask", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["solver"] == "magnitude"
