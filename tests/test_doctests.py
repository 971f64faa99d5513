"""Every ``Example:`` in jaxtl's docstrings runs and prints what it says (STYLE.md: docstring
examples that run), module by module."""

import doctest
import importlib
import pkgutil

import pytest

import jaxtl

MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxtl.__path__, "jaxtl."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
