"""Benchmark numba_cnn against PyTorch's CPU convolution and the im2col NumPy layer.

    numba-cnn bench [--quick] [--rounds 3] [--threads 2] [--ops conv2d,conv_transpose2d,pool2d]
                    [--cases res28,mnist1] [--dtype float64] [--json FILE]

Each library runs in its own process with the same thread count (Numba's and PyTorch's thread
pools never share a process), warms up, and reports the median of repeated calls. The processes
stay up for the whole run and take turns case by case: with ``--rounds R`` each library times
each case R times, alternating with the others, so that the timings a ratio compares are taken
seconds apart (the shared machine's speed drifts over minutes). The table
gives milliseconds, GFLOP/s and the ratios ``other time / our time`` (> 1 means we are faster).
Forward+backward computes the input, weight and bias gradients in every library.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# name: (N, C, H, W, F, kernel, stride, padding, dilation); shapes of shared/DESIGN.md
CASES = {
    "mnist1": (64, 1, 28, 28, 32, 3, 1, 0, 1),
    "mnist2": (64, 32, 13, 13, 64, 3, 1, 0, 1),
    "z2dl": (100, 1, 28, 28, 30, 5, 1, 0, 1),
    "res56": (8, 64, 56, 56, 64, 3, 1, 1, 1),
    "res28": (8, 128, 28, 28, 128, 3, 1, 1, 1),
    "res14": (8, 256, 14, 14, 256, 3, 1, 1, 1),
    "dil56": (8, 64, 56, 56, 64, 3, 1, 2, 2),
    "res28s2": (8, 128, 28, 28, 128, 3, 2, 1, 1),
    # stride-2 variants and shapes nobody tuned for (issue 7): channel counts that are not
    # multiples of 16, 5x5 and 7x7 kernels, output widths no register tile divides
    "res56s2": (8, 64, 56, 56, 64, 3, 2, 1, 1),
    "res14s2": (8, 256, 14, 14, 256, 3, 2, 1, 1),
    "odd3": (8, 100, 19, 19, 120, 3, 1, 1, 1),
    "odd5": (8, 48, 27, 27, 80, 5, 1, 2, 1),
    "stem7": (8, 3, 112, 112, 64, 7, 2, 3, 1),
}
# name: (mode, kernel, stride, padding) on a (32, 64, 56, 56) input
POOL_CASES = {
    "maxpool2": ("max", 2, 2, 0),
    "maxpool3": ("max", 3, 2, 1),
    "avgpool2": ("avg", 2, 2, 0),
}
POOL_INPUT = (32, 64, 56, 56)
# name: (N, C_in, H, W, C_out, kernel, stride, padding, output_padding); transposed convolution
TRANSPOSED_CASES = {
    "dcgan": (16, 128, 16, 16, 64, 4, 2, 1, 0),
    "ct28": (8, 64, 28, 28, 64, 3, 1, 1, 0),
    "ct28op": (8, 64, 28, 28, 64, 3, 2, 1, 1),
}
OPS = {"conv2d": CASES, "conv_transpose2d": TRANSPOSED_CASES, "pool2d": POOL_CASES}
SGEMM = "sgemm"  # the numpy worker's result for a SGEMM_SIZE^2 float32 matmul
SGEMM_SIZE = 2048
LIBRARIES = ("numba_cnn", "torch", "numpy")
SETTLE_SECONDS = 0.25  # between two workers' turns (_Worker.measure)


def conv_flops(name):
    """Multiply-adds x 2 of one forward pass (for pooling: window elements visited)."""
    case = ALL_CASES[name]
    if name in TRANSPOSED_CASES:
        n, c, h, w, f, k, s, p, _ = case
        return 2 * n * c * h * w * f * k * k
    if name in POOL_CASES:
        _, k, s, p = case
        n, c, h, w = POOL_INPUT
        return n * c * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1) * k * k
    n, c, h, w, f, k, s, p, d = case
    out_h = (h + 2 * p - d * (k - 1) - 1) // s + 1
    out_w = (w + 2 * p - d * (k - 1) - 1) // s + 1
    return 2 * n * f * c * k * k * out_h * out_w


ALL_CASES = dict(CASES, **TRANSPOSED_CASES, **POOL_CASES)


def _median_seconds(function, min_repeats, min_seconds):
    function()
    function()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _make_pool_runner(library, case, dtype):
    """(forward, forward_backward) closures for one pooling case."""
    mode, k, s, p = case
    x = np.random.default_rng(0).standard_normal(POOL_INPUT).astype(dtype)
    if library == "numba_cnn":
        from numba_cnn import functional as F
        if mode == "max":
            y, indices = F.max_pool2d(x, k, s, p, return_indices=True)
            grad = np.ones_like(y)

            def forward_backward():
                _, idx = F.max_pool2d(x, k, s, p, return_indices=True)
                F.max_pool2d_backward(grad, idx, x.shape)
            return (lambda: F.max_pool2d(x, k, s, p)), forward_backward
        grad = np.ones_like(F.avg_pool2d(x, k, s, p))

        def forward_backward():
            F.avg_pool2d(x, k, s, p)
            F.avg_pool2d_backward(grad, x.shape, k, s, p)
        return (lambda: F.avg_pool2d(x, k, s, p)), forward_backward
    if library == "torch":
        import torch
        pool = (torch.nn.functional.max_pool2d if mode == "max"
                else torch.nn.functional.avg_pool2d)
        xt = torch.from_numpy(x).requires_grad_(True)
        with torch.no_grad():
            grad = torch.ones_like(pool(xt, k, s, p))

        def forward():
            with torch.no_grad():
                pool(xt, k, s, p)

        def forward_backward():
            xt.grad = None
            pool(xt, k, s, p).backward(grad)
        return forward, forward_backward
    from numba_cnn import im2col
    y, _ = im2col.pool2d(x, k, k, s, p, mode)
    grad = np.ones_like(y)

    def forward_backward():
        _, state = im2col.pool2d(x, k, k, s, p, mode)
        im2col.pool2d_backward(grad, state, k, k, s, p)
    return (lambda: im2col.pool2d(x, k, k, s, p, mode)), forward_backward


def _torch_runner(function_name, x, weight, bias, arguments, rng, dtype):
    """(forward, forward_backward) closures for a torch.nn.functional convolution; the
    backward computes the input, weight and bias gradients, as ours does."""
    import torch
    conv = getattr(torch.nn.functional, function_name)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(weight).requires_grad_(True)
    bt = torch.from_numpy(bias).requires_grad_(True)
    with torch.no_grad():
        grad = torch.from_numpy(rng.standard_normal(conv(xt, wt, bt, *arguments).shape)
                                .astype(dtype))

    def forward():
        with torch.no_grad():
            conv(xt, wt, bt, *arguments)

    def forward_backward():
        xt.grad = wt.grad = bt.grad = None
        conv(xt, wt, bt, *arguments).backward(grad)
    return forward, forward_backward


def _make_transposed_runner(library, case, dtype):
    """(forward, forward_backward) closures for one transposed-convolution case."""
    n, c, h, w, f, k, s, p, op = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = (rng.standard_normal((c, f, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    bias = rng.standard_normal(f).astype(dtype)
    if library == "numba_cnn":
        from numba_cnn import functional as F
        grad = rng.standard_normal(F.conv_transpose2d(x, weight, bias, s, p, op).shape
                                   ).astype(dtype)

        def forward_backward():
            F.conv_transpose2d(x, weight, bias, s, p, op)
            F.conv_transpose2d_backward(grad, x, weight, s, p, op)
        return (lambda: F.conv_transpose2d(x, weight, bias, s, p, op)), forward_backward
    if library == "torch":
        return _torch_runner("conv_transpose2d", x, weight, bias, (s, p, op), rng, dtype)
    from numba_cnn import im2col
    y, _ = im2col.conv_transpose2d(x, weight, bias, s, p, op)
    grad = rng.standard_normal(y.shape).astype(dtype)

    def forward_backward():
        _, x_matrix = im2col.conv_transpose2d(x, weight, bias, s, p, op)
        im2col.conv_transpose2d_backward(grad, x.shape, x_matrix, weight, s, p)
    return (lambda: im2col.conv_transpose2d(x, weight, bias, s, p, op)), forward_backward


def _make_runner(library, name, dtype):
    """Return (forward, forward_backward) closures for one library on one case."""
    case = ALL_CASES[name]
    if name in POOL_CASES:
        return _make_pool_runner(library, case, dtype)
    if name in TRANSPOSED_CASES:
        return _make_transposed_runner(library, case, dtype)
    n, c, h, w, f, k, s, p, d = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = (rng.standard_normal((f, c, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    bias = rng.standard_normal(f).astype(dtype)
    if library == "numba_cnn":
        from numba_cnn import functional as F
        y = F.conv2d(x, weight, bias, s, p, d)
        grad = rng.standard_normal(y.shape).astype(dtype)

        def forward_backward():
            F.conv2d(x, weight, bias, s, p, d)
            F.conv2d_backward(grad, x, weight, s, p, d)
        return (lambda: F.conv2d(x, weight, bias, s, p, d)), forward_backward
    if library == "torch":
        return _torch_runner("conv2d", x, weight, bias, (s, p, d), rng, dtype)
    from numba_cnn import im2col
    y, _ = im2col.conv2d(x, weight, bias, s, p, d)
    grad = rng.standard_normal(y.shape).astype(dtype)

    def forward_backward():
        _, col = im2col.conv2d(x, weight, bias, s, p, d)
        im2col.conv2d_backward(grad, x.shape, col, weight, s, p, d)
    return (lambda: im2col.conv2d(x, weight, bias, s, p, d)), forward_backward


def _serve(library, dtype, quick):
    """A worker process's loop: one request per line of stdin, a case name or SGEMM (the
    machine's sgemm rate, the yardstick of issue 7's "85% of sgemm"; any library can run it,
    the numpy worker does), answered by one line of JSON on stdout: {"forward": seconds,
    "forward_backward": seconds}, or {"error": text} if the case failed. Only the current
    case's arrays are kept alive."""
    # the answers get stdout's file of their own; anything else printed goes to stderr
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if library == "torch":
        import torch
        torch.set_num_threads(int(os.environ["NUMBA_NUM_THREADS"]))
    else:  # (imported for the import's time, not its name)
        importlib.import_module("numba_cnn.functional" if library == "numba_cnn"
                                else "numba_cnn.im2col")
    min_repeats, min_seconds = (3, 0.2) if quick else (10, 1.0)
    case = runner = None  # the current case's runner: the only arrays kept alive
    print(json.dumps({"ready": True}), file=answers, flush=True)  # imported: see _run_rounds
    for line in sys.stdin:
        name = line.strip()
        try:
            if name == SGEMM:
                rng = np.random.default_rng(0)
                a, b = (rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE)).astype(np.float32)
                        for _ in range(2))
                answer = {"forward": _median_seconds(lambda: a @ b, min_repeats, min_seconds)}
                del a, b
            else:
                if name != case:
                    case = runner = None  # the previous case's arrays freed first
                    runner = _make_runner(library, name, dtype)
                    case = name
                forward, forward_backward = runner
                answer = {
                    "forward": _median_seconds(forward, min_repeats, min_seconds),
                    "forward_backward": _median_seconds(forward_backward, min_repeats,
                                                        min_seconds),
                }
        except Exception:
            import traceback
            answer = {"error": traceback.format_exc()[-2000:]}
        print(json.dumps(answer), file=answers, flush=True)


def _median_over_rounds(runs):
    """{case: {kind: seconds}} per round -> the median per case and kind over the rounds that
    have it (None if no round has any case)."""
    runs = [run for run in runs if run]
    if not runs:
        return None
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {name: {kind: float(np.median([run[name][kind] for run in runs if name in run]))
                   for kind in next(run[name] for run in runs if name in run)}
            for name in names}


class _Worker:
    """One library's worker process (``_serve``), kept for the whole run."""

    def __init__(self, library, dtype, threads, quick):
        self.library = library
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "numba_cnn.bench", "--worker", library, "--dtype",
                   dtype] + (["--quick"] if quick else [])
        # (stderr to a file: a pipe nobody reads until the end could fill and block it)
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True)
        self.alive = True
        self.ready = False

    def wait_ready(self):
        """Wait until the worker has imported its library (its first answer)."""
        if not self.ready:
            self.ready = self._answer("start") is not None

    def measure(self, name):
        """The worker's timings of case ``name`` (or SGEMM), or None if it failed."""
        self.wait_ready()
        if not self.alive:
            return None
        # Let the worker that ran last go quiet first: OpenBLAS's threads spin for about 0.1 s
        # after a call, libgomp's and TBB's for less.
        time.sleep(SETTLE_SECONDS)
        try:
            self.process.stdin.write(name + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        return self._answer(name)

    def _answer(self, name):
        """The worker's next line of JSON, or None (reported on stderr) if it failed."""
        if not self.alive:
            return None
        answer = self.process.stdout.readline()
        if not answer:  # the process ended: reported once, its later cases left out
            self.alive = False
            self.process.wait()
            self.errors.seek(0)
            print(f"[{self.library} failed]\n{self.errors.read()[-2000:]}", file=sys.stderr)
            return None
        answer = json.loads(answer)
        if "error" in answer:
            print(f"[{self.library} failed on {name}]\n{answer['error']}", file=sys.stderr)
            return None
        return answer

    def close(self):
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait()
        self.errors.close()


def _run_rounds(libraries, case_names, dtype, threads, quick, round_count):
    """{library: [{case: timings} per round]}: case by case, each round asks every library
    in turn (the numpy worker also times SGEMM first), so that the timings a ratio compares
    are taken seconds apart, not minutes (the machine's speed drifts over minutes)."""
    workers = {library: _Worker(library, dtype, threads, quick) for library in libraries}
    rounds = {library: [{} for _ in range(round_count)] for library in libraries}
    try:
        # all imports done before the first timing (they ran beside the first sgemm rounds,
        # which then read half the machine's rate)
        for worker in workers.values():
            worker.wait_ready()
        for name in [SGEMM] + list(case_names):
            for each_round in range(round_count):
                for library, worker in workers.items():
                    if name == SGEMM and library != "numpy":
                        continue
                    timings = worker.measure(name)
                    if timings is not None:
                        rounds[library][each_round][name] = timings
    finally:
        for worker in workers.values():
            worker.close()
    return rounds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_cnn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help=f"comma-separated case names, from "
                        f"{', '.join(ALL_CASES)} (default: every case of --ops)")
    parser.add_argument("--ops", default="conv2d",
                        help=f"comma-separated operation families, from {', '.join(OPS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every case this many times in every library, the "
                             "libraries taking turns case by case, and report each time's "
                             "median over the rounds (the machine's load drifts over minutes; "
                             "alternating spreads that over all libraries)")
    parser.add_argument("--json", dest="json_file", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown_ops = [o for o in args.ops.split(",") if o not in OPS]
    if unknown_ops:
        parser.error(f"unknown op(s) {unknown_ops}; choose from {list(OPS)}")
    if args.cases:
        case_names = [c for c in args.cases.split(",") if c]
    else:
        case_names = [name for op in args.ops.split(",") for name in OPS[op]]
    unknown = [c for c in case_names if c not in ALL_CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(ALL_CASES)}")
    if args.worker:
        _serve(args.worker, args.dtype, args.quick)
        return 0
    libraries = []
    for library in args.libraries.split(","):
        if library == "torch":
            if importlib.util.find_spec("torch") is None:
                print("torch is not installed: skipping it", file=sys.stderr)
                continue
        libraries.append(library)
    rounds = _run_rounds(libraries, case_names, args.dtype, args.threads, args.quick,
                         max(1, args.rounds))
    results = {library: _median_over_rounds(runs) for library, runs in rounds.items()}
    ours = results.get("numba_cnn") or {}
    header = (f"{'case':8} {'pass':8} {'ours ms':>9} {'GF/s':>7} {'torch ms':>9} {'GF/s':>7} "
              f"{'vs torch':>8} {'numpy ms':>9} {'vs numpy':>8}")
    print(f"{args.ops} {args.dtype}, {args.threads} threads, medians"
          f"{f' over {args.rounds} alternating rounds' if args.rounds > 1 else ''}; "
          "'vs X' = X time / our time")
    print(header)
    for name in case_names:
        flops = conv_flops(name)
        for kind, factor in (("forward", 1), ("forward_backward", 3)):
            row = f"{name:8} {'fwd' if factor == 1 else 'fwd+bwd':8}"
            our_time = ours.get(name, {}).get(kind)
            for library in LIBRARIES:
                timing = (results.get(library) or {}).get(name, {}).get(kind)
                if library == "numba_cnn":
                    row += (f" {timing * 1e3:9.3f} {factor * flops / timing / 1e9:7.1f}"
                            if timing else f" {'-':>9} {'-':>7}")
                elif library == "torch":
                    row += (f" {timing * 1e3:9.3f} {factor * flops / timing / 1e9:7.1f}"
                            f" {timing / our_time:8.2f}" if timing and our_time
                            else f" {'-':>9} {'-':>7} {'-':>8}")
                else:
                    row += (f" {timing * 1e3:9.3f} {timing / our_time:8.1f}"
                            if timing and our_time else f" {'-':>9} {'-':>8}")
            print(row)
    sgemm = ((results.get("numpy") or {}).get(SGEMM) or {}).get("forward")
    if sgemm:
        sgemm_rate = 2 * SGEMM_SIZE ** 3 / sgemm / 1e9
        shares = [f"{name} {conv_flops(name) / ours[name]['forward'] / 1e9 / sgemm_rate:.0%}"
                  for name in case_names if name in CASES and ours.get(name)]
        print(f"sgemm (NumPy {SGEMM_SIZE}x{SGEMM_SIZE} float32 matmul, same threads): "
              f"{sgemm_rate:.0f} GFLOP/s" + (f"; our conv2d forward at {', '.join(shares)} "
                                             "of it" if shares else ""))
    if args.json_file:
        with open(args.json_file, "w") as handle:
            json.dump({"dtype": args.dtype, "threads": args.threads, "results": results,
                       "rounds": rounds}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
