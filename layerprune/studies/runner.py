"""Run a study on Dask: every case of the grid not yet in ``DIR/results.parquet``.

Cases go to a ``LocalCluster`` (``workers`` processes, one thread each) or to the scheduler at
``scheduler``. At most one case per worker thread is in flight, so a case starts when it is
submitted (it is pinned to a free worker thread) and its *watchdog* runs from then: a case with no result ``2 × time_limit + grace``
seconds later is cancelled, its worker restarted (killing a backend stuck in C code), and it
becomes an ``error`` row. A worker that dies under a case (a crash) makes that case an
``error`` row too (the local cluster allows no retry: with one thread a worker, the case
running on it is the one that killed it). Each finished case is written to the table at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Iterator, Optional, Union

from layerprune.problems.io import atomic_write, check_parent_writable

from .cases import Case, Plan, plan_cases
from .spec import SpecError, StudySpec, load_spec, same_study
from .table import RESULTS, read_rows, write_rows
from .worker import error_row, run_case

__all__ = ["run_study", "DEFAULT_GRACE"]

#: seconds a case may run past twice its time limit before its worker is restarted
DEFAULT_GRACE = 30.0
_SPEC_COPY, _INSTANCES = "spec.toml", "instances"


def run_study(spec: Union[str, os.PathLike, StudySpec], out_dir, *, scheduler: Optional[str] = None,
              workers: Optional[int] = None, grace: float = DEFAULT_GRACE, progress: bool = True):
    """Run the cases of ``spec`` not yet in ``out_dir/results.parquet``; return the table.

    Parameters
    ----------
    spec : path of ``SPEC.toml`` or a :class:`StudySpec`
    out_dir : the study's directory (``results.parquet``, ``spec.toml``, ``instances/``)
    scheduler : address of a running Dask scheduler (None: a local cluster)
    workers : processes of the local cluster (default: one per CPU, at most one per case)
    grace : the watchdog's slack: a case is cut off ``2 × time_limit + grace`` s after it starts
    progress : print a line per finished case, and a summary, on stderr

    Returns
    -------
    pandas.DataFrame with one row per case (CONTRACT.md columns and more, :mod:`.table`).

    Raises
    ------
    SpecError : bad spec, an ``out_dir`` holding another study (or one another run is writing:
        ``out_dir/.lock``), an unreachable scheduler;
        raised before anything is written (instances cut from a model excepted: they are
        written to ``out_dir/instances`` before the instance files are checked).
    """
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    out_dir = Path(out_dir)
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be a positive integer, got {workers}")
    _check_out_dir(spec, out_dir)
    plan = _plan(spec, out_dir)
    finished = {r["case"] for r in _read_table(out_dir)}
    say = _printer(progress)
    for reason, count in Counter(s.reason for s in plan.skipped).items():
        say(f"skipped {count} case(s): {reason}")
    started, run_id = time.perf_counter(), uuid.uuid4().hex[:12]
    with _client(scheduler, workers, sum(c.case not in finished for c in plan.cases)) as client, \
            _only_run(out_dir):
        rows = {r["case"]: r for r in _read_table(out_dir)}  # again, under the lock
        todo = [c for c in plan.cases if c.case not in rows]
        say(f"study {out_dir}: {len(plan.cases)} cases, {len(plan.cases) - len(todo)} already in the table, "
            f"{len(todo)} to run, {len(plan.skipped)} skipped")
        _write_spec_copy(spec, out_dir)
        table = write_rows(out_dir / RESULTS, list(rows.values()))
        for done, row in enumerate(_run_cases(client, todo, grace), 1):
            rows[row["case"]] = {**row, "run": run_id}
            table = write_rows(out_dir / RESULTS, list(rows.values()))
            say(_describe(done, len(todo), row))
    errors = sum(rows[c.case]["status"] == "error" for c in todo)
    say(f"study {out_dir}: {len(todo)} case(s) run ({errors} error) in {time.perf_counter() - started:.1f} s; "
        f"{table.num_rows} rows in {out_dir / RESULTS}")
    return table.to_pandas()


def _read_table(out_dir: Path) -> list[dict]:
    try:
        return read_rows(out_dir / RESULTS)
    except (OSError, ValueError) as exc:  # pyarrow's errors are both
        raise SpecError(f"--out {out_dir}: cannot read its {RESULTS}: {exc}") from None


def _printer(progress: bool):
    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)
    return say


def _describe(done: int, total: int, row: dict) -> str:
    def num(x):
        return "—" if x is None else f"{x:.6g}"

    what = f"{row['solver']} {row['pattern']} {row['objective_kind']} seed {row['seed']} on {row['instance']}"
    if row["status"] == "error":
        return f"[{done}/{total}] error     {what}: {row['message']}"
    return (f"[{done}/{total}] {row['status']:<9} {what}: objective {num(row['objective'])}, "
            f"bound {num(row['lower_bound'])}, {row['seconds']:.2f} s")


def _check_out_dir(spec: StudySpec, out_dir: Path) -> None:
    """``out_dir`` is new, or holds this same study; it can be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"--out {out_dir} exists and is not a directory")
    copy, results = out_dir / _SPEC_COPY, out_dir / RESULTS
    if copy.exists():
        try:
            same = same_study(spec, copy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            same = None
        if not same:
            raise SpecError(f"--out {out_dir} holds another study (its {_SPEC_COPY} differs from "
                            f"{spec.path.name}); give the same spec to resume it, or another directory")
    elif results.exists():
        raise SpecError(f"--out {out_dir} holds a {RESULTS} without its {_SPEC_COPY}; give another directory")
    try:
        check_parent_writable(results, what="--out")
    except ValueError as exc:
        raise SpecError(str(exc)) from None


@contextlib.contextmanager
def _only_run(out_dir: Path):
    """Hold ``out_dir/.lock`` (``flock``) for the run: a second run into ``out_dir`` would
    rewrite the table without the first one's rows, so it is refused."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(f"--out {out_dir}: another study run is writing there") from None
        yield


def _plan(spec: StudySpec, out_dir: Path) -> Plan:
    files = list(spec.files)
    if spec.cut is not None:
        from layerprune.library import cut_model_instances

        try:
            cut = cut_model_instances(spec.cut, out_dir / _INSTANCES)
        except ValueError as exc:
            raise SpecError(f"instances.cut: {exc}") from None
        files += [Path(p).resolve() for p in cut if Path(p).resolve() not in files]
    if not files:
        raise SpecError("instances: no instance matched")
    plan = plan_cases(spec, files, roots=[out_dir, spec.path.parent])
    if not plan.cases:
        first = plan.skipped[0].reason if plan.skipped else "the grid is empty"
        raise SpecError(f"grid: no case to run, every solver skips every case (e.g. {first})")
    return plan


def _write_spec_copy(spec: StudySpec, out_dir: Path) -> None:
    copy = out_dir / _SPEC_COPY
    if not copy.exists():
        atomic_write(copy, lambda tmp: Path(tmp).write_text(spec.text, encoding="utf-8"))


@contextlib.contextmanager
def _client(scheduler: Optional[str], workers: Optional[int], n_cases: int):
    """A Dask client of the scheduler at ``scheduler``, else of a new local cluster."""
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise SpecError(f"--scheduler {scheduler}: cannot connect: {exc}") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise SpecError(f"--scheduler {scheduler}: no worker joined within 60 s") from None
            yield client
        return
    n = workers or max(1, min(os.cpu_count() or 1, n_cases))
    if n_cases == 0:
        yield None
        return
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR, scheduler_kwargs={"allowed_failures": 0}) as cluster, \
            Client(cluster) as client:
        yield client


def _run_cases(client, cases: list[Case], grace: float) -> Iterator[dict]:
    """Yield the row of every case as it finishes (watchdog: module docstring).

    Each case is pinned to a worker thread that none of ours occupies, so it starts at once
    (its watchdog is honest) and restarting the worker of an overdue case kills no other.
    """
    from dask.distributed import wait

    from .preload import Preload

    pending, running = deque(cases), {}  # future → (case, deadline, worker)
    if cases:
        client.register_plugin(Preload())
    while pending or running:
        for worker in _free_threads(client, running):
            if not pending:
                break
            case = pending.popleft()
            future = client.submit(run_case, case, key=f"case-{case.case}-{uuid.uuid4().hex[:8]}", pure=False,
                                   workers=[worker], allow_other_workers=False)
            running[future] = (case, time.monotonic() + 2 * case.time_limit + grace, worker)
        if not running:  # every worker is away (restarting): look again shortly
            time.sleep(0.2)
            continue
        soonest = min(deadline for _, deadline, _ in running.values())
        try:
            wait(list(running), timeout=max(0.05, min(1.0, soonest - time.monotonic())),
                 return_when="FIRST_COMPLETED")
        except TimeoutError:
            pass
        for future in [f for f in running if f.done()]:
            yield _row_of(future, running.pop(future)[0])
        overdue = [f for f, (_, deadline, _) in running.items() if deadline < time.monotonic()]
        if overdue:
            yield from _cut_off(client, overdue, running, grace)


def _free_threads(client, running: dict) -> list[str]:
    """One worker address per thread that no case of ``running`` occupies."""
    busy = Counter(worker for _, _, worker in running.values())
    return [w for w, n in client.nthreads().items() for _ in range(max(0, n - busy[w]))]


def _row_of(future, case: Case) -> dict:
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        return error_row(case, "the worker died while running this case (KilledWorker)")
    except Exception as exc:
        return error_row(case, f"{type(exc).__name__}: {exc}")


def _cut_off(client, overdue: list, running: dict, grace: float) -> Iterator[dict]:
    """Cancel overdue cases, restart the workers running them, yield their ``error`` rows."""
    for future in overdue:
        case, _, worker = running.pop(future)
        future.cancel()
        message = (f"no result {2 * case.time_limit + grace:g} s after it started "
                   f"(2 × time limit {case.time_limit:g} s + {grace:g} s)")
        try:
            client.restart_workers([worker])
            message += "; its worker was restarted"
        except Exception as exc:  # e.g. a worker without a nanny: it stays busy
            message += f"; its worker could not be restarted: {type(exc).__name__}: {exc}"
        yield error_row(case, message)
