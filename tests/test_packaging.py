"""The Python floor pyproject.toml claims is the one the code needs (``tomllib`` is 3.11+) and the one it runs on."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = (3, 11)  # uniflow_cli/workspace.py imports tomllib, new in Python 3.11


def claimed_floor() -> tuple[int, int]:
    """``requires-python`` of pyproject.toml as (major, minor); only the ``>=X.Y`` form is used here."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec)
    assert m, f"requires-python {spec!r} is not of the form '>=X.Y'"
    return int(m.group(1)), int(m.group(2))


def test_pyproject_claims_the_floor_the_code_needs():
    assert claimed_floor() == FLOOR


def test_the_running_interpreter_satisfies_the_claimed_floor():
    assert sys.version_info[:2] >= claimed_floor()


def test_the_readme_states_the_same_floor():
    major, minor = claimed_floor()
    assert f"Python ≥ {major}.{minor}" in (REPO / "README.md").read_text()
