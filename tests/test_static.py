"""pyflakes over the code: an undefined name (a missing import on a path no other test runs)
or an unused import fails here rather than in a user's run."""
from __future__ import annotations

import io
from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    out, err = io.StringIO(), io.StringIO()
    found = checkRecursive([str(ROOT / d) for d in ("nasopt", "strategies", "search_spaces",
                                                    "tests")], Reporter(out, err))
    assert found == 0, out.getvalue() + err.getvalue()
