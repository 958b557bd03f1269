"""A Dask worker plugin that imports torch, the solver contract and the study's worker code
when a worker starts (restarted workers too), so that no case's watchdog counts those imports."""
from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["Preload"]


class Preload(WorkerPlugin):
    name = "layerprune-study-preload"

    def setup(self, worker) -> None:
        import torch  # noqa: F401

        import layerprune.problems  # noqa: F401
        import layerprune.solvers.base  # noqa: F401
        import layerprune.studies.worker  # noqa: F401
