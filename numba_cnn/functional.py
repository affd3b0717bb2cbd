"""The public operations: validate (via ``_args``), coerce dtype and layout, allocate, call kernels.

Conventions for every operation (see also the package README):
- NCHW layout; conv weights ``(F, C // groups, KH, KW)``; bias ``(F,)``.
- float32 and float64 are computed natively; mixed inputs follow NumPy promotion; float16 alone
  is computed and returned as float32; integer and bool inputs become float64.
- Inputs may be any array-like or non-contiguous view and are never modified; outputs are new
  C-contiguous arrays.
- Bad arguments raise ValueError / TypeError before any kernel runs.
"""
import functools

import numba
import numpy as np

from . import _args
from ._threads import threads_for
from ._conv_plan import (BlockedInputGradPlan, ChannelBlockedPlan, ForwardPlan, InputGradPlan,
                         aligned_empty, blocked_forward, blocked_input_gradient,
                         blocked_weight_gradient, correlation_blocking, pack_blocked)
from ._kernels.conv2d import (blocked_correlate, blocked_grad_weight, correlate,
                              correlate_grad_weight, ROW_TILE, TAP_TILE)
from ._kernels.elementwise import channel_sums
from ._kernels.layout import unblock_grad_weight, unblock_output, unpack_phases
from ._kernels.register_tile import BROADCAST_PIXELS, BROADCAST_VECTORS

# Pooling lives in its own module (validation section + ops); this is the public surface.
from ._pooling import (avg_pool2d, avg_pool2d_backward, global_avg_pool2d,  # noqa: E402
                       global_avg_pool2d_backward, max_pool2d, max_pool2d_backward)

__all__ = ["conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
           "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "global_avg_pool2d", "global_avg_pool2d_backward"]


def _coerce(arrays, op):
    """Convert the named arrays to one compute dtype, C-contiguous. Returns (dtype, arrays)."""
    converted = [None if a is None else _args.as_float_array(a, name, op) for name, a in arrays]
    dtype = _args.result_dtype(*converted)
    return dtype, converted


def _contiguous(array, dtype):
    return None if array is None else np.ascontiguousarray(array, dtype=dtype)


def _conv_work(geometry):
    """Multiply-adds of one pass (forward, input gradient or weight gradient) of a conv2d."""
    g = geometry
    return (g.batch * g.out_channels * g.out_height * g.out_width
            * (g.in_channels // g.groups) * g.kernel[0] * g.kernel[1])


def _threads_by_geometry(conv_pass):
    """Run ``conv_pass(..., geometry, ...)`` on as many threads as its work deserves
    (threads_for)."""
    @functools.wraps(conv_pass)
    def run(*arguments):
        geometry = next(a for a in arguments if isinstance(a, _args.ConvGeometry))
        with threads_for(_conv_work(geometry)):
            return conv_pass(*arguments)
    return run


def _rows_per_tile(rows_per_group):
    """``correlate``'s row tiles: 4 rows, or single rows when a group's rows are not a
    multiple of 4."""
    return ROW_TILE if rows_per_group % ROW_TILE == 0 else 1


@functools.lru_cache(maxsize=256)
def _grid_correlation(plan, block_shapes, image_stride, matrix_shape, itemsize, batch, threads):
    """(tap_blocks, tiles_per_task, slot_shape) of a ``correlate`` call of ``plan`` with a
    ``matrix_shape`` (rows, taps) weight matrix, on a grid of images ``image_stride`` elements
    apart, over ``batch`` images on ``threads`` threads: each phase's tap block
    (``correlation_blocking``, ``block_shapes`` describing the phases' taps), as an int64
    array; the tiles of rows per task; and the shape of the unpacking scratch, (threads, rows
    per task, row length), a task's rows per thread, or None where that would be more than the
    whole output grid (fewer tasks than threads).

    Memoised: training repeats the same calls, and working these out took about 5 us of a
    small layer's call (a sixtieth of mnist1's forward)."""
    rows, taps = matrix_shape
    rows_per_tile = _rows_per_tile(rows // plan.offsets.shape[0])
    starts = plan.phase_pixels.tolist()
    blockings = [correlation_blocking(block_shape, taps, image_stride * itemsize, stop - start,
                                      rows // rows_per_tile, batch, itemsize, lambda: threads)
                 for block_shape, start, stop in zip(block_shapes, starts, starts[1:])]
    tap_blocks = np.array([tap_block for tap_block, _ in blockings], dtype=np.int64)
    tiles_per_task = min(tiles for _, tiles in blockings)
    task_rows = tiles_per_task * rows_per_tile
    slot_shape = (None if threads * task_rows > rows * batch
                  else (threads, task_rows, starts[-1]))
    return tap_blocks, tiles_per_task, slot_shape


def _bias_gradient(grad_out):
    """The bias gradient (F,): ``grad_out`` (N, F, OH, OW), C-contiguous, summed over N, OH
    and OW (``elementwise.channel_sums``), in its dtype."""
    grad_bias = np.empty(grad_out.shape[1], grad_out.dtype)
    with threads_for(grad_out.size):
        channel_sums(grad_out, grad_bias)
    return grad_bias


def _bias_values(bias, channels, dtype):
    """The per-channel values the unpacking kernels add: ``bias``, or zeros without one."""
    return np.zeros(channels, dtype) if bias is None else bias


@_threads_by_geometry
def _conv2d_forward(x, weight, bias, geometry, grid=None):
    """Forward convolution of validated, contiguous, same-dtype arrays; ``grid`` is x packed by
    the plan's ``pack_input``, if the caller has it (then the forward runs on it)."""
    if grid is None and blocked_forward(geometry, x.dtype.itemsize):
        return _blocked_forward(x, weight, bias, geometry)
    plan = ForwardPlan.for_geometry(geometry)
    if grid is None and not plan.packs_per_task:
        grid = plan.pack_input(x)
    y = np.empty(geometry.output_shape, dtype=x.dtype)
    _correlate_grid_into(grid, x, plan, plan.weight_matrix(weight), [plan.block_shape],
                         _bias_values(bias, geometry.out_channels, x.dtype), y)
    return y


def _correlate_grid_into(grid, src, plan, matrix, block_shapes, bias, dst):
    """Run ``correlate`` with ``plan``'s offsets and phases (a ``ForwardPlan`` or an
    ``InputGradPlan``) for all of ``dst`` (N, F, H, W), its sums unpacked by the plan's crops
    plus ``bias``: by its own tasks from output slots,
    or, where a task per thread would take more memory than the whole output grid (fewer tasks
    than threads), through the grid and ``unpack_phases``. It reads ``grid``, packed; or, if
    that is None, ``src`` as the plan's ``pack_source`` packs it, which the tasks pack
    image by image into a slot of their thread (with output slots). ``block_shapes``: each
    phase's ``correlation_blocking`` description of its taps."""
    batch, outputs = dst.shape[:2]
    rows = matrix.shape[0]
    groups = plan.offsets.shape[0]
    rows_per_group = rows // groups
    image_stride = plan.grid_image_stride() if grid is None else grid.image_stride
    tap_blocks, tiles_per_task, slot_shape = _grid_correlation(
        plan, tuple(block_shapes), image_stride, matrix.shape, matrix.itemsize, batch,
        numba.get_num_threads())
    arguments = (plan.offsets, plan.phase_taps, matrix)
    unpacking = (plan.phase_pixels, tap_blocks, tiles_per_task)
    slots = None if slot_shape is None else aligned_empty(slot_shape, dst.dtype)
    if slots is not None and grid is None:  # packed by the tasks
        threads = slots.shape[0]
        room = plan.grid_slots(threads, dst.dtype)
        correlate(room.data, room.image_stride, *arguments, slots, *unpacking, True, bias, dst,
                  plan.crops, src, np.full(threads + 1, -1, dtype=np.int64), plan.packing)
        return
    grid = plan.pack_source(src) if grid is None else grid
    assert grid.zero_offset == plan.zero_offset  # the offsets' padding taps read zeros
    no_packing = (_NO_DST[dst.dtype.type], _NOT_PACKED, _NO_PACKING)
    if slots is not None:
        correlate(grid.data, grid.image_stride, *arguments, slots, *unpacking, True, bias, dst,
                  plan.crops, *no_packing)
        return
    row_len = int(plan.phase_pixels[-1])
    out_grid = aligned_empty((rows, batch, row_len), dst.dtype)
    correlate(grid.data, grid.image_stride, *arguments, out_grid, *unpacking, False, bias,
              _NO_DST[dst.dtype.type], plan.crops, *no_packing)
    del grid  # (if the caller does not hold it)
    unpack_phases(out_grid.reshape(-1), row_len, plan.crops, outputs // groups, rows_per_group,
                  bias, dst)


def _blocked_forward(x, weight, bias, geometry):
    """``_conv2d_forward`` on the channel-blocked layout (``ChannelBlockedPlan``)."""
    plan = ChannelBlockedPlan.for_geometry(geometry, x.dtype.itemsize)
    matrix, weight_finite = plan.forward_weights(weight)
    packed, slot_images = _blocked_source(x, True, plan.blocks, geometry.padded_height,
                                          plan.packed_width, geometry.pad[0],
                                          geometry.pad[2], plan.lanes)
    # Leaving out the terms that read padding rows would leave out their 0 * inf = NaN too: with
    # a NaN or inf weight every line sums all its terms, so that NaN spreads as in PyTorch.
    line_terms = plan.line_terms
    if plan.skips_padding and not weight_finite:
        line_terms = plan.all_line_terms
    y = np.empty(geometry.output_shape, dtype=x.dtype)
    _correlate_into(x, geometry.pad[0], geometry.pad[2], plan.column_phases, packed,
                    slot_images, plan.term_offsets, line_terms, matrix,
                    _bias_values(bias, geometry.out_channels, x.dtype), y, geometry.stride[0],
                    plan.pixel_tiles)
    return y


def _correlate_into(src, pad_top, pad_left, column_phases, packed, slot_images, term_offsets,
                    line_terms, matrix, bias, dst, stride_h, pixel_tiles):
    """Run ``blocked_correlate`` for all of ``dst`` (N, O, OH, OW), its sums plus
    ``bias``: written by its own tasks from output slots, or, where a line per thread would
    take more memory than the whole blocked output (few, very wide lines and many threads: a
    (1, 64, 1, 16000) signal on 64 threads would need 131 MB of slots for a 4 MB output), into
    a blocked output unblocked afterwards."""
    batch, _, out_height, out_width = dst.shape
    out_blocks, _, lanes = matrix.shape
    slots = _output_slots(batch, out_blocks, out_height, out_width, lanes, dst.dtype)
    if slots is not None:
        blocked_correlate(src, pad_top, pad_left, column_phases, packed, slot_images,
                          term_offsets, line_terms, matrix, slots, True, bias, dst, stride_h,
                          pixel_tiles)
        return
    out = aligned_empty((batch, out_blocks, out_height, out_width, lanes), dst.dtype)
    blocked_correlate(src, pad_top, pad_left, column_phases, packed, slot_images, term_offsets,
                      line_terms, matrix, out, False, bias, _NO_DST[dst.dtype.type], stride_h,
                      pixel_tiles)
    unblock_output(out, bias, dst, 0, 0, 1, 1)


# Output lines per task of an unblocking blocked_correlate: up to this many bytes of output
# per thread (they stay in L2 beside the packed image until they are written out), and fewer
# where that leaves fewer than TASKS_PER_THREAD tasks per thread.
OUTPUT_SLOT_BYTES = 256 * 1024
TASKS_PER_THREAD = 4


def _output_slots(batch, out_blocks, out_height, out_width, lanes, dtype):
    """An unblocking ``blocked_correlate``'s scratch: (threads, BROADCAST_VECTORS, lines,
    out_width, lanes), some lines of a pair of output blocks per thread; None where that is
    larger than the whole blocked output."""
    threads = numba.get_num_threads()
    line_bytes = BROADCAST_VECTORS * out_width * lanes * dtype.itemsize
    line_items = batch * -(-out_blocks // BROADCAST_VECTORS) * out_height
    lines = max(1, min(out_height, OUTPUT_SLOT_BYTES // line_bytes,
                       line_items // (TASKS_PER_THREAD * threads)))
    if threads * BROADCAST_VECTORS * lines > batch * out_blocks * out_height:
        return None
    return aligned_empty((threads, BROADCAST_VECTORS, lines, out_width, lanes), dtype)


def _blocked_input_gradient(grad_out, weight, bias, geometry):
    """``_conv2d_grad_input`` on the channel-blocked layout (``BlockedInputGradPlan``)."""
    plan = BlockedInputGradPlan.for_geometry(geometry, grad_out.dtype.itemsize)
    dtype = grad_out.dtype
    # One phase packs image by image as it goes. Several share one packed copy: packing again
    # for every phase was slower (strided input gradients, 1.04-1.09x on res28, res14 and 512
    # channels at 14x14, 1.14-1.21x on 64 channels at 14x14 and mnist2's 32).
    packed, slot_images = _blocked_source(grad_out, len(plan.phases) <= 1, plan.blocks,
                                          plan.padded_height, plan.padded_width, plan.pad_top,
                                          plan.pad_left, plan.lanes)
    bias_values = _bias_values(bias, geometry.in_channels, dtype)
    tiles = [-(-phase.columns // BROADCAST_PIXELS) for phase in plan.phases]
    if len(plan.phases) == 1 and _writes_all(plan.phases[0], geometry):
        (phase,) = plan.phases  # unblocked into grad_x by the correlation's tasks
        matrix = plan.phase_weights(weight, phase.taps_h, phase.taps_w, phase.term_offsets.size)
        grad_x = np.empty(geometry.input_shape, dtype=dtype)
        _correlate_into(grad_out, plan.pad_top, plan.pad_left, 1, packed,
                        slot_images, phase.term_offsets, phase.line_terms, matrix, bias_values,
                        grad_x, 1, tiles[0])
        return grad_x
    # Several phases' results are together as large as grad_x. Where grad_x is larger than the
    # weight, each is written into grad_x before the next phase is computed: holding them all
    # set the backward's memory peak (res28 s2 1.29x of its arrays, 1.16x this way), at 2-7%
    # of this pass (the packed gradient is read again from L3 after each unblocking).
    # Elsewhere the weight gradient's weight-sized buffers set that peak anyway, and all phases
    # are computed first (res14 s2: 2-6% faster).
    write_each_phase = np.prod(geometry.input_shape) * dtype.itemsize > weight.nbytes
    pending = []  # (phase, its result) not yet in grad_x
    grad_x = None
    last = len(plan.phases) - 1
    for index, phase in enumerate(plan.phases):
        matrix = plan.phase_weights(weight, phase.taps_h, phase.taps_w, phase.term_offsets.size)
        out = aligned_empty((geometry.batch, plan.channel_blocks, phase.rows, phase.columns,
                             plan.lanes), dtype)
        blocked_correlate(grad_out, plan.pad_top, plan.pad_left, 1, packed, slot_images,
                          phase.term_offsets, phase.line_terms, matrix, out, False,
                          bias_values, _NO_DST[dtype.type], 1, tiles[index])
        pending.append((phase, out))
        del matrix, out
        if index < last and not write_each_phase:
            continue
        if index == last:
            del packed  # freed before grad_x exists, where grad_x is made last
        if grad_x is None:
            grad_x = _bias_filled(geometry.input_shape, bias_values, plan.complete)
        while pending:
            done, out = pending.pop(0)
            unblock_output(out, bias_values, grad_x, done.first_row, done.first_column,
                           *geometry.stride)
            del out
    if grad_x is None:  # no phase has both taps and positions in x
        grad_x = _bias_filled(geometry.input_shape, bias_values, plan.complete)
    return grad_x


def _writes_all(phase, geometry):
    """Whether a ``BlockedPhase`` is all of the input gradient (not every stride-th position)."""
    return ((phase.first_row, phase.first_column, phase.rows, phase.columns)
            == (0, 0, geometry.height, geometry.width))


# blocked_correlate's dst when it does not unblock
_NO_DST = {dtype: np.empty((0, 0, 0, 0), dtype) for dtype in (np.float32, np.float64)}
# correlate's slot_images and packing where it reads a packed grid
_NOT_PACKED = np.empty(0, dtype=np.int64)
_NO_PACKING = (0,) * 6


def _bias_filled(shape, bias_values, complete):
    """A new (N, C, H, W) input gradient: uninitialised if the phases write all of it
    (``complete``), else filled with each channel's bias, what positions no tap reaches hold."""
    grad_x = np.empty(shape, dtype=bias_values.dtype)
    if not complete:
        grad_x[...] = bias_values[:, None, None]
    return grad_x


def _blocked_source(src, per_thread, blocks, padded_height, padded_width, pad_top, pad_left,
                    lanes):
    """(packed, slot_images) for ``blocked_correlate`` and ``blocked_grad_weight`` reading
    ``src`` (N, C, H, W) in the channel-blocked layout, padded to (padded_height,
    padded_width) from (pad_top, pad_left): if ``per_thread``, a slot per thread for the
    kernel to pack images into as it goes, with the slots' bookkeeping; else all of src
    packed now, with no bookkeeping (size 0: "prepacked")."""
    if not per_thread:
        return (pack_blocked(src, blocks, padded_height, padded_width, pad_top, pad_left, lanes),
                np.empty(0, dtype=np.int64))
    threads = numba.get_num_threads()
    return (aligned_empty((threads, blocks, padded_height, padded_width, lanes), src.dtype),
            np.full(threads + 1, -1, dtype=np.int64))


@_threads_by_geometry
def _conv2d_grad_input(grad_out, weight, bias, geometry):
    """Gradient of the convolution with respect to its input, shape ``geometry.input_shape``,
    plus ``bias`` (C,) per channel if given (the transposed convolution's bias)."""
    if blocked_input_gradient(geometry, grad_out.dtype.itemsize):
        return _blocked_input_gradient(grad_out, weight, bias, geometry)
    plan = InputGradPlan.for_geometry(geometry)
    # every position of grad_x is written (the bias alone where a phase has no taps)
    grad_x = np.empty(geometry.input_shape, dtype=grad_out.dtype)
    _correlate_grid_into(None, grad_out, plan, plan.weight_matrix(weight), plan.block_shapes,
                         _bias_values(bias, geometry.in_channels, grad_out.dtype), grad_x)
    return grad_x


# The grid weight gradient packs copies of x and of its output gradient (with spare columns).
# Where copies of the whole batch would be more than GRID_COPY_SHARE of the bytes of a forward +
# backward's arrays (x, y, W and their gradients: twice the pass's inputs and output), it packs
# and reduces the batch in as few parts as keep each part's copies within that: on layers with
# few input channels, small inputs against their output gradient, the copies were the
# backward's memory peak (mnist1 1.62x, z2dl 1.77x, stem7 1.54x of the arrays, against the
# 1.25x of issue 7). A part costs kernel launches (20-50 us each, waking the threads), so no
# more parts than that, and x is packed whole where its grid takes at most half of the
# allowance (few channels), leaving two launches per part.
GRID_COPY_SHARE = 0.2


def _batch_parts(batch, packed_image_bytes, allowance):
    """[(first, stop)] image ranges covering the batch, as few as keep the packed copies of a
    range (``packed_image_bytes`` per image) within ``allowance`` bytes."""
    parts = -(-batch * packed_image_bytes // max(1, int(allowance)))
    images = -(-batch // max(1, parts))
    return [(first, min(first + images, batch)) for first in range(0, batch, images)]


@_threads_by_geometry
def _conv2d_grad_weight(grad_out, x, geometry, grid=None):
    """Gradient of the convolution with respect to its weight, shape ``geometry.weight_shape``;
    ``grid`` is x packed by the forward plan's ``pack_input``, if the caller has it (used
    only off the channel-blocked path)."""
    if blocked_weight_gradient(geometry, x.dtype.itemsize):
        return _channel_blocked_grad_weight(grad_out, x, geometry)
    plan = ForwardPlan.for_geometry(geometry)
    offsets = plan.reduce_offsets
    rows, taps = geometry.groups * plan.filters_padded, offsets.shape[1]
    row_tiles = rows // ROW_TILE
    # Few taps per input plane (strided or small kernels) mean few FMAs per input byte
    # streamed: then a task takes several row tiles, which reuse each input block from cache.
    # (Same-process A/B: 16x64x32x32 4x4 s2 and res28 stride 2 up to 15% faster with 8; 3x3
    # stride 1 layers 0-5% slower, so they keep one.)
    sh, sw = geometry.stride
    taps_per_plane = geometry.kernel[0] * geometry.kernel[1] / (sh * sw)
    tiles_per_task = min(row_tiles, 8 if taps_per_plane < 9 else 1)
    # enough independent tasks for the threads, each still reducing over whole tap tiles
    tap_splits = max(1, min(taps // TAP_TILE, -(-16 // -(-row_tiles // tiles_per_task))))
    # Pixels per reduction block: its gradient rows stay in cache across the tap tiles, and
    # smaller blocks pay the tiles' lane sums more often. 2048 is best on 3x3 stride-1 layers
    # and dcgan's 4x4 stride 2 (4 taps per input plane), 1024 on 3x3 stride-2 layers (2.25):
    # same-process A/B, res28 s2 and res56 s2 3-5% faster, res14 and res28 4-6% slower.
    pixel_block = 1024 if taps_per_plane < 3 else 2048
    weight_bytes = x.dtype.itemsize * int(np.prod(geometry.weight_shape))
    allowance = GRID_COPY_SHARE * 2 * (grad_out.nbytes + x.nbytes + weight_bytes)
    if grid is None:
        input_bytes = geometry.batch * (plan.packed_image_bytes(x.dtype.itemsize, True)
                                        - plan.packed_image_bytes(x.dtype.itemsize, False))
        if input_bytes <= allowance / 2:
            grid = plan.pack_input(x)
            allowance -= input_bytes
    parts = _batch_parts(geometry.batch, plan.packed_image_bytes(x.dtype.itemsize, grid is None),
                         allowance)
    grad_matrix = np.empty((rows, taps), dtype=grad_out.dtype)
    part_matrix = room = None
    if len(parts) > 1:
        part_matrix = np.empty_like(grad_matrix)
        room = aligned_empty((rows * (parts[0][1] - parts[0][0]) * plan.out_len,),
                             grad_out.dtype)
    for first, stop in parts:
        part_grid = plan.pack_input(x[first:stop]) if grid is None else grid
        assert part_grid.zero_offset == plan.zero_offset  # the padding taps read zeros
        src = part_grid.data if grid is None else grid.images(first, stop)
        target = grad_matrix if first == 0 else part_matrix
        correlate_grad_weight(src, part_grid.image_stride, offsets, plan.reduce_columns,
                              plan.pack_grad_output(grad_out[first:stop], room), target,
                              pixel_block, tiles_per_task, tap_splits)
        del part_grid, src  # before the next part's
        if first > 0:
            grad_matrix += part_matrix  # the parts' sums, in order
    per_group = grad_matrix.reshape(geometry.groups, plan.filters_padded, taps)
    kernel_taps = plan.channels_per_group * geometry.kernel[0] * geometry.kernel[1]
    grad_weight = per_group[:, :plan.filters_per_group, :kernel_taps]
    return np.ascontiguousarray(grad_weight.reshape(geometry.weight_shape))


def _channel_blocked_grad_weight(grad_out, x, geometry):
    """``_conv2d_grad_weight`` on the channel-blocked input (``ChannelBlockedPlan``)."""
    plan = ChannelBlockedPlan.for_geometry(geometry, x.dtype.itemsize)
    parts = plan.batch_parts
    # with two parts each thread packs the images of its part; with one, all threads read all
    packed, slot_images = _blocked_source(x, parts > 1, plan.blocks, geometry.padded_height,
                                          geometry.padded_width, geometry.pad[0],
                                          geometry.pad[2], plan.lanes)
    partials = aligned_empty((parts, geometry.out_channels, plan.offsets.size, plan.lanes),
                             x.dtype)
    threads = numba.get_num_threads()
    blocked_grad_weight(x, geometry.pad[0], geometry.pad[2], packed, slot_images, plan.offsets,
                        grad_out, partials, *geometry.stride, plan.block_lines,
                        *plan.splits(max(1, threads // parts)))
    del packed  # freed before grad_weight exists
    # in the partials' place where a filter's rows take the same room in both layouts (with two
    # parts, the returned gradient would keep both alive)
    if parts == 1 and partials.size == int(np.prod(geometry.weight_shape)):
        grad_weight = partials[0].reshape(geometry.weight_shape)
    else:
        grad_weight = np.empty(geometry.weight_shape, dtype=x.dtype)
    unblock_grad_weight(partials, grad_weight,
                        np.empty((threads, partials.shape[2] * partials.shape[3]), x.dtype))
    return grad_weight


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation, as in PyTorch) of ``x`` with ``weight``.

    Args:
        x: (N, C, H, W) input.
        weight: (F, C // groups, KH, KW) filters.
        bias: optional (F,) added to every output pixel of a channel.
        stride, dilation: int or (h, w), >= 1.
        padding: int or (h, w) >= 0 zero padding on both sides, or "valid" (no padding) or
            "same" (output H, W equal the input's; stride 1 only; when the dilated kernel extent
            is even the extra row/column is padded at the bottom/right, as PyTorch does).
        groups: input and output channels are split into ``groups`` independent convolutions;
            ``groups == C`` is a depthwise convolution (F = C * multiplier).

    Returns:
        y: (N, F, H_out, W_out) with
        ``H_out = floor((H + pad_top + pad_bottom - dilation_h * (KH - 1) - 1) / stride_h) + 1``
        (and the same for W), in the promoted dtype of x, weight and bias.

    Example:
        >>> y = conv2d(np.ones((1, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float32),
        ...            padding="same")
        >>> y.shape
        (1, 4, 8, 8)
    """
    op = "conv2d"
    dtype, (x, weight, bias) = _coerce([("x", x), ("weight", weight), ("bias", bias)], op)
    _args.check_ndim(x, 4, "x", op, "(N, C, H, W)")
    _args.check_ndim(weight, 4, "weight", op, "(F, C // groups, KH, KW)")
    geometry = _args.conv2d_geometry(x.shape, weight.shape, stride, padding, dilation, groups, op)
    bias = _args.check_bias(bias, geometry.out_channels, op)
    if geometry.batch == 0:
        return np.zeros(geometry.output_shape, dtype=dtype)
    return _conv2d_forward(_contiguous(x, dtype), _contiguous(weight, dtype),
                           _contiguous(bias, dtype), geometry)


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1,
                    need_bias=True):
    """Gradients of ``conv2d(x, weight, bias, stride, padding, dilation, groups)``.

    Args:
        grad_out: (N, F, H_out, W_out), the gradient of the loss with respect to the output.
        x, weight, stride, padding, dilation, groups: as given to ``conv2d``.
        need_bias: also return the bias gradient (``grad_out`` summed over N, H_out, W_out).

    Returns:
        (grad_x, grad_weight, grad_bias): shapes (N, C, H, W), (F, C // groups, KH, KW) and (F,),
        or None for grad_bias when ``need_bias`` is false; all in the promoted dtype of the inputs.
    """
    op = "conv2d_backward"
    dtype, (grad_out, x, weight) = _coerce(
        [("grad_out", grad_out), ("x", x), ("weight", weight)], op)
    _args.check_ndim(x, 4, "x", op, "(N, C, H, W)")
    _args.check_ndim(weight, 4, "weight", op, "(F, C // groups, KH, KW)")
    geometry = _args.conv2d_geometry(x.shape, weight.shape, stride, padding, dilation, groups, op)
    _args.check_shape(grad_out, geometry.output_shape, "grad_out", op)
    grad_out = _contiguous(grad_out, dtype)
    grad_bias = _bias_gradient(grad_out) if need_bias else None
    if geometry.batch == 0:
        return (np.zeros(geometry.input_shape, dtype), np.zeros(geometry.weight_shape, dtype),
                grad_bias)
    x = _contiguous(x, dtype)
    weight = _contiguous(weight, dtype)
    grad_x = _conv2d_grad_input(grad_out, weight, None, geometry)
    grad_weight = _conv2d_grad_weight(grad_out, x, geometry)
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Transposed convolution: the adjoint of conv2d, built on the conv2d internals above
# ---------------------------------------------------------------------------------------------

def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """2-D transposed convolution ("deconvolution", PyTorch ``conv_transpose2d`` semantics).

    It is the adjoint (the input gradient) of ``conv2d`` with the same weight and
    hyper-parameters: every input pixel ``x[n, c, i, j]`` scatters ``x * weight[c, f, kh, kw]``
    to output ``(i * stride_h - pad_h + kh * dil_h, j * stride_w - pad_w + kw * dil_w)``.
    Computed with the conv2d input-gradient kernels, one stride phase at a time (no
    zero-inserted input).

    Args:
        x: (N, C_in, H, W) input.
        weight: (C_in, C_out // groups, KH, KW), PyTorch's layout for transposed convolution.
        bias: optional (C_out,) added to every output pixel of a channel.
        stride, dilation: int or (h, w), >= 1.
        padding: int or (h, w) >= 0, rows/columns cropped from both sides of the full
            (unpadded) transposed convolution; it undoes the same padding of the matching
            ``conv2d``. Strings ("same", "valid") are not accepted (TypeError), as in PyTorch.
        output_padding: int or (h, w) >= 0, extra rows/columns added at the bottom/right of the
            output; per axis it must be smaller than the stride or the dilation (PyTorch's rule).
            It resolves the ambiguity of output sizes for stride > 1.
        groups: input and output channels are split into ``groups`` independent transposed
            convolutions; C_in must be divisible by ``groups``, C_out = weight.shape[1] * groups.

    Returns:
        y: (N, C_out, H_out, W_out) with
        ``H_out = (H - 1) * stride_h - 2 * pad_h + dil_h * (KH - 1) + output_padding_h + 1``
        (and the same for W), in the promoted dtype of x, weight and bias.

    Example:
        >>> y = conv_transpose2d(np.ones((1, 4, 8, 8), np.float32),
        ...                      np.ones((4, 3, 3, 3), np.float32), stride=2, padding=1,
        ...                      output_padding=1)
        >>> y.shape
        (1, 3, 16, 16)
    """
    op = "conv_transpose2d"
    dtype, (x, weight, bias) = _coerce([("x", x), ("weight", weight), ("bias", bias)], op)
    _args.check_ndim(x, 4, "x", op, "(N, C_in, H, W)")
    _args.check_ndim(weight, 4, "weight", op, "(C_in, C_out // groups, KH, KW)")
    geometry = _args.conv_transpose2d_geometry(x.shape, weight.shape, stride, padding,
                                               output_padding, dilation, groups, op)
    bias = _args.check_bias(bias, geometry.out_channels, op)
    if geometry.batch == 0:
        return np.zeros(geometry.output_shape, dtype=dtype)
    # y = A^T x, A the conv2d (input y-shaped, filters = weight) whose geometry is .conv
    return _conv2d_grad_input(_contiguous(x, dtype), _contiguous(weight, dtype),
                              _contiguous(bias, dtype), geometry.conv)


def conv_transpose2d_backward(grad_out, x, weight, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1, need_bias=True):
    """Gradients of ``conv_transpose2d(x, weight, bias, stride, padding, output_padding,
    groups, dilation)``.

    Args:
        grad_out: (N, C_out, H_out, W_out), the gradient of the loss with respect to the output.
        x, weight, stride, padding, output_padding, groups, dilation: as given to
            ``conv_transpose2d``.
        need_bias: also return the bias gradient (``grad_out`` summed over N, H_out, W_out).

    Returns:
        (grad_x, grad_weight, grad_bias): shapes (N, C_in, H, W), (C_in, C_out // groups, KH, KW)
        and (C_out,), or None for grad_bias when ``need_bias`` is false; all in the promoted
        dtype of the inputs. ``grad_x`` is ``conv2d(grad_out, weight, stride, padding,
        dilation, groups)`` (cut to x's size when output_padding >= stride).
    """
    op = "conv_transpose2d_backward"
    dtype, (grad_out, x, weight) = _coerce(
        [("grad_out", grad_out), ("x", x), ("weight", weight)], op)
    _args.check_ndim(x, 4, "x", op, "(N, C_in, H, W)")
    _args.check_ndim(weight, 4, "weight", op, "(C_in, C_out // groups, KH, KW)")
    geometry = _args.conv_transpose2d_geometry(x.shape, weight.shape, stride, padding,
                                               output_padding, dilation, groups, op)
    _args.check_shape(grad_out, geometry.output_shape, "grad_out", op)
    grad_out = _contiguous(grad_out, dtype)
    grad_bias = _bias_gradient(grad_out) if need_bias else None
    if geometry.batch == 0:
        return (np.zeros(geometry.input_shape, dtype), np.zeros(geometry.weight_shape, dtype),
                grad_bias)
    x = _contiguous(x, dtype)
    weight = _contiguous(weight, dtype)
    # With A the conv2d of geometry.conv (y = A^T x): grad_x = A grad_out, and
    # <grad_out, A_W^T x> = <A_W grad_out, x> makes grad_weight the conv2d weight gradient of
    # input grad_out against output gradient x. Off the channel-blocked path both read
    # grad_out packed the same way, so it is packed once.
    grid = None
    if not blocked_weight_gradient(geometry.conv, dtype.itemsize):
        with threads_for(_conv_work(geometry.conv)):
            grid = ForwardPlan.for_geometry(geometry.conv).pack_input(grad_out)
    grad_x = _conv2d_forward(grad_out, weight, None, geometry.conv, grid)
    grad_weight = _conv2d_grad_weight(x, grad_out, geometry.conv, grid)
    return grad_x, grad_weight, grad_bias
