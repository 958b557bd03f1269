"""The solver contract: parameters in, one honest :class:`Result` out.

Every backend subclasses :class:`Solver`, declares what it can take as class attributes and
implements :meth:`Solver._solve`, which returns a :class:`Proposal` (a mask, optionally its
own weights, and a lower bound with its source). :meth:`Solver.solve` wraps it: it checks
the problem fits, times the run, re-scores the mask with the problem's own objective, for
``reconstruct`` refits the kept weights (exactly, or by CG on large layers: the objective is
then the returned weights' exact error, an upper bound, and ``info`` says so), and keeps the
status honest (a run that stopped on a limit is ``feasible``; ``optimal`` only when the bound
proves it).

Heavy packages (pyscipopt, ortools, cvxpy) are imported inside ``_solve``, never at module
import, so listing and checking solvers costs nothing.
"""
from __future__ import annotations

import enum
import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch

from layerprune.problems import LayerProblem
from layerprune.problems.refit import DEFAULT_DUAL_ITER, DEFAULT_MAX_ITER, DEFAULT_TOL, REFIT_METHODS, refit_weights

from .options import Option, OptionError

__all__ = ["Status", "Limit", "Params", "Proposal", "Result", "Solver", "SolverError", "Callback", "Option",
           "share_of_time_left", "stop_reason", "relative_gap", "refit_scored"]

#: an absolute gap below ABS_GAP_TOL × problem.scale is float64 round-off, i.e. closed
ABS_GAP_TOL = 1e-12

#: seconds (about 31 years) above which a time limit means none; the CLI's cap too
MAX_TIME_LIMIT = 1e9

#: ``callback(event) -> stop?``: called by iterative solvers with a dict (iteration, objective, …)
Callback = Callable[[dict], Optional[bool]]


class SolverError(RuntimeError):
    """A solver cannot run: missing package, unsupported pattern or objective, bad option."""


class Status(str, enum.Enum):
    OPTIMAL = "optimal"          # proved optimal (lower bound meets the objective within gap_tol)
    FEASIBLE = "feasible"        # a feasible mask; see ``limit`` for why it stopped
    NO_SOLUTION = "no_solution"  # stopped (limit) before finding any feasible mask
    INFEASIBLE = "infeasible"
    ERROR = "error"


class Limit(str, enum.Enum):
    """Why a run stopped before it finished: a closed set of words (details go to ``limit_detail``)."""

    TIME = "time"                # the time limit
    ITERATIONS = "iterations"    # an iteration cap (``Params.max_iter`` or an option)
    NODES = "nodes"              # a node cap of a branch-and-bound
    TOLERANCE = "tolerance"      # the backend stopped at its own tolerance, which the exact re-score does not confirm
    MEMORY = "memory"            # a memory limit of the backend
    INTERRUPTED = "interrupted"  # a callback, Ctrl-C or the backend's own interruption

    @classmethod
    def of(cls, raw: Optional[str]) -> tuple[Optional["Limit"], Optional[str]]:
        """``(word, detail)`` for a backend's raw reason (``"timelimit"``, ``"node"``, …).

        Unknown raw reasons become ``interrupted`` with the raw text as detail.
        """
        if raw is None:
            return None, None
        if isinstance(raw, Limit):
            return raw, None
        text = str(raw).strip().lower()
        for word in cls:
            if text == word.value:
                return word, None
        for word, keys in _LIMIT_WORDS.items():
            if any(k in text for k in keys):
                return word, str(raw)
        return cls.INTERRUPTED, str(raw)


#: raw reasons of backends (SCIP statuses, MathOpt limits) → the word they mean
_LIMIT_WORDS = {
    Limit.TIME: ("time",),
    Limit.NODES: ("node",),
    Limit.ITERATIONS: ("iteration",),
    Limit.TOLERANCE: ("gap", "tolerance"),
    Limit.MEMORY: ("mem",),
    Limit.INTERRUPTED: ("interrupt", "user"),
}


@dataclass(frozen=True)
class Params:
    """Parameters every solver understands.

    time_limit : seconds of wall time (None = no limit; above :data:`MAX_TIME_LIMIT`, inf
        included, it means none)
    gap_tol : relative gap ``(objective − bound)/objective`` at which a certified solver stops
    seed : RNG seed for randomised steps
    device : torch device for torch solvers (None = the problem's)
    dtype : working precision of torch solvers (scores are always re-scored in float64)
    verbose : let the backend print its log
    max_iter : iteration cap of iterative solvers (None = the solver's default)
    threads : CPU threads a MIP backend may use (None = its default)
    refit : how ``reconstruct`` results are refitted: ``exact`` (batched Cholesky), ``cg``
        (batched preconditioned CG from the solver's own weights, :mod:`problems.refit`) or
        ``auto`` (exact on small layers, CG above :data:`problems.refit.EXACT_MAX_FLOPS`)
    refit_tol, refit_max_iter : CG's relative residual tolerance and iteration cap per row
    refit_dual_iter : cap on CG's dual (OBS-form) start per row; 0 starts the primal CG from the
        solver's own weights directly (:mod:`problems.refit`)
    """

    time_limit: Optional[float] = None
    gap_tol: float = 1e-4
    seed: int = 0
    device: Optional[str] = None
    dtype: torch.dtype = torch.float32
    verbose: bool = False
    max_iter: Optional[int] = None
    threads: Optional[int] = None
    refit: str = "auto"
    refit_tol: float = DEFAULT_TOL
    refit_max_iter: int = DEFAULT_MAX_ITER
    refit_dual_iter: int = DEFAULT_DUAL_ITER

    def __post_init__(self):
        if self.refit not in REFIT_METHODS:
            raise ValueError(f"refit must be one of {REFIT_METHODS}, got {self.refit!r}")
        if not self.refit_tol > 0 or self.refit_max_iter < 0 or self.refit_dual_iter < 0:
            raise ValueError("refit_tol must be > 0, refit_max_iter and refit_dual_iter ≥ 0")
        tl = self.time_limit
        if tl is not None:
            if isinstance(tl, bool) or not isinstance(tl, (int, float)) or math.isnan(tl) or tl <= 0:
                raise ValueError(f"time_limit must be a positive number of seconds or None, got {tl!r}")
            if tl > MAX_TIME_LIMIT:  # no backend takes more (SCIP refuses 1e300): it means no limit
                object.__setattr__(self, "time_limit", None)

    def refit_options(self) -> dict:
        """The keyword arguments of :func:`problems.refit.refit_weights` these parameters set."""
        return {"method": self.refit, "tol": self.refit_tol, "max_iter": self.refit_max_iter,
                "dual_iter": self.refit_dual_iter}

    def deadline(self, start: float) -> float:
        return math.inf if self.time_limit is None else start + float(self.time_limit)


def stop_reason(event: dict, callback: Optional[Callable[[dict], Any]], deadline: float) -> Optional[str]:
    """Why an iterative backend stops after an iteration whose history entry is ``event``:
    ``"interrupted"`` when ``callback`` (given a copy of ``event``) asks to stop, ``"time"``
    past ``deadline`` (a ``time.perf_counter()`` instant), else None (go on)."""
    if callback is not None and callback(dict(event)):
        return "interrupted"
    if time.perf_counter() > deadline:
        return "time"
    return None


def share_of_time_left(deadline: float, share: float, start: Optional[float] = None) -> float:
    """The ``time.perf_counter()`` instant ``share`` of the way from ``start`` (default: now)
    to ``deadline``: the deadline of a step that may use that share of the time left
    (``inf`` when ``deadline`` is)."""
    now = time.perf_counter() if start is None else start
    return now + share * (deadline - now)


@dataclass
class Proposal:
    """What ``_solve`` hands back before re-scoring.

    mask : (d_out, d_in) bool tensor, feasible for the problem's pattern (None if none found)
    weights : the solver's own weights (zero off the mask) or None
    lower_bound : a bound valid for the problem's *exact, undamped* objective, or None
    bound_source : how the bound was obtained (e.g. "scip dual bound", "SDP dual")
    status : OPTIMAL only if the backend proved it; else FEASIBLE / NO_SOLUTION / …
    limit : why it stopped early: a :class:`Limit` word (or a backend's raw reason, which
        :func:`finalize` maps to one) or None
    limit_detail : free text about the limit (e.g. the backend's own status)
    history : the backend's events (dicts). Events with ``seconds`` (since the solve began)
        and ``objective`` (the incumbent's exact objective then), and where certified
        ``lower_bound`` (valid at that moment), make its anytime curve
        (:func:`layerprune.studies.analysis.anytime`)
    """

    mask: Optional[torch.Tensor]
    weights: Optional[torch.Tensor] = None
    lower_bound: Optional[float] = None
    bound_source: Optional[str] = None
    status: Status = Status.FEASIBLE
    limit: Optional[str] = None
    limit_detail: Optional[str] = None
    iterations: int = 0
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class Result:
    """A solved layer: everything says how good it is.

    mask : (d_out, d_in) bool tensor (True = kept) or None
    weights : (d_out, d_in) float64 pruned weights: ``W ⊙ mask`` for ``mask``; for
        ``reconstruct`` the refit on the mask (``Params.refit``): exact, or CG weights, each row
        never worse than the solver's own (whose error is kept in
        ``info["own_weights_objective"]`` when it returned any)
    objective : the problem's own exact score of ``mask``; under a CG refit the exact float64
        error of the returned weights, an upper bound on the mask's ``reconstruct`` objective
        (``info["refit"]`` says how it was obtained and ``info["objective_is_upper_bound"]``)
    lower_bound, bound_source : certified bound on the optimum and how it was obtained
    status : see :class:`Status`
    limit : why it stopped early, a :class:`Limit` word (a ``str``) or None; ``limit_detail``
        says more where the backend did
    seconds, iterations, history, info
    """

    solver: str
    status: Status
    mask: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    objective: Optional[float] = None
    lower_bound: Optional[float] = None
    bound_source: Optional[str] = None
    limit: Optional[str] = None
    limit_detail: Optional[str] = None
    seconds: float = 0.0
    iterations: int = 0
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def gap(self) -> Optional[float]:
        """Relative optimality gap ``(objective − lower_bound) / objective`` (0 if both are 0)."""
        return relative_gap(self.objective, self.lower_bound)

    def to_json(self) -> dict:
        """The CONTRACT.md ``--json`` record."""
        return {
            "solver": self.solver,
            "status": self.status.value,
            "limit": self.limit,
            "objective": self.objective,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "seconds": self.seconds,
            "iterations": self.iterations,
        }


def relative_gap(objective: Optional[float], bound: Optional[float]) -> Optional[float]:
    """``max(0, objective − bound) / objective``; None without either; 0 (or inf) at objective 0."""
    if objective is None or bound is None:
        return None
    diff = max(0.0, objective - bound)
    if objective <= 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / objective


class Solver:
    """Base class of every backend. Options go to the constructor; ``solve`` runs it.

    Class attributes (capabilities)
    -------------------------------
    name : registry name
    requires : import names of optional packages the backend needs
    patterns : pattern kinds it takes (``per-row``, ``nm``, ``unstructured``, ``columns``)
    objectives : objectives it takes
    certifies : it returns a lower bound (and may prove optimality)
    exact : it proves optimality when given enough time
    uses_init : it warm-starts from an initial mask
    option_specs : its constructor options, each an :class:`Option` (type, default, range or
        words, help); a value outside its declaration, or a name not declared, is an error
    default_init : registry name of the solver whose mask it starts from when given no ``init``
        (option ``init_solver`` overrides; ``"none"`` = its own cold start)
    targets : objectives it takes when the problem carries dense targets (CONTRACT.md). Every
        backend takes ``reconstruct``: :meth:`solve` hands it the problem's standard view
        (weights ``T``, no target; :meth:`LayerProblem.standard_view`) and adds the view's
        constant ``Σ_r c_r`` to its bound. ``mask`` only where the mask ignores the objective
        (magnitude, Wanda, RIA) or the backend models the target's linear term.
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    patterns: ClassVar[frozenset] = frozenset({"per-row", "nm", "unstructured", "columns"})
    objectives: ClassVar[frozenset] = frozenset({"mask", "reconstruct"})
    certifies: ClassVar[bool] = False
    exact: ClassVar[bool] = False
    uses_init: ClassVar[bool] = False
    default_init: ClassVar[Optional[str]] = None
    option_specs: ClassVar[tuple[Option, ...]] = ()
    targets: ClassVar[frozenset] = frozenset({"reconstruct"})

    def __init__(self, **options: Any):
        specs = self.declared_options()
        unknown = sorted(set(options) - set(specs))
        if unknown:
            raise SolverError(f"solver {self.name!r} takes no option {', '.join(map(repr, unknown))} "
                              f"(takes {', '.join(sorted(specs)) or 'none'})")
        checked = {}
        for key, value in options.items():
            try:
                checked[key] = specs[key].parse(value)
            except OptionError as exc:
                raise SolverError(f"solver {self.name!r} option {key!r}: {exc}") from None
        self.options = checked  # the given options only, converted

    @classmethod
    def declared_options(cls) -> dict[str, Option]:
        """Every option the constructor takes, by name (``init_solver`` for warm-starting solvers)."""
        specs = {o.name: o for o in cls.option_specs}
        if cls.uses_init:
            specs["init_solver"] = Option(
                "init_solver", str, cls.default_init or "none",
                "solver whose mask warm-starts a solve given no init ('none': the backend's own start)",
                check=_known_solver)
        return specs

    def option(self, name: str) -> Any:
        """The value of option ``name``: as given (converted), else its declared default."""
        if name in self.options:
            return self.options[name]
        return self.declared_options()[name].default

    @property
    def init_solver(self) -> Optional[str]:
        """The solver whose mask warm-starts a solve given no ``init`` (None: cold start)."""
        name = self.option("init_solver") if self.uses_init else None
        return None if name in (None, "none") else name

    def start_mask(self, problem: LayerProblem, params: Params) -> Optional[torch.Tensor]:
        """The warm start of a solve given no ``init``: the raw mask of :attr:`init_solver`, or
        None (cold start, or that solver cannot take the problem)."""
        name = self.init_solver
        if name is None:
            return None
        from .registry import make_solver

        starter = make_solver(name)
        if starter.why_not(problem) is not None:
            return None
        return starter.propose(problem, params).mask

    # ------------------------------------------------------------------ capabilities
    @classmethod
    def missing_packages(cls) -> list[str]:
        return [p for p in cls.requires if importlib.util.find_spec(p) is None]

    @classmethod
    def is_installed(cls) -> bool:
        return not cls.missing_packages()

    def why_not(self, problem: LayerProblem) -> Optional[str]:
        """None if this solver can take the problem, else one line saying why not."""
        why = self.can_take(problem.pattern.name, problem.objective_kind, str(problem.pattern),
                            target=problem.has_target)
        return why or self._size_limit(problem)

    def can_take(self, pattern_kind: str, objective: str, pattern: Optional[str] = None, *,
                 target: bool = False) -> Optional[str]:
        """None if this solver, with its options, takes the pattern kind and objective (with a
        dense target if ``target``), else one line saying why not: the check to make before any
        work starts."""
        return self.why_not_kind(pattern_kind, objective, pattern, target=target) or self._options_conflict(objective)

    def _options_conflict(self, objective: str) -> Optional[str]:
        """Override: a line if the given options do not fit the objective."""
        return None

    @classmethod
    def why_not_kind(cls, pattern_kind: str, objective: str, pattern: Optional[str] = None, *,
                     target: bool = False) -> Optional[str]:
        """None if this solver takes the pattern kind and the objective (with a dense target if
        ``target``), else one line saying why not (packages first). ``pattern`` is the pattern
        as the user wrote it, for the message."""
        missing = cls.missing_packages()
        if missing:
            return f"solver {cls.name!r} needs the package(s) {', '.join(missing)} (pip install {' '.join(missing)})"
        if pattern_kind not in cls.patterns:
            return (f"solver {cls.name!r} cannot take pattern {pattern or pattern_kind} "
                    f"(takes {', '.join(sorted(cls.patterns))})")
        if objective not in cls.objectives:
            return f"solver {cls.name!r} cannot take objective {objective!r}"
        if target and objective not in cls.targets:
            return (f"solver {cls.name!r} cannot take objective {objective!r} with a dense target "
                    f"(it does not model the target's linear term)")
        return None

    def _size_limit(self, problem: LayerProblem) -> Optional[str]:
        """Override: a line if the instance is too large for this backend."""
        return None

    @classmethod
    def capabilities(cls) -> dict:
        return {
            "name": cls.name,
            "installed": cls.is_installed(),
            "patterns": sorted(cls.patterns),
            "objectives": sorted(cls.objectives),
            "certifies": cls.certifies,
            "exact": cls.exact,
            "uses_init": cls.uses_init,
            "targets": sorted(cls.targets & cls.objectives),
            "description": cls.description,
            "options": [o.describe() for o in cls.declared_options().values()],
        }

    # ------------------------------------------------------------------ running
    def solve(self, problem: LayerProblem, *, params: Optional[Params] = None,
              init: Optional[torch.Tensor] = None, callback: Optional[Callback] = None) -> Result:
        """Solve ``problem``; return a re-scored :class:`Result`.

        ``init`` (a feasible mask) warm-starts solvers with ``uses_init``; it is checked first.
        Raises :class:`SolverError` if the solver cannot take the problem.
        """
        params = params or Params()
        why = self.why_not(problem)
        if why:
            raise SolverError(why)
        if init is not None:
            init = problem.check_mask(init)
        start = time.perf_counter()
        proposal = self._solve_target(problem, params, init, callback)
        seconds = time.perf_counter() - start
        return finalize(self.name, problem, proposal, seconds, params)

    def propose(self, problem: LayerProblem, params: Optional[Params] = None) -> Proposal:
        """The raw proposal without re-scoring or refit: a cheap warm start for another solver.

        Raises :class:`SolverError` if the solver cannot take the problem.
        """
        why = self.why_not(problem)
        if why:
            raise SolverError(why)
        return self._solve_target(problem, params or Params(), None, None)

    def _solve_target(self, problem: LayerProblem, params: Params, init: Optional[torch.Tensor],
                      callback: Optional[Callback]) -> Proposal:
        """``_solve``, on the standard view for ``reconstruct`` with a dense target.

        The view's objective is the problem's minus the constant ``Σ_r c_r``
        (:meth:`LayerProblem.standard_view`), so its mask and weights are the problem's and
        its bound, plus that constant, is the problem's bound. Objectives the backend reports
        along the way (``history``, callback events) are the view's, without the constant.
        """
        if not (problem.has_target and problem.objective_kind == "reconstruct"):
            return self._solve(problem, params, init, callback)
        proposal = self._solve(problem.standard_view(), params, init, callback)
        if proposal.lower_bound is not None:
            proposal.lower_bound += problem.target_offset
            proposal.bound_source = f"{proposal.bound_source or 'bound'} + dense-target offset"
        return proposal

    def _solve(self, problem: LayerProblem, params: Params, init: Optional[torch.Tensor],
               callback: Optional[Callback]) -> Proposal:
        raise NotImplementedError


def _known_solver(name: str) -> Optional[str]:
    """None if ``name`` is a registered solver or ``none``, else why not."""
    if name == "none":
        return None
    from .registry import solver_names

    known = solver_names()
    return None if name in known else f"no solver of that name (known: none, {', '.join(known)})"


def finalize(name: str, problem: LayerProblem, p: Proposal, seconds: float, params: Params) -> Result:
    """Re-score a proposal with the problem's own objective and keep its status honest."""
    word, detail = Limit.of(p.limit)
    res = Result(solver=name, status=p.status, limit=None if word is None else word.value,
                 limit_detail=p.limit_detail or detail, seconds=seconds,
                 iterations=p.iterations, history=p.history, info=dict(p.info),
                 bound_source=p.bound_source)
    lb = p.lower_bound
    if lb is not None and not math.isfinite(lb):
        lb = None if math.isnan(lb) else lb
    if lb is not None and lb < 0.0:
        lb = 0.0  # both objectives are sums of PSD forms: 0 is always valid and tighter
    if p.mask is None:
        res.lower_bound = lb
        if res.status in (Status.OPTIMAL, Status.FEASIBLE):
            res.status = Status.NO_SOLUTION
        return res
    mask = problem.check_mask(p.mask.to(problem.device))
    res.mask = mask
    if problem.objective_kind == "reconstruct":
        res.weights, res.objective = refit_scored(problem, mask, p.weights, params, res.info)
    else:
        res.weights = problem.W.to(torch.float64) * mask
        res.objective = float(problem.weight_errors(res.weights).sum())
    if lb is not None:
        # the re-scored objective is an upper bound on the optimum: a valid bound never exceeds
        # it, so anything above is rounding; the raw value is kept for the tests to judge
        if lb > res.objective:
            res.info["raw_lower_bound"] = lb
            lb = res.objective
    res.lower_bound = lb
    if res.status == Status.OPTIMAL:
        # closed if the relative gap meets gap_tol, or the absolute gap is float64 round-off
        # (a tiny multiple of the problem's scale: objectives near 0 make relative gaps noise)
        closed = lb is not None and (res.gap <= max(params.gap_tol, 1e-9)
                                     or res.objective - lb <= ABS_GAP_TOL * problem.scale)
        if not closed:
            res.status = Status.FEASIBLE
            if res.limit is None:
                res.limit = Limit.TOLERANCE.value
                res.limit_detail = "claimed optimal; the exact re-score leaves a gap above gap_tol"
            res.info["claimed_optimal"] = True
    return res


def refit_scored(problem: LayerProblem, mask: torch.Tensor, own: Optional[torch.Tensor], params: Params,
                 info: dict) -> tuple[torch.Tensor, float]:
    """The ``reconstruct`` weights of ``mask`` and their exact float64 error, per ``params.refit``.

    CG starts from the solver's own weights ``own`` (else ``W ⊙ M``); any row it left worse
    than ``own`` (float32 rounding) takes ``own``'s row. ``info`` gets ``refit`` (method,
    iterations, residual, tolerance, converged, seconds) and, given ``own``,
    ``own_weights_objective``.
    """
    own_errors = None
    if own is not None:
        own = own.to(device=problem.device, dtype=torch.float64) * mask
        own_errors = problem.weight_errors(own)
        info["own_weights_objective"] = float(own_errors.sum())
    dtype = params.dtype if params.dtype in (torch.float32, torch.float64) else torch.float32
    started = time.perf_counter()
    fit = refit_weights(problem, mask, own, dtype=dtype, **params.refit_options())
    weights, errors = fit.weights, problem.weight_errors(fit.weights)
    info["refit"] = fit.describe()
    info["refit"]["seconds"] = time.perf_counter() - started  # not in Result.seconds (the solve's)
    if not fit.exact:
        if own_errors is not None:
            worse = errors > own_errors
            weights[worse], errors[worse] = own[worse], own_errors[worse]
            info["refit"]["rows_kept_own_weights"] = int(worse.sum())
        info["objective_is_upper_bound"] = True
        info["refit"]["objective"] = ("the exact error of the CG weights: an upper bound on the "
                                      "mask's exact reconstruct objective")
    return weights, float(errors.sum())
