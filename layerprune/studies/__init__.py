"""Optimality-gap studies: a grid of instances × patterns × objectives × solvers × seeds, run on
Dask into a resumable results table (CONTRACT.md, "Study spec and results table").

>>> from layerprune.studies import run_study          # doctest: +SKIP
>>> table = run_study("SPEC.toml", "results/study")   # doctest: +SKIP
"""
from .cases import Case, Plan, Skipped, case_id, plan_cases
from .runner import DEFAULT_GRACE, run_study
from .spec import SpecError, StudySpec, load_spec, parse_spec
from .table import SCHEMA, relative_gap, with_group_columns

__all__ = ["run_study", "DEFAULT_GRACE", "load_spec", "parse_spec", "StudySpec", "SpecError",
           "Case", "Plan", "Skipped", "case_id", "plan_cases", "SCHEMA", "relative_gap", "with_group_columns"]
