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

The weight gradient is the matching reduction over the same positions, all pixels of all
images:

    grad_weight[r, columns[k]] = sum_{n, p}  grad[r, n, p]
                                             * src[n * src_image_stride + offsets[group(r), k] + p]

with ``grad`` zero outside valid output positions, so the spare grid columns contribute nothing.
``columns`` (a permutation) lets the plan hand the taps over sorted by where they read.

The weight gradient of most ungrouped layers runs instead on a channel-blocked copy of the input,
``(N, CB, H, W, LANES)`` with LANES channels (one vector) innermost (``blocked_grad_weight``):

    grad_weight[r, k, lane] = sum_{n, i, j}  grad[n, r, i, j] * src[n, (i * stride_h * W
                                             + j * stride_w) * LANES + offsets[k] + lane]

It reads the output gradient as given, pixel by pixel, so nothing is computed at spare grid
columns, and the vector lanes are channels, so no sums across lanes are needed.

Conventions shared by the grid kernels (established by ``numba_cnn._conv_plan``):
- ``offsets`` is ``(groups, K)`` int64; for the weight gradient ``K`` is a multiple of
  ``TAP_TILE``, with padding taps that point at a zero region of ``src`` and carry zero
  weights, so they add exact zeros (``correlate`` takes any ``K`` and runs the taps that
  ``phase_taps`` names, which need not include the padding).
- ``weight`` is ``(R, K)`` with ``R`` a multiple of ``ROW_TILE`` and ``R // groups`` rows per group.
- Every read of ``src`` stays inside the array (the plans leave zero tails behind the data); the
  IR tiles do not check, so under NUMBA_BOUNDSCHECK the drivers check the range once per call.
- Kernels never validate their arguments.
"""

import numpy as np
from numba import get_thread_id, njit, prange
from numba.core import config

from . import cached_njit
from .layout import SOURCE_DIGEST as LAYOUT_DIGEST
from .layout import image_in_slot, pack_grid_image, unblock_run
from .register_tile import ROWS as ROW_TILE
from .register_tile import (BROADCAST_VECTORS, OUTER_TAPS, REDUCE_TAPS,
                            SOURCE_FINGERPRINT, VECTOR_BYTES, VECTORS, run_broadcast_tile,
                            run_outer_tile, run_reduce_tile_4_rows, run_tile_1_row,
                            run_tile_4_rows)

TAP_TILE = 4

# The IR tiles do not index through Numba, so under NUMBA_BOUNDSCHECK the drivers check their
# ranges once per call.
CHECK_BOUNDS = bool(config.BOUNDSCHECK)


@njit(inline="always")
def _tile_width(row_vectors, tiles, tile):
    """Vectors in tile ``tile`` of ``tiles`` covering ``row_vectors``: as even as possible
    (14 vectors as 5 + 5 + 4, not 6 + 6 + 2: a narrow tile has too few accumulators to hide
    the FMA latency and pays the same per-tap overhead)."""
    return row_vectors // tiles + (1 if tile < row_vectors % tiles else 0)


@njit
def _check_reads(src, offsets, last_start, length):
    """Under NUMBA_BOUNDSCHECK: fail loudly if a register tile would read outside ``src`` (the
    IR tiles index raw pointers, which Numba's bounds checking does not see). The tiles read
    ``src[start + offsets[k] + p]`` for ``0 <= start <= last_start``, ``p < length``."""
    if offsets.min() < 0 or last_start + offsets.max() + length > src.shape[0]:
        raise IndexError("correlate: a tap reads outside the packed input")


@njit
def _check_phase_reads(src, offsets, phase_taps, phase_pixels, last_start):
    """``_check_reads`` for each phase of ``correlate``: its taps with its pixels. (Plain
    loops: the kernel compiles this even where NUMBA_BOUNDSCHECK is off, and slicing the
    offsets per phase made that 0.8 s longer.)"""
    for phase in range(phase_taps.shape[0] - 1):
        length = phase_pixels[phase + 1] - phase_pixels[phase]
        for group in range(offsets.shape[0]):
            for tap in range(phase_taps[phase], phase_taps[phase + 1]):
                if offsets[group, tap] < 0 or (last_start + offsets[group, tap] + length
                                               > src.shape[0]):
                    raise IndexError("correlate: a tap reads outside the packed input")


def _build_drivers(build):
    """The correlation drivers; ``build`` = (check bounds, register_tile.SOURCE_FINGERPRINT,
    layout.SOURCE_DIGEST).

    Built in a factory so that ``build`` is a closure value: Numba's cache checks a cached
    kernel against its own source file and its closure values, not against the IR tiles it
    inlines from ``register_tile.py``, the packing helpers it calls from ``layout.py`` or
    NUMBA_BOUNDSCHECK, so without these values in the key an edited tile or layout module (or a
    bounds-checked run) would load stale cached code.
    """
    # A bool of its own, not build[0]: Numba prunes a branch on a constant closure bool, but
    # compiled the range checks behind ``if build[0]`` into every kernel (+0.8 s for correlate's).
    check_bounds = build[0]

    @cached_njit(parallel=True)
    def correlate(src, src_image_stride, offsets, phase_taps, weight, out, phase_pixels,
                  tap_blocks, tiles_per_task, unpack, bias, dst, crops, pack_src, slot_images,
                  packing):
        """Set ``out`` to the multi-tap correlation of one or more phases; or, with ``unpack``,
        write it to ``dst`` from the tasks that compute it (see below).

        src : 1-D, the packed input (see module docstring), with zeros for padding taps.
        src_image_stride : elements between consecutive images in ``src``. Or, unpacking with
        ``slot_images`` (S + 1,) int64 set to -1 (else of size 0), ``src`` holds S images'
        room, a slot per thread, zero past each image's planes, and a task packs its image of
        ``pack_src`` (N, C, H, W) into its thread's slot when the slot does not hold it yet:
        ``layout.pack_grid_image`` with ``packing`` = (grid rows, pad top, pad left, grid
        height, grid width, plane length). The slot is read from that core's L2, and no copy of
        the whole input exists.
        offsets : (G, K) int64, phase ``p``'s taps in columns ``phase_taps[p]`` to
        ``phase_taps[p + 1]``; weight : (R, K), the same columns; out : (R, N, L),
        C-contiguous, overwritten, each row holding the phases' pixels one after another:
        phase ``p``'s ``phase_pixels[p + 1] - phase_pixels[p]`` pixels (a multiple of the
        vector length, 16 float32) from ``phase_pixels[p]`` on, the sums over its taps
        (``L = phase_pixels[-1]``). All pixels of every output row are computed, a register
        tile (``register_tile``) at a time: ROW_TILE rows x up to VECTORS vectors of pixels,
        reduced over the taps in registers. Groups of fewer rows than ROW_TILE (a
        single-channel input gradient, a depthwise convolution; padding them to 4 rows would do
        4x the work) run one row per task, at a lower FMA rate (a vector load per FMA).

        A task owns one image and ``tiles_per_task`` row tiles, all phases. For each pixel tile
        it runs a phase's taps in blocks of ``tap_blocks[p]``, each block through all its row
        tiles, the later blocks continuing the sums in ``out``: the input a tap block reads for
        one pixel tile fits L1 and is reused by every row tile (all taps at once stream it from
        L2 once per row tile, too often on strided layers, whose taps read four planes per
        channel). The taps are still summed in order, so the result does not depend on the
        blocking.

        With ``unpack``, the task's rows go to ``dst`` (N, F, H, W), NCHW, plus ``bias`` (F,),
        where row ``r`` of group ``g`` holds output ``g * F // G + r - g * R // G`` (the rows
        past a group's outputs are padding): each row of ``crops`` (K, 7) int64, (target,
        lines, columns, source, target line step, target column step, source line step),
        copies a rectangle of the output row from pixel ``source`` on into the output's plane
        from ``target`` on (``_conv_plan.phase_crops``: a stride phase each), or sets it to
        the bias where ``source`` < 0 (a phase without taps). ``out``
        (S, rows per task, L) is then scratch: each thread (S >= threads) computes a task's
        rows there and writes them out while they are in cache, instead of writing all of the
        grid to memory for a separate unpacking pass to read back (mnist1 and z2dl spent 40% of
        their forward in that pass, res56 stride 2 22% of its input gradient).
        """
        rows, row_len = weight.shape[0], out.shape[2]
        batch = dst.shape[0] if unpack else out.shape[1]
        taps = weight.shape[1]
        phases = phase_taps.shape[0] - 1
        groups = offsets.shape[0]
        rows_per_group = rows // groups
        rows_per_tile = ROW_TILE if rows_per_group % ROW_TILE == 0 else 1
        row_tiles = rows // rows_per_tile
        row_sets = (row_tiles + tiles_per_task - 1) // tiles_per_task
        prepacked = slot_images.size == 0
        plane = dst.shape[2] * dst.shape[3]
        fits = phase_pixels[phases] == row_len
        if unpack:
            fits = fits and out.shape[1] >= tiles_per_task * rows_per_tile and (
                dst.shape[1] % groups == 0 and dst.shape[1] // groups <= rows_per_group
                and bias.shape[0] >= dst.shape[1])
            for crop in range(crops.shape[0]):
                target, lines, columns, source = (crops[crop, 0], crops[crop, 1],
                                                  crops[crop, 2], crops[crop, 3])
                last_target = target + (lines - 1) * crops[crop, 4] + (columns - 1) * crops[
                    crop, 5]
                last_source = source + (lines - 1) * crops[crop, 6] + columns - 1
                fits = fits and (lines < 1 or columns < 1 or target >= 0 and last_target < plane
                                 and (source < 0 or last_source < row_len))
        if not fits:
            raise ValueError("correlate: dst or the output slots do not fit the sums")
        if not prepacked and (not unpack or pack_src.shape[0] != batch
                              or src.shape[0] < (slot_images.size - 1) * src_image_stride):
            raise ValueError("correlate: packing per thread needs unpacking and a slot each")
        out_flat = out.reshape(-1)
        dst_flat = dst.reshape(-1)
        outputs_per_group = dst.shape[1] // groups
        # where a row's pixels start: in the grid, (r * N + n) * L; in the scratch, by the row's
        # place in the task
        out_row_stride = row_len if unpack else batch * row_len
        task_len = out.shape[1] * row_len
        slot_overflows = 0  # a reduction: a flag set in the loop would stay private to it
        offsets_flat = offsets.reshape(-1)
        weight_flat = weight.reshape(-1)
        lanes = VECTOR_BYTES // src.itemsize
        if check_bounds and build[0]:  # NUMBA_BOUNDSCHECK (build: in the cache key)
            _check_phase_reads(src, offsets, phase_taps, phase_pixels, (
                batch if prepacked else slot_images.size - 1) * src_image_stride
                - src_image_stride)
        for task in prange(batch * row_sets):
            task_index = np.int64(task)
            n = task_index // row_sets
            first_tile = (task_index - n * row_sets) * tiles_per_task
            stop_tile = min(first_tile + tiles_per_task, row_tiles)
            first_task_row = first_tile * rows_per_tile
            src_start = n * src_image_stride
            slot_start = 0
            # where the task's first row starts in ``out``: (r * N + n) * L in the grid, at
            # its thread's slot in the scratch (set here, not by a branch in the tile loops:
            # that compiled 0.4 s longer)
            task_out_start = n * row_len + first_task_row * out_row_stride
            if unpack:
                slot = np.int64(get_thread_id())  # in [0, get_num_threads()): one writer each
                if slot >= out.shape[0] or not prepacked and slot >= slot_images.size - 1:
                    slot_overflows += 1  # raised below: a raise in the loop would make it
                    continue             # serial
                slot_start = slot * task_len
                task_out_start = slot_start
                if not prepacked:
                    src_start = slot * src_image_stride
                    if slot_images[slot] != n:
                        pack_grid_image(pack_src, n, src, src_start, *packing)
                        slot_images[slot] = n
            for phase in range(phases):
                first_phase_tap = phase_taps[phase]
                phase_tap_count = phase_taps[phase + 1] - first_phase_tap
                tap_block = tap_blocks[phase]
                row_vectors = (phase_pixels[phase + 1] - phase_pixels[phase]) // lanes
                tiles = (row_vectors + VECTORS - 1) // VECTORS
                pixel = phase_pixels[phase]
                for tile in range(tiles):
                    vectors = _tile_width(row_vectors, tiles, tile)
                    for first_tap in range(0, phase_tap_count, tap_block):
                        stop_tap = min(first_tap + tap_block, phase_tap_count)
                        for row_tile in range(first_tile, stop_tile):
                            r0 = row_tile * rows_per_tile
                            block_taps = (r0 // rows_per_group) * taps + first_phase_tap
                            block_offsets = offsets_flat[block_taps + first_tap:
                                                         block_taps + stop_tap]
                            out_start = task_out_start + (r0 - first_task_row) \
                                * out_row_stride + pixel
                            weight_start = r0 * taps + first_phase_tap + first_tap
                            if rows_per_tile == ROW_TILE:
                                run_tile_4_rows(vectors, src, src_start + pixel - phase_pixels[
                                                    phase], block_offsets, weight_flat,
                                                weight_start, taps, out_flat, out_start,
                                                out_row_stride, first_tap)
                            else:
                                run_tile_1_row(vectors, src, src_start + pixel - phase_pixels[
                                                   phase], block_offsets, weight_flat,
                                               weight_start, taps, out_flat, out_start,
                                               out_row_stride, first_tap)
                    pixel += vectors * lanes
            if unpack:
                for row in range(first_task_row, stop_tile * rows_per_tile):
                    group = row // rows_per_group
                    output = row - group * rows_per_group
                    if output >= outputs_per_group:
                        continue
                    output += group * outputs_per_group
                    value = bias[output]
                    row_start = slot_start + (row - first_task_row) * row_len
                    plane_start = (n * dst.shape[1] + output) * plane
                    # layout.write_crops, inline (see there why)
                    for crop in range(crops.shape[0]):
                        target = plane_start + crops[crop, 0]
                        lines, columns = crops[crop, 1], crops[crop, 2]
                        source = row_start + crops[crop, 3]
                        line_step, column_step = crops[crop, 4], crops[crop, 5]
                        source_step = crops[crop, 6]
                        if crops[crop, 3] < 0:
                            for i in range(lines):
                                line_target = np.uint64(target + i * line_step)
                                for j in range(columns):
                                    dst_flat[line_target + np.uint64(j * column_step)] = value
                        elif column_step == 1:
                            for i in range(lines):
                                line_target = np.uint64(target + i * line_step)
                                line_source = np.uint64(source + i * source_step)
                                for j in range(columns):
                                    dst_flat[line_target + np.uint64(j)] = (
                                        out_flat[line_source + np.uint64(j)] + value)
                        else:
                            for i in range(lines):
                                line_target = np.uint64(target + i * line_step)
                                line_source = np.uint64(source + i * source_step)
                                for j in range(columns):
                                    dst_flat[line_target + np.uint64(j * column_step)] = (
                                        out_flat[line_source + np.uint64(j)] + value)
        # (checked after the fact: numba.get_num_threads() would make the kernel uncacheable)
        if slot_overflows > 0:
            raise ValueError("correlate: fewer output slots than threads")

    @cached_njit(parallel=True)
    def correlate_grad_weight(src, src_image_stride, offsets, columns, grad, grad_weight,
                              pixel_block, tiles_per_task, tap_splits):
        """Set ``grad_weight[r, columns[k]] = sum_{n, p} grad[r, n, p]
        * src[n * src_image_stride + offsets[group(r), k] + p]``: the adjoint of ``correlate``,
        which reads the same positions.

        src : 1-D packed input, as for ``correlate``; offsets : (G, K) int64; columns : (K,)
        int64, a permutation of ``range(K)``; grad : (R, N, L), zero at positions that are not
        valid outputs, ``L`` a multiple of the vector length; grad_weight : (R, K), overwritten.
        A task owns ``tiles_per_task`` tiles of 4 rows of ``grad_weight`` and one of
        ``tap_splits`` ranges of its taps (disjoint, so no races). It walks the pixels in blocks
        of about ``pixel_block`` (whole images, or an image in parts): the block's gradient rows
        stay in cache while every tile of 6 taps of the range is reduced against them in
        registers, row tile by row tile (``register_tile``: 24 vector accumulators over the
        block's images, summed across lanes at the end of the block), so the tap tile's input
        rows are read from memory once per task. The summation order is fixed by the block
        structure alone, so the result does not depend on the number of threads.
        """
        rows, batch, length = grad.shape
        taps = grad_weight.shape[1]
        rows_per_group = rows // offsets.shape[0]
        row_tiles = rows // ROW_TILE
        row_sets = (row_tiles + tiles_per_task - 1) // tiles_per_task
        tap_tiles = taps // TAP_TILE
        tiles_per_split = (tap_tiles + tap_splits - 1) // tap_splits
        grad_flat = grad.reshape(-1)
        grad_weight_flat = grad_weight.reshape(-1)
        offsets_flat = offsets.reshape(-1)
        lanes = VECTOR_BYTES // src.itemsize
        image_vectors = length // lanes
        # a block is `block_images` whole images, or one image in `image_parts` parts
        image_parts = max(1, (length + pixel_block // 2) // pixel_block)
        block_images = max(1, min(batch, pixel_block // max(length, 1)))
        image_blocks = (batch + block_images - 1) // block_images
        zero = grad_weight.dtype.type(0)
        if check_bounds and build[0]:  # NUMBA_BOUNDSCHECK (build: in the cache key)
            _check_reads(src, offsets, (batch - 1) * src_image_stride, length)
        for task in prange(row_sets * tap_splits):
            task_index = np.int64(task)
            row_set = task_index // tap_splits
            split = task_index - row_set * tap_splits
            first_row = row_set * tiles_per_task * ROW_TILE
            stop_row = min(first_row + tiles_per_task * ROW_TILE, rows)
            first_tap = split * tiles_per_split * TAP_TILE
            last_tap = min(first_tap + tiles_per_split * TAP_TILE, taps)
            for r in range(first_row, stop_row):
                for k in range(first_tap, last_tap):
                    grad_weight[r, columns[k]] = zero
            for image_block in range(image_blocks):
                first_image = image_block * block_images
                images = min(block_images, batch - first_image)
                pixel = 0
                for part in range(image_parts):
                    vectors = _tile_width(image_vectors, image_parts, part)
                    for k0 in range(first_tap, last_tap, REDUCE_TAPS):
                        tile_taps = min(REDUCE_TAPS, last_tap - k0)
                        # the tile's input rows are reused from cache by every row tile of
                        # the set
                        for r0 in range(first_row, stop_row, ROW_TILE):
                            group_start = (r0 // rows_per_group) * taps
                            run_reduce_tile_4_rows(
                                tile_taps, src, first_image * src_image_stride + pixel,
                                src_image_stride, offsets_flat[group_start + k0:], grad_flat,
                                (r0 * batch + first_image) * length + pixel, batch * length,
                                length, images, vectors, grad_weight_flat, r0 * taps, taps,
                                columns[k0:])
                    pixel += vectors * lanes

    @cached_njit(parallel=True)
    def blocked_grad_weight(src, pad_top, pad_left, packed, slot_images, offsets, grad,
                            partials, stride_h, stride_w, block_lines, row_splits, tap_splits):
        """Set ``partials[s, r, k, lane] = sum_{n in part s, i, j} grad[n, r, i, j]
        * image_flat[(i * stride_h * W + j * stride_w) * LANES + offsets[k] + lane]``, the
        weight gradient on the channel-blocked input summed over each of S contiguous parts of
        the batch (their sum, in order, is the gradient), where ``image_flat`` is image ``n``
        of ``src`` in the channel-blocked layout, padded, as in ``blocked_correlate``.

        src : (N, C, H0, W0), as given; packed, slot_images : as in ``blocked_correlate``
        (one slot per thread, or all images prepacked); offsets : (K,) int64, ``K`` even,
        where tap k reads relative to an output pixel's position; grad : (N, R, OH, OW), the
        output gradient as given (no packing: the tile reads it in rows); partials : (S, R, K,
        LANES), overwritten.

        A task owns one of the S parts of the batch, one of ``row_splits`` ranges of rows and
        one of ``tap_splits`` ranges of taps (disjoint: no races). It walks its images in blocks
        of ``block_lines`` output lines; per block, tap tile by tap tile (the block's input for
        a tile of taps stays in L1), each row tile reduces its gradient lines against them in
        registers (``run_outer_tile``) and adds the result to its part. Unless prepacked, a
        task packs each of its images into its thread's slot first (again only if the slot
        holds another image), so it reads them from its own L2; with S > 1 each thread reads
        only the images it packed. The summation order depends on ``block_lines`` and S alone,
        not on the splits or the number of threads.
        """
        batch = src.shape[0]
        slots, blocks, height, width, lanes = packed.shape
        parts, rows, taps, _ = partials.shape
        _, _, out_height, out_width = grad.shape
        image_len = blocks * height * width * lanes
        row_tiles = (rows + ROW_TILE - 1) // ROW_TILE
        row_tiles_per_split = (row_tiles + row_splits - 1) // row_splits
        tap_tiles = (taps + OUTER_TAPS - 1) // OUTER_TAPS
        tap_tiles_per_split = (tap_tiles + tap_splits - 1) // tap_splits
        line_blocks = (out_height + block_lines - 1) // block_lines
        line_stride = stride_h * width * lanes
        packed_flat = packed.reshape(-1)
        grad_flat = grad.reshape(-1)
        partials_flat = partials.reshape(-1)
        zero = partials.dtype.type(0)
        prepacked = slot_images.size == 0
        if check_bounds and build[0]:  # NUMBA_BOUNDSCHECK (build: in the cache key)
            _check_reads(packed_flat, offsets, (slots - 1) * image_len,
                         (out_height - 1) * line_stride + (out_width - 1) * stride_w * lanes
                         + lanes)
        for task in prange(parts * row_splits * tap_splits):
            task_index = np.int64(task)
            part = task_index // (row_splits * tap_splits)
            row_split = (task_index - part * row_splits * tap_splits) // tap_splits
            tap_split = task_index - (part * row_splits + row_split) * tap_splits
            first_row = row_split * row_tiles_per_split * ROW_TILE
            stop_row = min(rows, first_row + row_tiles_per_split * ROW_TILE)
            first_tap = tap_split * tap_tiles_per_split * OUTER_TAPS
            stop_tap = min(taps, first_tap + tap_tiles_per_split * OUTER_TAPS)
            part_start = part * rows * taps * lanes
            for r in range(first_row, stop_row):
                for element in range(first_tap * lanes, stop_tap * lanes):
                    partials_flat[part_start + r * taps * lanes + element] = zero
            slot = np.int64(get_thread_id())  # in [0, get_num_threads()): one writer each
            if not prepacked and slot >= slots:  # raised below, as in blocked_correlate
                slot_images[slots] = 1
                continue
            for n in range(part * batch // parts, (part + 1) * batch // parts):
                if prepacked:
                    image_start = n * image_len
                else:
                    # (one column phase: an int64, not the literal 1, which compiled the packing
                    # helpers a second time, 0.7 s)
                    image_start = image_in_slot(src, n, packed, slot_images, slot, pad_top,
                                                pad_left, np.int64(1))
                for line_block in range(line_blocks):
                    first_line = line_block * block_lines
                    lines = min(block_lines, out_height - first_line)
                    src_start = image_start + first_line * line_stride
                    for k0 in range(first_tap, stop_tap, OUTER_TAPS):
                        # an even count: 6, 4 or 2
                        tile_taps = min(OUTER_TAPS, stop_tap - k0)
                        for r0 in range(first_row, stop_row, ROW_TILE):
                            # a last partial row tile runs row by row
                            tile_rows = ROW_TILE if stop_row - r0 >= ROW_TILE else 1
                            for r in range(r0, min(r0 + ROW_TILE, stop_row), tile_rows):
                                run_outer_tile(
                                    tile_rows, tile_taps, packed_flat, src_start, line_stride,
                                    stride_w * lanes, offsets[k0:], grad_flat,
                                    ((n * rows + r) * out_height + first_line) * out_width,
                                    out_height * out_width, out_width, lines, out_width,
                                    partials_flat, part_start + (r * taps + k0) * lanes,
                                    taps * lanes)
        if not prepacked and slot_images[slots] > 0:
            raise ValueError("blocked_grad_weight: fewer packing slots than threads")

    @cached_njit(parallel=True)
    def blocked_correlate(src, pad_top, pad_left, column_phases, packed, slot_images, offsets,
                          line_terms, weight, out, unblock, bias, dst, stride_h, pixel_tiles):
        """Set ``sums[n, b, i, j, lane] = sum_t image_flat[(i * stride_h * W + j) * LANES
        + offsets[t]] * weight[b, t, lane]``, the sum over the ``line_terms[i, 1]`` terms from
        ``line_terms[i, 0]`` on, where ``image_flat`` is image ``n`` of ``src`` in the
        channel-blocked layout, padded, its lines' columns in ``column_phases`` phases:
        ``layout.pack_channel_image(src, n, ..., pad_top, pad_left, column_phases)``. (Pixels
        are consecutive: a column stride is the offsets' business, with a phase per stride.)
        Unless ``unblock``, the sums are ``out`` (N, FB, OH, OW, LANES), overwritten. With
        ``unblock``, ``dst[n, b * LANES + lane, i, j] = sums[n, b, i, j, lane] + bias[b * LANES
        + lane]`` for dst (N, O, OH, OW), NCHW, and bias (O,); ``out`` (S, BROADCAST_VECTORS, L,
        OW, LANES) is then scratch for L output lines per thread.

        src : (N, C, H0, W0), as given; packed : (S, CB, H, W, LANES), scratch for one image
        in the blocked layout per thread (S = ``numba.get_num_threads()``), with
        ``slot_images`` (S + 1,) int64 set to -1 (it is overwritten); or all N images already
        packed (prepacked), with ``slot_images`` of size 0, and then src and the pads are not
        used (nor can the sums be unblocked, and the packing's ``column_phases`` is the
        caller's); offsets : (T,) int64, one per term, a (channel, tap) pair; line_terms : (OH,
        2) int64; weight : (FB, T, LANES), LANES filters per block.

        A task is one (image, filter-block pair, range of output lines: one, or L unblocking)
        item, in that order; the threads take contiguous ranges of them, handed out
        dynamically. A thread packs an image into its own slot of ``packed`` when it first
        reaches it (again only if its range was split in the middle of an image) and reads it
        from there, from its L2: packing all of the input first, in parallel, and then
        correlating cost 0.1-0.6 ms more per call (res28 stride 2: 2.15 against 1.57 ms), about
        0.1 ms per MB packed. Prepacked, the tasks run pairs outermost instead (5% faster on
        res14's stride-2 input gradient).

        A task computes BROADCAST_VECTORS filter blocks of its output lines, each line in
        ``pixel_tiles`` tiles of up to BROADCAST_PIXELS pixels (as even as possible), each
        reduced over the line's terms in registers (``register_tile``'s broadcast tile).
        Unblocking, it then writes its lines to dst from its thread's scratch, in L1 or L2: a
        separate pass over the whole blocked output read it back from memory after other
        threads wrote it.
        """
        batch = src.shape[0]
        slots, blocks, height, width, lanes = packed.shape
        filter_blocks, terms, _ = weight.shape
        out_height = line_terms.shape[0]
        out_width = out.shape[3]
        task_lines = out.shape[2] if unblock else 1
        line_ranges = (out_height + task_lines - 1) // task_lines  # per image and pair
        pairs = (filter_blocks + BROADCAST_VECTORS - 1) // BROADCAST_VECTORS
        image_len = blocks * height * width * lanes
        line_stride = stride_h * width * lanes
        out_vector_stride = out.shape[2] * out_width * lanes
        packed_flat = packed.reshape(-1)
        weight_flat = weight.reshape(-1)
        out_flat = out.reshape(-1)
        dst_flat = dst.reshape(-1)
        # slot_images[s]: the image that slot s holds; slot_images[S] > 0: a thread had no slot.
        # (The caller allocates them: arrays allocated here cost ~15 us per call.)
        prepacked = slot_images.size == 0
        if unblock and prepacked:
            raise ValueError("blocked_correlate: unblocking needs a slot per thread")
        if unblock and (dst.shape[0] != batch or dst.shape[1] > filter_blocks * lanes
                        or dst.shape[2] != out_height or dst.shape[3] != out_width
                        or out.shape[1] < BROADCAST_VECTORS or bias.shape[0] < dst.shape[1]):
            raise ValueError("blocked_correlate: dst or the output slots do not fit the sums")
        if check_bounds and build[0]:  # NUMBA_BOUNDSCHECK (build: in the cache key)
            _check_reads(packed_flat, offsets, (slots - 1) * image_len
                         + (out_height - 1) * line_stride, (out_width - 1) * lanes + 1)
        for task in prange(batch * pairs * line_ranges):
            if prepacked:  # pairs outermost: a thread's next tasks reuse the weights, in L2
                pair = np.int64(task) // (batch * line_ranges)
                n = (np.int64(task) - pair * batch * line_ranges) // line_ranges
                line_range = np.int64(task) - (pair * batch + n) * line_ranges
                image_start = n * image_len
            else:
                n = np.int64(task) // (pairs * line_ranges)
                pair = (np.int64(task) - n * pairs * line_ranges) // line_ranges
                line_range = np.int64(task) - (n * pairs + pair) * line_ranges
                slot = np.int64(get_thread_id())  # in [0, get_num_threads()): one writer each
                if slot >= slots or unblock and slot >= out.shape[0]:
                    slot_images[slots] = 1  # raised below: a raise in the loop would make it
                    continue                # serial
                image_start = image_in_slot(src, n, packed, slot_images, slot, pad_top,
                                            pad_left, column_phases)
            first_block = pair * BROADCAST_VECTORS
            vectors = min(BROADCAST_VECTORS, filter_blocks - first_block)
            first_line = line_range * task_lines
            lines = min(task_lines, out_height - first_line)
            if unblock:
                out_start = slot * BROADCAST_VECTORS * out_vector_stride
            else:
                out_start = ((n * filter_blocks + first_block) * out_height + first_line) \
                    * out_width * lanes
            for line in range(lines):
                i = first_line + line
                first_term = line_terms[i, 0]
                line_offsets = offsets[first_term:]
                j = 0
                for tile in range(pixel_tiles):
                    pixels = _tile_width(out_width, pixel_tiles, tile)
                    run_broadcast_tile(vectors, pixels, packed_flat,
                                       image_start + i * line_stride + j * lanes,
                                       line_offsets, weight_flat,
                                       (first_block * terms + first_term) * lanes,
                                       terms * lanes, out_flat,
                                       out_start + (line * out_width + j) * lanes,
                                       out_vector_stride, line_terms[i, 1])
                    j += pixels
            if unblock:
                for v in range(vectors):
                    first_output = (first_block + v) * lanes
                    unblock_run(out_flat, out_start + v * out_vector_stride, lines * out_width,
                                lanes, bias, first_output, dst.shape[1], dst_flat,
                                ((n * dst.shape[1] + first_output) * out_height + first_line)
                                * out_width, out_height * out_width)
        # (checked after the fact: numba.get_num_threads() would make the kernel uncacheable)
        if not prepacked and slot_images[slots] > 0:
            raise ValueError("blocked_correlate: fewer slots than threads")

    return correlate, correlate_grad_weight, blocked_grad_weight, blocked_correlate


correlate, correlate_grad_weight, blocked_grad_weight, blocked_correlate = _build_drivers(
    (CHECK_BOUNDS, SOURCE_FINGERPRINT, LAYOUT_DIGEST))
