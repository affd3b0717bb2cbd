"""``python -m numba_cnn``: the ``numba-cnn`` command (the demo by default)."""
import sys

from .cli import main

sys.exit(main())
