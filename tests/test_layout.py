"""Dependencies flow one way: ``problems`` ← ``solvers`` ← ``layerprune``.

Every import statement of every module (function-local ones included) is read from the source:
``problems`` imports neither ``solvers`` nor the rest of ``layerprune``; ``solvers`` imports
``problems`` but nothing else of ``layerprune``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder → (its package name, the layerprune packages it may import)
RULES = {
    "problems": ("layerprune.problems", {"layerprune.problems"}),
    "solvers": ("layerprune.solvers", {"layerprune.problems", "layerprune.solvers"}),
}


def _module_name(path: Path, folder: str) -> str:
    """``solvers/bnb/search.py`` → ``layerprune.solvers.bnb.search``."""
    return ".".join([RULES[folder][0], *path.relative_to(ROOT / folder).with_suffix("").parts])


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file of ``module``."""
    parts = module.split(".")
    is_init = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level + (1 if is_init else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def _allowed(name: str, allowed: set[str]) -> bool:
    if name != "layerprune" and not name.startswith("layerprune."):
        return True
    return any(name == a or name.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("folder", sorted(RULES))
def test_dependencies_flow_one_way(folder):
    _, allowed = RULES[folder]
    bad = []
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for path in files:
        for line, name in _imports(path, _module_name(path, folder)):
            if not _allowed(name, allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_wrong_import(tmp_path):
    """The reader resolves relative imports: ``from ..pipeline import x`` in solvers is caught."""
    fake = tmp_path / "probe.py"
    fake.write_text("from .base import Solver\n"
                    "def f():\n    from ..pipeline import prune_model\n    import layerprune.cli\n")
    names = [n for _, n in _imports(fake, "layerprune.solvers.probe")]
    assert names == ["layerprune.solvers.base", "layerprune.pipeline", "layerprune.cli"]
    assert _allowed(names[0], RULES["solvers"][1])
    assert not any(_allowed(n, RULES["solvers"][1]) for n in names[1:])
