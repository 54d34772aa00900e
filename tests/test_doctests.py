"""The examples in the docstrings run, as written."""

import doctest
import importlib
import pkgutil

import pytest

import optax_sphere

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(optax_sphere.__path__, prefix="optax_sphere.")
    if not name.split(".")[-1].startswith("_")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_examples_are_there():
    finder = doctest.DocTestFinder()
    examples = sum(
        len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name))
    )
    assert examples > 0
