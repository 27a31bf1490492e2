"""The package list in pyproject.toml names every subpackage, so a wheel (not only an editable
install) has all the code: a new folder under mlx_stack/ that is not listed would be missing."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as on the project's machines

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_listed_for_setuptools():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    tree = {".".join(p.parent.relative_to(ROOT).parts)
            for p in (ROOT / "mlx_stack").rglob("__init__.py")}
    assert tree - listed == set(), f"add to [tool.setuptools] packages: {sorted(tree - listed)}"
