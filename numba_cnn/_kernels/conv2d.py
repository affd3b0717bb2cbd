"""Direct 2-D convolution kernels on a flat pixel grid.

Every convolution this library computes (forward, input gradient phase by phase, transposed
convolution) is reduced to one primitive, a multi-tap correlation over flat rows:

    out[r, n, p] = sum_k  src[n * src_image_stride + offsets[group(r), k] + p] * weight[r, k]

``src`` holds the (zero-padded, stride-phase-split) input as rows of ``grid_h * grid_w`` pixels,
so that a tap ``(c, kh, kw)`` is just a constant ``offset`` into the flat array and the pixel index
``p`` runs contiguously through whole rows of the output grid. Output positions in the grid's
spare columns are computed too and discarded by the unpacking step: a few percent of extra work
buys unit-stride, bounds-free vector loads (one zmm register = 16 float32 pixels). The
correlation runs ``register_tile``'s micro-kernel: ROW_TILE output rows x up to 6 vectors of
pixels, accumulated in registers over all taps (per tap: 6 input loads, 4 weight broadcasts,
24 FMAs); the sum over taps runs in tap order, one FMA per term.

The weight gradient is the matching reduction over all pixels of all images:

    grad_weight[r, k] = sum_q  grad[r, q] * src[offsets[group(r), k] + q]

with ``grad`` zero outside valid output positions, so the spare grid columns contribute nothing.

Conventions shared by the kernels (established by ``numba_cnn._conv_plan``):
- ``offsets`` is ``(groups, K)`` int64 with ``K`` a multiple of ``TAP_TILE`` (the weight
  gradient's tile); padding taps point at
  a zero region of ``src`` and carry zero weights, so they add exact zeros.
- ``weight`` is ``(R, K)`` with ``R`` a multiple of ``ROW_TILE`` and ``R // groups`` rows per group.
- Kernels never validate; indices are unsigned so Numba emits no negative-index wraparound code
  (which stops vectorisation).
"""
import numpy as np
from numba import njit, prange
from numba.core import config

from . import cached_njit
from .register_tile import ROWS as ROW_TILE
from .register_tile import VECTOR_BYTES, VECTORS, run_tile_1_row, run_tile_4_rows

TAP_TILE = 4
# Pixels per block of the weight-gradient reduction (measured best of 512-8192 on res28/res56):
# 4 gradient rows and 4 input rows of this length stay in L1/L2 (64 KiB in float32).
PIXEL_BLOCK = 2048

# The IR tiles do not index through Numba, so NUMBA_BOUNDSCHECK checks their ranges per call.
CHECK_BOUNDS = bool(config.BOUNDSCHECK)
# The weight-gradient reduction: "contract" for FMAs (no nnan/ninf: NaN and inf must propagate)
# and "reassoc", without which LLVM does not vectorise a reduction over pixels.
_REDUCE_MATH = {"contract", "reassoc"}


@cached_njit(parallel=True)
def correlate(src, src_image_stride, offsets, weight, out):
    """Set ``out`` to the multi-tap correlation, ROW_TILE rows per task.

    src : 1-D, the packed input (see module docstring), with a zero region for padding taps.
    src_image_stride : elements between consecutive images in ``src``.
    offsets : (G, K) int64; weight : (R, K); out : (R, N, L), C-contiguous, overwritten; ``L`` a
    multiple of the vector length (16 float32). All ``L`` positions of every output row are
    computed, a register tile (``register_tile``) at a time: ROW_TILE rows x up to VECTORS
    vectors of pixels, reduced over all K taps in registers.
    """
    rows, batch, length = out.shape
    taps = weight.shape[1]
    rows_per_group = rows // offsets.shape[0]
    row_tiles = rows // ROW_TILE
    out_flat = out.reshape(-1)
    offsets_flat = offsets.reshape(-1)
    weight_flat = weight.reshape(-1)
    lanes = VECTOR_BYTES // src.itemsize
    if CHECK_BOUNDS:
        _check_reads(src, src_image_stride, offsets, batch, length)
    for task in prange(batch * row_tiles):
        task_index = np.int64(task)
        n = task_index // row_tiles
        r0 = (task_index - n * row_tiles) * ROW_TILE
        group = r0 // rows_per_group
        group_offsets = offsets_flat[group * taps:(group + 1) * taps]
        src_start = n * src_image_stride
        out_start = (r0 * batch + n) * length
        for pixel in range(0, length, VECTORS * lanes):
            vectors = min(VECTORS * lanes, length - pixel) // lanes
            run_tile_4_rows(vectors, src, src_start + pixel, group_offsets, weight_flat,
                            r0 * taps, taps, out_flat, out_start + pixel, batch * length)


@cached_njit(parallel=True)
def correlate_rows(src, src_image_stride, offsets, weight, out):
    """``correlate`` for outputs with fewer than ROW_TILE rows per group, one row per task.

    Padding such groups to 4 rows (a single-channel input gradient, a depthwise convolution)
    would do 4x the work; one row per task does the useful work only, at a lower FMA rate
    (a vector load per FMA). Same arguments as ``correlate``; any number of rows.
    """
    rows, batch, length = out.shape
    taps = weight.shape[1]
    rows_per_group = rows // offsets.shape[0]
    out_flat = out.reshape(-1)
    offsets_flat = offsets.reshape(-1)
    weight_flat = weight.reshape(-1)
    lanes = VECTOR_BYTES // src.itemsize
    if CHECK_BOUNDS:
        _check_reads(src, src_image_stride, offsets, batch, length)
    for task in prange(batch * rows):
        task_index = np.int64(task)
        n = task_index // rows
        row = task_index - n * rows
        group = row // rows_per_group
        group_offsets = offsets_flat[group * taps:(group + 1) * taps]
        src_start = n * src_image_stride
        out_start = (row * batch + n) * length
        for pixel in range(0, length, VECTORS * lanes):
            vectors = min(VECTORS * lanes, length - pixel) // lanes
            run_tile_1_row(vectors, src, src_start + pixel, group_offsets, weight_flat,
                           row * taps, taps, out_flat, out_start + pixel, batch * length)


@njit
def _check_reads(src, src_image_stride, offsets, batch, length):
    """Under NUMBA_BOUNDSCHECK: fail loudly if a register tile would read outside ``src`` (the
    IR tiles index raw pointers, which Numba's bounds checking does not see)."""
    lanes = VECTOR_BYTES // src.itemsize
    if length % lanes != 0:
        raise IndexError("correlate: output rows are not whole vectors")
    last_read = (batch - 1) * src_image_stride + offsets.max() + length
    if offsets.min() < 0 or last_read > src.shape[0]:
        raise IndexError("correlate: a tap reads outside the packed input")


@cached_njit(parallel=True, fastmath=_REDUCE_MATH)
def correlate_grad_weight(src, offsets, grad, grad_weight, tap_splits):
    """Set ``grad_weight[r, k] = sum_q grad[r, q] * src[offsets[group(r), k] + q]``.

    src : 1-D packed input; offsets : (G, K) int64; grad : (R, Q), zero at positions that are not
    valid outputs; grad_weight : (R, K), overwritten.
    A task owns 4 rows of ``grad_weight`` and one of ``tap_splits`` ranges of its taps (disjoint,
    so no races). It walks the pixels in blocks: the block of 4 gradient rows stays in L1 while
    every tap tile of the range is reduced against it. The summation order is fixed by the block
    structure alone, so the result does not depend on the number of threads.
    """
    rows, length = grad.shape
    taps = grad_weight.shape[1]
    rows_per_group = rows // offsets.shape[0]
    row_tiles = rows // ROW_TILE
    tap_tiles = taps // TAP_TILE
    tiles_per_split = (tap_tiles + tap_splits - 1) // tap_splits
    grad_flat = grad.reshape(-1)
    zero = grad_weight.dtype.type(0)
    for task in prange(row_tiles * tap_splits):
        task_index = np.int64(task)
        r0 = (task_index // tap_splits) * ROW_TILE
        split = task_index - (task_index // tap_splits) * tap_splits
        first_tile = split * tiles_per_split
        last_tile = min(first_tile + tiles_per_split, tap_tiles)
        group = r0 // rows_per_group
        g0 = np.uint64((r0 + 0) * length)
        g1 = np.uint64((r0 + 1) * length)
        g2 = np.uint64((r0 + 2) * length)
        g3 = np.uint64((r0 + 3) * length)
        for r in range(ROW_TILE):
            for k in range(first_tile * TAP_TILE, last_tile * TAP_TILE):
                grad_weight[r0 + r, k] = zero
        for block_start in range(0, length, PIXEL_BLOCK):
            block_end = min(block_start + PIXEL_BLOCK, length)
            for tile in range(first_tile, last_tile):
                k0 = tile * TAP_TILE
                s0 = np.uint64(offsets[group, k0 + 0])
                s1 = np.uint64(offsets[group, k0 + 1])
                s2 = np.uint64(offsets[group, k0 + 2])
                s3 = np.uint64(offsets[group, k0 + 3])
                a00 = zero
                a01 = zero
                a02 = zero
                a03 = zero
                a10 = zero
                a11 = zero
                a12 = zero
                a13 = zero
                a20 = zero
                a21 = zero
                a22 = zero
                a23 = zero
                a30 = zero
                a31 = zero
                a32 = zero
                a33 = zero
                for pixel in range(block_start, block_end):
                    p = np.uint64(pixel)
                    x0 = src[s0 + p]
                    x1 = src[s1 + p]
                    x2 = src[s2 + p]
                    x3 = src[s3 + p]
                    d0 = grad_flat[g0 + p]
                    d1 = grad_flat[g1 + p]
                    d2 = grad_flat[g2 + p]
                    d3 = grad_flat[g3 + p]
                    a00 += d0 * x0
                    a01 += d0 * x1
                    a02 += d0 * x2
                    a03 += d0 * x3
                    a10 += d1 * x0
                    a11 += d1 * x1
                    a12 += d1 * x2
                    a13 += d1 * x3
                    a20 += d2 * x0
                    a21 += d2 * x1
                    a22 += d2 * x2
                    a23 += d2 * x3
                    a30 += d3 * x0
                    a31 += d3 * x1
                    a32 += d3 * x2
                    a33 += d3 * x3
                grad_weight[r0 + 0, k0 + 0] += a00
                grad_weight[r0 + 0, k0 + 1] += a01
                grad_weight[r0 + 0, k0 + 2] += a02
                grad_weight[r0 + 0, k0 + 3] += a03
                grad_weight[r0 + 1, k0 + 0] += a10
                grad_weight[r0 + 1, k0 + 1] += a11
                grad_weight[r0 + 1, k0 + 2] += a12
                grad_weight[r0 + 1, k0 + 3] += a13
                grad_weight[r0 + 2, k0 + 0] += a20
                grad_weight[r0 + 2, k0 + 1] += a21
                grad_weight[r0 + 2, k0 + 2] += a22
                grad_weight[r0 + 2, k0 + 3] += a23
                grad_weight[r0 + 3, k0 + 0] += a30
                grad_weight[r0 + 3, k0 + 1] += a31
                grad_weight[r0 + 3, k0 + 2] += a32
                grad_weight[r0 + 3, k0 + 3] += a33
