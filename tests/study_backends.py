"""Test-only backends for the study runner's failure paths (imported by tests/test_study.py and,
through :class:`RegisterBackends`, by the Dask workers of its cluster; never by layerprune).

``hang`` never returns, ``crash`` kills its own process, ``fail`` raises a two-line error.
"""
import os
import sys
import time

from distributed.diagnostics.plugin import WorkerPlugin

from layerprune.solvers import SOLVERS, Solver

NAMES = {"hang": "study_backends:Hang", "crash": "study_backends:Crash", "fail": "study_backends:Fail"}


class Hang(Solver):
    name = "hang"

    def _solve(self, problem, params, init, callback):
        while True:  # ignores its time limit, like a backend stuck in C code
            time.sleep(0.05)


class Crash(Solver):
    name = "crash"

    def _solve(self, problem, params, init, callback):
        os._exit(3)


class Fail(Solver):
    name = "fail"

    def _solve(self, problem, params, init, callback):
        raise RuntimeError("deliberate failure\nsecond line")


def register() -> None:
    """Make the three backends known to this process's registry."""
    sys.modules.setdefault("layerprune.solvers.study_backends", sys.modules[__name__])
    SOLVERS.update(NAMES)


class RegisterBackends(WorkerPlugin):
    """Registers the backends on every worker, restarted ones included."""

    def setup(self, worker):
        register()
