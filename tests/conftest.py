"""Shared fixtures for the numba_cnn test suite.

- ``rng``: a seeded ``numpy.random.Generator`` (a fresh one per test, so tests are independent
  and reproducible).
- ``torch_mod``: the ``torch`` module, or a skip when PyTorch is not installed. Only the tests that
  compare against PyTorch request it, so the rest of the suite runs without PyTorch.
"""
import os
import sys

import numpy as np
import pytest

# Let test modules import the shared helpers (``_conv_cases``) whatever pytest's import mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

SEED = 20240607


def _import_torch():
    """Return the torch module (single-threaded, to be gentle on shared machines) or None."""
    try:
        import torch
    except Exception:  # ImportError, or a broken install
        return None
    torch.set_num_threads(1)
    return torch


torch = _import_torch()
HAVE_TORCH = torch is not None


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture
def torch_mod():
    if torch is None:
        pytest.skip("PyTorch is not installed")
    return torch
