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


def _raw(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _npy_as_npz(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((2, 3)))
    return path


W23 = np.arange(1.0, 7.0).reshape(2, 3)
G3 = np.eye(3)
BRUTE = ["--solver", "brute", "--pattern", "per-row:1"]


def _out_in_file(tmp_path, name):
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile" / name


#: (instance setup, solve arguments, a phrase of the one stderr line, outputs (mask, weights) or None)
BAD = {
    # files of the wrong kind
    "missing": (lambda p, t: t / "missing.npz", BRUTE, "not found", None),
    "directory": (lambda p, t: t, BRUTE, "not a regular file", None),
    "device file": (lambda p, t: "/dev/null", BRUTE, "not a regular file", None),
    "not a zip": (lambda p, t: _raw(t, "text.npz", b"W,G\n1,2\n"), BRUTE, "not an .npz", None),
    "npy named npz": (lambda p, t: _npy_as_npz(t), BRUTE, "a .npy array", None),
    "broken zip": (lambda p, t: _raw(t, "zip.npz", b"PK\x03\x04garbage"), BRUTE, "cannot read", None),
    "no W": (lambda p, t: _bad(t, "nw.npz", G=G3), BRUTE, "no array 'W'", None),
    "no G or X": (lambda p, t: _bad(t, "ng.npz", W=W23), BRUTE, "neither", None),
    "pickled object array": (lambda p, t: _bad(t, "obj.npz", W=np.array([W23, None], dtype=object), G=G3), BRUTE,
                             "cannot read", None),
    "1-D W": (lambda p, t: _bad(t, "w1.npz", W=W23[0], G=G3), BRUTE, "2-D", None),
    "3-D W": (lambda p, t: _bad(t, "w3.npz", W=W23[None], G=G3), BRUTE, "2-D", None),
    "empty W": (lambda p, t: _bad(t, "w0.npz", W=np.zeros((0, 3)), G=G3), BRUTE, "non-empty", None),
    "complex W": (lambda p, t: _bad(t, "c.npz", W=W23 + 0j, G=G3), BRUTE, "float32 or float64", None),
    "integer W": (lambda p, t: _bad(t, "i.npz", W=W23.astype(np.int64), G=G3), BRUTE, "float32 or float64", None),
    "integer G": (lambda p, t: _bad(t, "ig.npz", W=W23, G=np.eye(3, dtype=np.int32)), BRUTE, "float32 or float64", None),
    "bool W": (lambda p, t: _bad(t, "b.npz", W=W23 > 2, G=G3), BRUTE, "float32 or float64", None),
    "string W": (lambda p, t: _bad(t, "s.npz", W=np.array([["a"]]), G=G3), BRUTE, "float32 or float64", None),
    "float16 X": (lambda p, t: _bad(t, "h.npz", W=W23, X=np.ones((4, 3), np.float16)), BRUTE, "float32 or float64", None),
    # CONTRACT's bad values
    "shape": (lambda p, t: _bad(t, "shape.npz", W=np.ones((2, 3)), G=np.eye(4)), BRUTE, "d_in", None),
    "non-square G": (lambda p, t: _bad(t, "sq.npz", W=W23, G=np.ones((3, 2))), BRUTE, "square", None),
    "non-symmetric G": (lambda p, t: _bad(t, "sym.npz", W=np.ones((2, 3)), G=np.triu(np.ones((3, 3)))), BRUTE,
                        "symmetric", None),
    "non-PSD G": (lambda p, t: _bad(t, "psd.npz", W=np.ones((2, 3)), G=-np.eye(3)), BRUTE, "positive semi-definite", None),
    "NaN W": (lambda p, t: _bad(t, "nan.npz", W=np.full((2, 3), np.nan), G=G3), BRUTE, "NaN", None),
    "inf W": (lambda p, t: _bad(t, "winf.npz", W=np.full((2, 3), -np.inf), G=G3), BRUTE, "inf", None),
    "NaN G": (lambda p, t: _bad(t, "gnan.npz", W=W23, G=np.diag([1.0, np.nan, 1.0])), BRUTE, "NaN", None),
    "inf G": (lambda p, t: _bad(t, "ginf.npz", W=W23, G=np.diag([1.0, np.inf, 1.0])), BRUTE, "inf", None),
    "NaN X": (lambda p, t: _bad(t, "xnan.npz", W=W23, X=np.full((4, 3), np.nan)), BRUTE, "NaN", None),
    "inf X": (lambda p, t: _bad(t, "xinf.npz", W=W23, X=np.full((4, 3), np.inf)), BRUTE, "inf", None),
    "wrong-shape X": (lambda p, t: _bad(t, "xs.npz", W=W23, X=np.ones((4, 2))), BRUTE, "n × d_in", None),
    "huge X": (lambda p, t: _bad(t, "xh.npz", W=W23, X=np.full((4, 3), 1e200)), BRUTE, "too large", None),
    "huge W": (lambda p, t: _bad(t, "wh.npz", W=W23 * 1e160, G=G3), BRUTE, "too large", None),
    "huge G": (lambda p, t: _bad(t, "gh.npz", W=W23, G=1e308 * G3), BRUTE, "too large", None),
    "C without G0": (lambda p, t: _bad(t, "c.npz", W=W23, G=G3, C=G3), BRUTE, "C is given without G0", None),
    "G0 without C": (lambda p, t: _bad(t, "g0.npz", W=W23, G=G3, G0=G3), BRUTE, "G0 is given without C", None),
    "C of wrong shape": (lambda p, t: _bad(t, "cs.npz", W=W23, G=G3, C=np.eye(2), G0=G3), BRUTE, "C must be", None),
    "G0 of wrong shape": (lambda p, t: _bad(t, "g0s.npz", W=W23, G=G3, C=G3, G0=np.eye(4)), BRUTE, "G0 must be", None),
    "NaN C": (lambda p, t: _bad(t, "cnan.npz", W=W23, G=G3, C=np.diag([1.0, np.nan, 1.0]), G0=G3), BRUTE, "C contains NaN",
              None),
    "inf G0": (lambda p, t: _bad(t, "g0inf.npz", W=W23, G=G3, C=G3, G0=np.diag([1.0, np.inf, 1.0])), BRUTE,
               "G0 contains NaN or inf", None),
    "non-symmetric G0": (lambda p, t: _bad(t, "g0sym.npz", W=W23, G=G3, C=G3, G0=np.triu(np.ones((3, 3)))), BRUTE,
                         "G0 is not symmetric", None),
    "integer C": (lambda p, t: _bad(t, "ic.npz", W=W23, G=G3, C=np.eye(3, dtype=np.int32), G0=G3), BRUTE,
                  "float32 or float64", None),
    # [[G, 2G], [2G, G]] has eigenvalue −1: no pair of inputs has these Grams
    "targets that do not fit G": (lambda p, t: _bad(t, "cg.npz", W=W23, G=G3, C=2.0 * G3, G0=G3), BRUTE,
                                  "C and G0 do not fit G", None),
    "K out of range": (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:12"], "out of range", None),
    "K negative": (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:-1"], "out of range", None),
    "fraction 1": (lambda p, t: p, ["--solver", "brute", "--pattern", "unstructured:1.0"], "fraction", None),
    "fraction nan": (lambda p, t: p, ["--solver", "brute", "--pattern", "unstructured:nan"], "fraction", None),
    "count inf": (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:inf"], "per-row", None),
    "huge count": (lambda p, t: p, ["--solver", "brute", "--pattern", "columns:99999999999999999999"], "out of range", None),
    "d_in not divisible": (lambda p, t: p, ["--solver", "brute", "--pattern", "nm:2:3"], "not divisible", None),
    "N > M": (lambda p, t: p, ["--solver", "brute", "--pattern", "nm:3:2"], "N <= M", None),
    "empty pattern": (lambda p, t: p, ["--solver", "brute", "--pattern", ""], "unknown pattern", None),
    "bogus pattern": (lambda p, t: p, ["--solver", "brute", "--pattern", "bogus"], "unknown pattern", None),
    # solvers
    "unknown solver": (lambda p, t: p, ["--solver", "nosuch", "--pattern", "per-row:4"], "unknown solver", None),
    "empty solver": (lambda p, t: p, ["--solver", "", "--pattern", "per-row:4"], "--solver is empty", None),
    "empty init": (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:4", "--init", ""], "--init is empty", None),
    "cannot take pattern": (lambda p, t: p, ["--solver", "sparseswaps", "--pattern", "columns:4"], "cannot take pattern", None),
    "cannot take objective": (lambda p, t: p, ["--solver", "sparseswaps", "--pattern", "per-row:4", "--objective",
                                                "reconstruct"], "cannot take objective", None),
    "unknown init": (lambda p, t: p, ["--solver", "brute", "--pattern", "per-row:4", "--init", "nosuch"], "unknown solver", None),
    "init cannot take pattern": (lambda p, t: p, ["--solver", "brute", "--pattern", "columns:4", "--init", "sparseswaps"],
                                 "--init", None),
    # flags
    "time limit -1": (lambda p, t: p, BRUTE + ["--time-limit", "-1"], "--time-limit", None),
    "time limit 0": (lambda p, t: p, BRUTE + ["--time-limit", "0"], "--time-limit", None),
    "time limit inf": (lambda p, t: p, BRUTE + ["--time-limit", "inf"], "--time-limit", None),
    "time limit nan": (lambda p, t: p, BRUTE + ["--time-limit", "nan"], "--time-limit", None),
    "time limit huge": (lambda p, t: p, BRUTE + ["--time-limit", "1e300"], "--time-limit", None),
    "time limit empty": (lambda p, t: p, BRUTE + ["--time-limit", ""], "--time-limit", None),
    "time limit word": (lambda p, t: p, BRUTE + ["--time-limit", "soon"], "--time-limit", None),
    "seed negative": (lambda p, t: p, ["--solver", "bnb", "--pattern", "per-row:4", "--seed", "-3"], "--seed", None),
    "seed not an integer": (lambda p, t: p, BRUTE + ["--seed", "1.5"], "--seed", None),
    "seed empty": (lambda p, t: p, BRUTE + ["--seed", ""], "--seed", None),
    "objective empty": (lambda p, t: p, BRUTE + ["--objective", ""], "--objective", None),
    # outputs, all checked before the solve
    "mask in /proc": (lambda p, t: p, BRUTE, "cannot write --save-mask", ("/proc/m.npy", None)),
    "weights under a file": (lambda p, t: p, BRUTE, "not a directory", ("m.npy", "UNDER_FILE")),
    "mask is a directory": (lambda p, t: p, BRUTE, "is a directory", ("sub", None)),
    "empty output path": (lambda p, t: p, BRUTE, "empty path", ("", None)),
    "same output twice": (lambda p, t: p, BRUTE, "same file", ("x.npy", "./x.npy")),
    "output is the instance": (lambda p, t: p, BRUTE, "overwrite the instance", ("INSTANCE", None)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(instance, tmp_path, capsys, monkeypatch, case):
    setup, args, message, outs = BAD[case]
    path = setup(instance, tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    mask_out, weights_out = outs if outs is not None else (tmp_path / "m.npy", tmp_path / "w.npy")
    if weights_out == "UNDER_FILE":
        weights_out = _out_in_file(tmp_path, "w.npy")
    mask_out = instance if mask_out == "INSTANCE" else mask_out
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    argv = ["solve", path, *args]
    if "--objective" not in args:
        argv += ["--objective", "mask"]
    argv += ["--save-mask", mask_out] + ([] if weights_out is None else ["--save-weights", weights_out])
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and message in err, err
    assert out == ""
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing created or changed


def test_missing_backend_package_is_one_clear_line(instance, tmp_path, capsys, monkeypatch):
    cls = get_solver_class("wanda")
    monkeypatch.setattr(cls, "requires", ("surely_not_installed_pkg",))
    code, _, err = run(capsys, "solve", instance, "--solver", "wanda", "--pattern", "per-row:4",
                       "--objective", "mask", "--save-mask", tmp_path / "m.npy")
    assert code == 2 and "surely_not_installed_pkg" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.npy").exists()


def test_failing_write_leaves_nothing(instance, tmp_path, capsys, monkeypatch):
    """The second output fails while being written: the first is not left behind, no temporary
    remains, an existing file keeps its content, and no JSON is printed."""
    import layerprune.cli as cli

    (tmp_path / "m.npy").write_bytes(b"old mask")
    real = cli._save_npy
    calls = []

    def save(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, array)

    monkeypatch.setattr(cli, "_save_npy", save)
    code, out, err = run(capsys, "solve", instance, "--solver", "brute", "--pattern", "per-row:4", "--objective",
                         "reconstruct", "--save-mask", tmp_path / "m.npy", "--save-weights", tmp_path / "new" / "w.npy",
                         "--json")
    assert code == 2 and len(err.splitlines()) == 1 and "No space left" in err and out == ""
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.npz", "m.npy"]
    assert (tmp_path / "m.npy").read_bytes() == b"old mask"


def test_failing_rename_restores_earlier_outputs(instance, tmp_path, capsys, monkeypatch):
    """All or none even when the second rename fails: the first target gets its old file back."""
    import os as _os

    (tmp_path / "m.npy").write_bytes(b"old mask")
    real = _os.replace
    done = []

    def replace(src, dst):
        if str(dst).endswith("w.npy"):
            raise OSError(5, "Input/output error")
        done.append(dst)
        return real(src, dst)

    monkeypatch.setattr(_os, "replace", replace)
    code, out, err = run(capsys, "solve", instance, "--solver", "brute", "--pattern", "per-row:4", "--objective",
                         "mask", "--save-mask", tmp_path / "m.npy", "--save-weights", tmp_path / "w.npy")
    assert code == 2 and len(err.splitlines()) == 1 and "Input/output error" in err and out == ""
    assert done  # the mask was renamed into place first, then put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.npz", "m.npy"]
    assert (tmp_path / "m.npy").read_bytes() == b"old mask"


def test_outputs_into_new_directories(instance, tmp_path, capsys):
    code, _, err = run(capsys, "solve", instance, "--solver", "brute", "--pattern", "per-row:4", "--objective", "mask",
                       "--save-mask", tmp_path / "a" / "b" / "m.npy", "--save-weights", tmp_path / "a" / "w.npy")
    assert code == 0, err
    assert np.load(tmp_path / "a" / "b" / "m.npy").shape == (3, 8) and np.load(tmp_path / "a" / "w.npy").shape == (3, 8)


def test_huge_seed_is_accepted(instance, capsys):
    code, out, err = run(capsys, "solve", instance, "--solver", "sparsefw", "--pattern", "per-row:4", "--objective",
                         "mask", "--seed", str(10**20), "--json", "--time-limit", "1e9")
    assert code == 0, err
    assert json.loads(out)["status"] == "feasible"


def test_failing_init_solver_is_one_line(instance, tmp_path, capsys, monkeypatch):
    cls = get_solver_class("magnitude")

    def boom(self, *a, **k):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(cls, "_solve", boom)
    code, out, err = run(capsys, "solve", instance, "--solver", "sparseswaps", "--pattern", "per-row:4",
                         "--objective", "mask", "--init", "magnitude", "--save-mask", tmp_path / "m.npy")
    assert code == 1 and len(err.splitlines()) == 1 and "kaput" in err and out == ""
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
