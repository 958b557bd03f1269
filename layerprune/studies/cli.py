"""``layerprune study SPEC.toml --out DIR [--scheduler ADDRESS] [--workers N] [--plots]``."""
from __future__ import annotations

import importlib.util

__all__ = ["add_subcommand"]

#: the module that draws a study's plots, when one is installed: ``plot_study(out_dir)``
PLOTS_MODULE = "layerprune.studies.plots"


def add_subcommand(sub) -> None:
    p = sub.add_parser("study", help="run an optimality-gap study (SPEC.toml) on Dask",
                       description="Run every case of a study spec not yet in DIR/results.parquet "
                                   "(CONTRACT.md, 'Study spec and results table').")
    p.add_argument("spec", metavar="SPEC.toml")
    p.add_argument("--out", required=True, metavar="DIR", help="the study's directory (resumed if it exists)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="a running Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes of the local cluster, one thread each (default: one per CPU)")
    p.add_argument("--plots", action="store_true", help="draw the study's plots into DIR when done")
    p.set_defaults(handler=_cmd_study)


def _cmd_study(args) -> int:
    from layerprune.cli import _fail

    from . import SpecError, run_study

    if args.workers is not None and args.scheduler is not None:
        return _fail("give --workers (a local cluster) or --scheduler (an existing one), not both")
    if args.plots and importlib.util.find_spec(PLOTS_MODULE) is None:
        return _fail("--plots: study plots are not available in this version (no layerprune.studies.plots)")
    try:
        run_study(args.spec, args.out, scheduler=args.scheduler, workers=args.workers)
    except SpecError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail(f"interrupted: the finished cases are in {args.out}; run the same command again to resume", 130)
    if args.plots:
        importlib.import_module(PLOTS_MODULE).plot_study(args.out)
    return 0
