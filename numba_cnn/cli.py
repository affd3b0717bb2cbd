"""The ``numba-cnn`` command (also ``python -m numba_cnn``).

    numba-cnn [demo] [options]    train the demo CNN (the default command), see demo --help
    numba-cnn bench [options]     benchmark the kernels (numba_cnn.bench), see bench --help
"""
import sys

USAGE = """usage: numba-cnn [demo] [options]   train a small CNN on handwritten digits (default)
       numba-cnn bench [options]    compare the kernels with PyTorch and the im2col layers

'numba-cnn demo --help' and 'numba-cnn bench --help' list the options."""

COMMANDS = ("demo", "bench")


def main(argv=None):
    """Dispatch to the demo (default) or the benchmark; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "demo"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in COMMANDS:
            print(f"numba-cnn: unknown command {command!r}; choose from "
                  f"{', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
            return 2
    elif argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if command == "bench":
        from . import bench
        return bench.main(argv)
    from . import demo
    return demo.main(argv)
