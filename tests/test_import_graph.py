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
