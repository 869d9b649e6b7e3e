"""Who may import whom: api -> shared <- worker, training -> shared, tests and bench on top.

Read from the source (every ``import`` and ``from ... import``, lazy ones included), so a
forbidden import fails here rather than in a deployment that lacks the package.
"""

from __future__ import annotations

import ast

import pytest

from tests.support import ROOT

PACKAGES = ("api", "bench", "client", "harness", "shared", "tests", "training", "worker")
# What each package must not import (top-level package names).
FORBIDDEN = {
    "shared": {"api", "worker", "training", "harness", "bench", "tests"},
    "api": {"worker", "training", "harness", "bench", "tests"},
    "worker": {"api", "training", "harness", "bench", "tests"},
    "training": {"api", "worker", "harness", "bench", "tests"},
    # Shared by the tests and the benchmarks; runs without pytest.
    "harness": {"api", "worker", "training", "bench", "tests", "pytest"},
    "bench": {"tests", "training"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level names each module of ``package`` imports (relative imports skipped)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_the_layout_allows(package: str) -> None:
    bad = {
        module: sorted(names & FORBIDDEN[package])
        for module, names in imported_packages(package).items()
        if names & FORBIDDEN[package]
    }
    assert bad == {}


def test_only_the_tests_import_the_training_pipeline() -> None:
    importers = {
        module
        for package in PACKAGES
        if package not in ("training", "tests")
        for module, names in imported_packages(package).items()
        if "training" in names
    }
    assert importers == set()


def _imported_names(nodes) -> set[str]:
    """Dotted names the imports among ``nodes`` bring in (``from a import b``: a and a.b)."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _run_time_imports(path) -> tuple[set[str], set[str]]:
    """(module-level, inside functions) imports of a file; ``if TYPE_CHECKING:`` is skipped."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = _imported_names(tree.body)
    nested = _imported_names(
        node
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(func)
    )
    return top, nested


def test_the_model_interface_imports_its_runtimes_once_and_they_never_import_it() -> None:
    """worker.models.base -> worker.models.runtimes, one way (issue #24): no import cycle
    kept apart by imports inside functions. runtimes names ImageModel for types only."""
    base_top, base_nested = _run_time_imports(ROOT / "worker/models/base.py")
    runtimes_top, runtimes_nested = _run_time_imports(ROOT / "worker/models/runtimes.py")
    assert "worker.models.runtimes" in base_top
    assert not {n for n in base_nested if "runtimes" in n}
    assert "worker.models.base" not in runtimes_top | runtimes_nested
