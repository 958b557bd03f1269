"""What is solved: the layer-wise mask problem, its patterns, instance files and generators."""
from .generators import FAMILIES, make_arrays, make_family, make_instance
from .io import atomic_write, atomic_write_all, check_writable, load_instance, save_instance
from .library import Provenance, cut_instance, read_provenance, save_cut, select_channels, select_rows
from .patterns import NM, Columns, Pattern, PatternError, PerRow, Unstructured, parse_pattern, topk_mask
from .problem import OBJECTIVES, LayerProblem, ProblemError, check_ridge_fraction, ridge_targets
from .refit import REFIT_METHODS, RefitResult, pcg_refit, refit_weights

__all__ = [
    "LayerProblem", "ProblemError", "OBJECTIVES", "ridge_targets", "check_ridge_fraction",
    "Pattern", "PatternError", "PerRow", "NM", "Unstructured", "Columns", "parse_pattern", "topk_mask",
    "load_instance", "save_instance", "atomic_write", "atomic_write_all", "check_writable",
    "make_instance", "make_arrays", "make_family", "FAMILIES",
    "Provenance", "select_channels", "select_rows", "cut_instance", "save_cut", "read_provenance",
    "RefitResult", "REFIT_METHODS", "pcg_refit", "refit_weights",
]
