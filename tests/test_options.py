"""Backend options are declared, typed and checked at construction; limits are a closed set."""
from __future__ import annotations

import pytest

from layerprune.solvers import SolverError, get_solver_class, make_solver, solver_names
from layerprune.solvers.base import Limit, Params, Proposal, Status, finalize
from layerprune.solvers.options import Option, parse_bool
from layerprune.problems import make_instance

#: (solver, option, a value its declaration refuses)
REFUSED = [
    ("sparsefw", "alpha", "foo"), ("sparsefw", "alpha", 1.0), ("sparsefw", "alpha", -0.1),
    ("sparsefw", "refresh", 0), ("sparsefw", "check_every", 2.5), ("sparsefw", "alpha", float("nan")),
    ("scip", "epigraph", "foo"), ("scip", "diag", "foo"), ("scip", "polish", "maybe"), ("scip", "heuristics", 3),
    ("bnb", "max_nodes", 0), ("bnb", "max_nodes", "many"), ("bnb", "polish", 2),
    ("admm", "rho", 0.0), ("admm", "iterations", 0), ("admm", "ridge", -1), ("admm", "rho", "inf"),
    ("admm", "init_solver", "nosuch"), ("sparseswaps", "init_solver", ""), ("sparseswaps", "candidates", True),
    ("sparsegpt", "percdamp", 0), ("sparsegpt", "blocksize", "big"), ("ria", "a", -0.5),
    ("relax-qp", "mu", "foo"), ("relax-perspective", "delta", "foo"), ("relax-sdp", "max_n", -1),
    ("brute", "max_supports", 0), ("ortools", "isolate", "perhaps"),
]


@pytest.mark.parametrize("solver,option,value", REFUSED)
def test_a_refused_value_is_one_line_naming_solver_option_and_what_it_takes(solver, option, value):
    with pytest.raises(SolverError) as err:
        make_solver(solver, **{option: value})
    msg = str(err.value)
    assert "\n" not in msg and repr(solver) in msg and repr(option) in msg and ("takes" in msg or "solver" in msg)


@pytest.mark.parametrize("solver,option,text,value", [
    ("sparsefw", "alpha", "0.8", 0.8), ("sparseswaps", "candidates", "32", 32), ("scip", "polish", "false", False),
    ("bnb", "polish", 0, False), ("ortools", "isolate", "yes", True), ("admm", "init_solver", "none", "none"),
    ("admm", "init_solver", "wanda", "wanda"), ("sparsegpt", "blocksize", 64.0, 64),
])
def test_text_values_are_converted(solver, option, text, value):
    got = make_solver(solver, **{option: text}).option(option)
    assert got == value and type(got) is type(value)


def test_every_backend_declares_its_options_with_help_and_valid_defaults():
    for name in solver_names():
        cls = get_solver_class(name)
        for opt in cls.declared_options().values():
            assert opt.help and opt.kind in (bool, int, float, str), (name, opt.name)
            if opt.default is not None and opt.name != "init_solver":
                assert opt.parse(opt.default) == opt.default, (name, opt.name)
        assert [o["name"] for o in cls.capabilities()["options"]] == list(cls.declared_options())


def test_defaults_are_read_from_the_declaration_and_given_options_stay_given_only():
    s = make_solver("sparseswaps")
    assert s.options == {} and s.option("candidates") == 16 and s.init_solver == "wanda"
    assert make_solver("sparseswaps", candidates="8").options == {"candidates": 8}


def test_scip_diag_for_mask_only_is_refused_for_reconstruct_before_work():
    problem = make_instance(2, 8, pattern="per-row:4", objective="reconstruct")
    why = make_solver("scip", diag="qcr").why_not(problem)
    assert why is not None and "mask" in why
    assert make_solver("scip", diag="qcr").can_take("per-row", "mask") is None


def test_option_parsing_rules():
    assert parse_bool("On") is True and parse_bool(0) is False
    with pytest.raises(ValueError):
        parse_bool("2")
    opt = Option("x", float, 1.0, "a number", low=0.0, low_open=True, high=1.0)
    assert opt.takes() == "a number > 0 and ≤ 1" and opt.parse("1") == 1.0
    for bad in ("0", "1.5", "nan", None, [1]):
        with pytest.raises(ValueError):
            opt.parse(bad)


@pytest.mark.parametrize("raw,word", [
    (None, None), ("time", "time"), ("timelimit", "time"), ("node", "nodes"), ("nodelimit", "nodes"),
    ("gaplimit", "tolerance"), ("userinterrupt", "interrupted"), ("memlimit", "memory"),
    ("iterations", "iterations"), ("something odd", "interrupted"),
])
def test_limits_are_a_closed_set_of_words_with_the_raw_reason_as_detail(raw, word):
    problem = make_instance(2, 8, pattern="per-row:4")
    mask = problem.round(problem.W.abs())
    res = finalize("x", problem, Proposal(mask=mask, limit=raw), 0.0, Params())
    assert res.limit == word
    assert res.limit is None or res.limit in {w.value for w in Limit}
    if word is not None and raw != word:
        assert res.limit_detail == raw


@pytest.mark.parametrize("name", ["scip", "ortools"])
@pytest.mark.parametrize("limit", [1e300, float("inf"), 2e9])
def test_huge_time_limit_means_none(name, limit):
    """A limit past MAX_TIME_LIMIT (SCIP refuses 1e300, timedelta overflows) means no limit."""
    solver = make_solver(name)
    if not solver.is_installed():
        pytest.skip(f"{name} not installed")
    params = Params(time_limit=limit)
    assert params.time_limit is None
    res = solver.solve(make_instance(2, 8, pattern="per-row:4"), params=params)
    assert res.status == Status.OPTIMAL


@pytest.mark.parametrize("limit", [0, -1.0, float("nan"), "10", True])
def test_bad_time_limit_refused(limit):
    with pytest.raises(ValueError, match="time_limit"):
        Params(time_limit=limit)
