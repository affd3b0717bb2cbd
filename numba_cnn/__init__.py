"""numba_cnn: Numba-compiled convolution and pooling layers for NumPy-style CNN training code.

Public modules: ``functional`` (also ``F``), ``layers`` (its classes are re-exported here) and
``reference`` (slow NumPy references used by the tests and as a benchmark baseline).
"""
__version__ = "0.1.0"

from . import functional
from . import functional as F
from . import layers
from .layers import AvgPool2D, Conv2D, GlobalAvgPool2D, MaxPool2D

__all__ = ["functional", "F", "layers", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D",
           "__version__"]
