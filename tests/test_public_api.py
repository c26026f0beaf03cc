"""The public names of the package are exactly what its docstrings document (httpx's habit).

Each public package's docstring has a ``Public API`` block of ``from X import ...`` lines;
its ``__all__`` must list exactly those names, and each must resolve.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLIC_PACKAGES = ["studioserve", "studioserve.pipelines", "studioserve.models"]


def documented_names(module_name: str) -> set[str]:
    doc = importlib.import_module(module_name).__doc__ or ""
    block = doc.split("Public API", 1)[1].split("\n\n", 2)[1]
    names: set[str] = set()
    for statement in re.findall(r"from [\w.]+ import \(?([^)]*?)\)?(?=\n\s*from |\Z)", block, re.S):
        names.update(n.strip() for n in statement.replace("\n", " ").split(",") if n.strip())
    return names


@pytest.mark.parametrize("module_name", PUBLIC_PACKAGES)
def test_all_is_exactly_what_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    documented = documented_names(module_name)
    assert documented, f"{module_name} documents no public API"
    assert set(module.__all__) == documented
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_the_top_level_names_are_in_the_readme() -> None:
    import studioserve

    readme = (REPO / "README.rst").read_text()
    for name in set(studioserve.__all__) - {"__version__"}:
        assert name in readme, name


def test_unknown_top_level_names_raise_attribute_error() -> None:
    import studioserve

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        studioserve.nope  # noqa: B018
