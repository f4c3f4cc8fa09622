"""The test suite's own layout: what a tier's tests import must be importable from any tier."""

from __future__ import annotations

import re

from helpers import REPO


def test_no_test_module_imports_another_test_module():
    """Only tests/ itself is on the import path (its conftest's folder): a test module in one
    tier folder that imports one from another runs alone in its own tier and fails in the
    others (make image-check runs tests/image alone). Shared code goes in a module beside
    helpers.py (pipeline_fixtures.py)."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(from|import)\s+test_\w+", line)
    ]
    assert offenders == []
    assert (REPO / "tests" / "pipeline_fixtures.py").is_file()
