"""Every module under src/alignkit imports: a broken import (a typo, a missing dependency, a circular
import) fails here by name rather than deep inside the first test that happens to need the module."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import alignkit


def all_modules() -> list[str]:
    # walk_packages imports each package to find its children; a package that fails to import is
    # collected anyway (onerror) so its own test below reports the error.
    names = [alignkit.__name__]
    names += [
        m.name for m in pkgutil.walk_packages(alignkit.__path__, prefix="alignkit.", onerror=names.append)
    ]
    return sorted(set(names))


MODULES = all_modules()


def test_the_walk_finds_the_package_modules():
    assert {"alignkit", "alignkit.config", "alignkit.cli", "alignkit.errors", "alignkit.__main__"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
