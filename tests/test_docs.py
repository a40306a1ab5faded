"""Docstring examples of the notebook-facing library run as tests."""

import doctest
import importlib

import pytest

MODULES = ['asga_jax.optim.asga', 'asga_jax.optim.sam']


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f'{name} has no examples'
  assert result.failed == 0
