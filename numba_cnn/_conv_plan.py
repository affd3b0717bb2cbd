"""Tap offsets, weight matrices and buffers that map a convolution onto the kernels, and the
rules that choose, per pass, between the two layouts: the flat pixel grid (``ForwardPlan``,
``InputGradPlan``) and the channel-blocked layout (``ChannelBlockedPlan``,
``BlockedInputGradPlan``).

Pure NumPy and arithmetic (the kernels are called only to pack and gather): this is where the
index bookkeeping of strides, dilation, padding and groups lives, so the kernels in
``_kernels/conv2d.py`` only ever see "rows, taps, offsets". See that module's docstring for the
primitives being targeted.
"""
import collections
import functools

import numpy as np

from ._kernels.conv2d import ROW_TILE, TAP_TILE
from ._kernels.layout import (data_address, gather_blocked_weights, gather_phase_weights,
                             pack_channel_blocks, pack_phases)
from ._kernels.register_tile import BROADCAST_PIXELS, OUTER_TAPS, VECTOR_BYTES, VECTORS

# Correlation blocking (``correlate``'s tap_block and tiles_per_task). Kernel-alone sweeps of
# 8-48 KB tap blocks and 2-16 row tiles per task, against all taps with one row tile per task:
# 24 KB and 16 row tiles gave res56 s2 1.24x, res28 s2 1.17x, res56 1.09x, dcgan's stride-2
# backward 1.07x, res28 1.03x, and dcgan's phase correlations 1.06x. Blocking lost where an
# image row has few pixel tiles (res14 s2, 4 vectors: up to 13%) and on 3x3 stride-1 layers whose
# input grid stays in L2 (res14, 262 KB: 2-5%); those run unblocked.
BLOCKED_IMAGE_BYTES = 280 * 1024
# Input bytes that one tap block may read for one pixel tile: they stay in L1 (48 KB on the
# project machine) while every row tile of the task reuses them.
TAP_BLOCK_BYTES = 24 * 1024
ROW_TILES_PER_TASK = 16
# Input bytes per block of the channel-blocked weight gradient: one tap tile's input for the
# block stays in L1 while every row tile reuses it (see ChannelBlockedPlan).
BLOCKED_INPUT_BYTES = 32 * 1024
# The channel-blocked weight gradient sums each half of an even batch into a partial gradient of
# its own, with each thread packing and reading only its half's images (from its L2), when the
# packed input is at least this many times the size of a partial gradient: an input packed by
# all threads and read by all of them made the weight gradient 0.1-0.55 ms slower, while a
# second partial costs its zeroing and its sum. Same-process A/B of the weight gradient, two
# parts / one (input / partial bytes): res56 1.08 (47), res56 s2 1.30 (47), mnist2 1.07 (19),
# res28 1.03 and res28 s2 1.06 (6.2), 64 channels at 7x7 1.03 (4.5), odd5 1.01 (3.8), res14
# 0.89 and res14 s2 0.81 (0.9).
BATCH_PARTS_MIN_RATIO = 4


def correlation_blocking(block_shape, taps, image_bytes, out_len, row_tiles, batch, itemsize,
                         thread_count):
    """(tap_block, tiles_per_task) for ``correlate`` over ``taps`` taps described by
    ``block_shape`` = (taps per input channel, planes per channel, largest in-plane offset),
    on input images of ``image_bytes`` and output rows of ``out_len`` pixels; ``thread_count()``
    gives the number of threads (asked only when blocking: it costs a microsecond or two).

    Blocked, a tap block is as many whole channels as read TAP_BLOCK_BYTES for one pixel tile,
    and a task takes up to ROW_TILES_PER_TASK row tiles, leaving >= 4 tasks per thread.
    """
    taps_per_channel, planes_per_channel, extent = block_shape
    lanes = VECTOR_BYTES // itemsize
    few_tiles = out_len < 2 * VECTORS * lanes
    fits_l2 = taps_per_channel >= 9 * planes_per_channel and image_bytes < BLOCKED_IMAGE_BYTES
    if few_tiles or fits_l2:
        return taps, 1
    channel_bytes = planes_per_channel * (VECTORS * lanes + extent) * itemsize
    tap_block = max(1, TAP_BLOCK_BYTES // channel_bytes) * taps_per_channel
    tiles_per_task = max(1, min(ROW_TILES_PER_TASK, row_tiles * batch // (4 * thread_count())))
    return tap_block, tiles_per_task


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def aligned_empty(shape, dtype, alignment=64):
    """An uninitialised C-contiguous array whose data starts on a cache-line boundary.

    The kernels' partial sums are loaded and stored a full vector at a time; rows that start
    mid-cache-line make every 64-byte access a split access (res28 forward: 124 -> 178 GFLOP/s
    once the output grid was aligned).
    """
    dtype = np.dtype(dtype)
    count = 1
    for extent in shape:
        count *= int(extent)
    raw = np.empty(count * dtype.itemsize + alignment, dtype=np.uint8)
    start = -data_address(raw) % alignment
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


class Grid:
    """A packed grid buffer: planes of ``image_len`` pixels, one per (row, phase), for each image,
    in a flat 64-byte aligned ``data`` array: ``[n][row, phase, pixel]`` (filled by
    ``layout.pack_phases``), each image followed by a zero tail of ``read_span`` (+ 64)
    elements. An image starts at ``n * image_stride``; its padding taps read from offset
    ``zero_offset`` (relative to that start), and reads that run past its last plane land in its
    tail, so the kernels need no bounds checks. A task reads one image front to back (10-13%
    faster than a row-major ``[row, phase, n, pixel]`` layout on stride-2 layers, which read
    four phase planes per channel).
    """

    def __init__(self, rows, phases, batch, image_len, read_span, dtype):
        planes = rows * phases * image_len
        self.image_stride = Grid.image_stride_of(rows, phases, image_len, read_span)
        self.zero_offset = planes
        self.data = aligned_empty((batch * self.image_stride,), dtype)
        self.data.reshape(batch, self.image_stride)[:, planes:] = 0
        self.plane_strides = (phases * image_len, image_len, self.image_stride)
        self.rows = rows

    @staticmethod
    def image_stride_of(rows, phases, image_len, read_span):
        """Elements per image of a grid of ``rows`` x ``phases`` planes."""
        return round_up(rows * phases * image_len + read_span + 64, 16)

    def images(self, first, stop):
        """A view of images ``first`` to ``stop`` of ``data`` (with their tails)."""
        return self.data[first * self.image_stride:stop * self.image_stride]


def pack_grid(src, rows_per_group, rows_per_group_padded, groups, pad, stride, grid_shape,
              image_len, read_span):
    """Pack ``src`` (N, rows, H, W) into a new ``Grid`` with phases for ``stride``."""
    grid_h, grid_w = grid_shape
    grid = Grid(groups * rows_per_group_padded, stride[0] * stride[1], src.shape[0], image_len,
                read_span, src.dtype)
    pack_phases(src, grid.data, grid.rows, grid.plane_strides, rows_per_group,
                rows_per_group_padded, pad[0], pad[1], stride[0], stride[1], grid_h, grid_w,
                image_len)
    return grid


def phase_crops(phase_table, phase_pixels, first_rows, grid_w, pads, shape):
    """``correlate``'s ``crops``: (K, 7) int64 rows (target, lines, columns, source, target
    line step, target column step, source line step), one per stride phase with positions in
    a (height, width) = ``shape`` plane, that write what ``layout.unpack_phases`` writes from
    an output row of the phases' grids (source -1: a phase without taps, the bias alone)."""
    (stride_h, stride_w), (pad_top, pad_left), (height, width) = phase_table.shape, pads, shape
    crops = []
    for a in range(stride_h):
        # the rows ih = i * sh + a - pad_top inside [0, height): first i, and count
        i0 = -(-(pad_top - a) // stride_h)
        ih0 = i0 * stride_h + a - pad_top
        lines = max(0, -(-(height - ih0) // stride_h))
        for b in range(stride_w):
            j0 = -(-(pad_left - b) // stride_w)
            iw0 = j0 * stride_w + b - pad_left
            columns = max(0, -(-(width - iw0) // stride_w))
            phase = phase_table[a, b]
            source = -1
            if phase >= 0:
                source = phase_pixels[phase] + (i0 - first_rows[phase]) * grid_w + j0
            if lines and columns:
                crops.append((ih0 * width + iw0, lines, columns, source, stride_h * width,
                              stride_w, grid_w))
    return np.array(crops, dtype=np.int64).reshape(-1, 7)


def pad_offsets(offsets, zero_offset):
    """Pad the tap axis of ``offsets`` (G, K) to a multiple of TAP_TILE with taps that read the
    grid's zero region."""
    taps = offsets.shape[1]
    padded = np.full((offsets.shape[0], round_up(max(taps, 1), TAP_TILE)), zero_offset,
                     dtype=np.int64)
    padded[:, :taps] = offsets
    return padded


def padded_rows(rows):
    """Rows per group as the correlation kernels see them: a multiple of ROW_TILE, except
    below ROW_TILE, where ``correlate`` runs one row per task."""
    return rows if rows < ROW_TILE else round_up(rows, ROW_TILE)


class _OnePhasePacking:
    """``functional._correlate_grid_into``'s view of a plan whose source (its ``pack_source``)
    ``correlate``'s tasks can pack image by image into one-phase grids
    (``layout.pack_grid_image``): ``packed_rows`` rows, ``packed_pads`` (top, left) zero lines
    and columns in front, in the plan's ``grid_h x grid_w`` planes of ``image_len``."""

    def grid_image_stride(self):
        """Elements per image of the packed source's grid."""
        return Grid.image_stride_of(self.packed_rows, 1, self.image_len, self.read_span)

    def grid_slots(self, threads, dtype):
        """Room for one image of the packed source's grid per thread, the tails zero: slots for
        ``correlate``'s per-thread packing."""
        return Grid(self.packed_rows, 1, threads, self.image_len, self.read_span, dtype)

    @property
    def packing(self):
        """``correlate``'s ``packing``: ``pack_source``'s, one image at a time."""
        return (self.packed_rows, *self.packed_pads, self.grid_h, self.grid_w, self.image_len)


class ForwardPlan(_OnePhasePacking):
    """Where each tap of a forward convolution reads in the packed input grid.

    Used for conv2d forward and weight gradient (and, with roles swapped, for transposed
    convolution). The input is split into ``stride`` phase planes of ``grid_h x grid_w`` pixels;
    output (oh, ow) of every image is grid pixel ``oh * grid_w + ow``.
    """

    def __init__(self, geometry):
        g = geometry
        self.geometry = g
        (sh, sw), (dh, dw) = g.stride, g.dilation
        kh_count, kw_count = g.kernel
        self.grid_h = -(-g.padded_height // sh)
        self.grid_w = -(-g.padded_width // sw)
        self.image_len = self.grid_h * self.grid_w
        # per-thread packing of x (_OnePhasePacking: stride 1 only, see packs_per_task)
        self.packed_rows, self.packed_pads = g.in_channels, (g.pad[0], g.pad[2])
        self.channels_per_group = g.in_channels // g.groups
        self.filters_per_group = g.out_channels // g.groups
        self.filters_padded = round_up(self.filters_per_group, ROW_TILE)
        # output pixels computed per image: whole grid rows, rounded to full vectors
        self.out_len = round_up(g.out_height * self.grid_w, 16)
        # correlate's and unpack_phases' description of the output grid: one phase, a crop
        self.phase_table = np.zeros((1, 1), dtype=np.int64)
        self.phase_pixels = np.array([0, self.out_len], dtype=np.int64)
        self.first_rows = np.zeros(1, dtype=np.int64)
        self.crops = phase_crops(self.phase_table, self.phase_pixels, self.first_rows,
                                 self.grid_w, (0, 0), (g.out_height, g.out_width))
        kh = np.arange(kh_count)[:, None]
        kw = np.arange(kw_count)[None, :]
        phase = ((kh * dh) % sh) * sw + (kw * dw) % sw
        in_plane = ((kh * dh) // sh) * self.grid_w + (kw * dw) // sw
        self.read_span = int(in_plane.max()) + self.out_len
        # tap_block's description of the taps: per channel, their planes and reach
        self.block_shape = (kh_count * kw_count, len(np.unique(phase)), int(in_plane.max()))
        channel = (np.arange(g.groups)[:, None] * self.channels_per_group
                   + np.arange(self.channels_per_group)[None, :])
        phases = sh * sw
        # plane index of every tap, offsets[group, (c, kh, kw)] = plane * plane_stride + in_plane
        tap_planes = (channel[:, :, None, None] * phases + phase[None, None]).reshape(g.groups, -1)
        tap_in_plane = np.broadcast_to(in_plane, (g.groups, self.channels_per_group)
                                       + in_plane.shape).reshape(g.groups, -1)
        self.zero_offset = g.in_channels * phases * self.image_len
        self.offsets = pad_offsets(tap_planes * self.image_len + tap_in_plane, self.zero_offset)
        # The forward correlates the real taps only: the padding taps (zero weights, reading
        # zeros) are there for the weight gradient's tap tiles. A single-channel 3x3 layer has
        # 9 taps padded to 12, a third more work (mnist1's forward: 1.2x faster without them).
        self.phase_taps = np.array([0, tap_planes.shape[1]], dtype=np.int64)
        # The weight-gradient reduction reads the same positions with its taps sorted by read
        # position: with strides, the (c, kh, kw) order alternates between phase planes, while
        # sorted, a tile's taps share planes and so cache lines (dcgan's weight gradient 16%,
        # res28 stride 2 10% faster). reduce_columns[k] is the grad_weight column of sorted
        # tap k (the padding taps stay last).
        # (Group 0's order sorts every group: a group's taps are group 0's shifted by whole
        # channel planes, and the padding taps, at zero_offset, lie above all of them.)
        self.reduce_columns = np.argsort(self.offsets[0], kind="stable")
        self.reduce_offsets = np.ascontiguousarray(self.offsets[:, self.reduce_columns])
        assert (np.diff(self.reduce_offsets, axis=1) >= 0).all()

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def for_geometry(geometry):
        """The plan for ``geometry``, built once: training repeats the same shapes."""
        return ForwardPlan(geometry)

    def pack_input(self, x):
        """The input grid that ``offsets`` and ``reduce_offsets`` read, of x or of a part of
        its batch."""
        g = self.geometry
        return pack_grid(x, g.in_channels, g.in_channels, 1, (g.pad[0], g.pad[2]), g.stride,
                         (self.grid_h, self.grid_w), self.image_len, self.read_span)

    pack_source = pack_input  # the name ``functional._correlate_grid_into`` packs with

    @property
    def packs_per_task(self):
        """Whether the forward's tasks can pack x image by image as ``pack_input`` packs it
        (``layout.pack_grid_image``: one stride phase)."""
        return self.geometry.stride == (1, 1)

    def packed_image_bytes(self, itemsize, input_grid):
        """Bytes per image that the weight gradient packs: the output gradient's grid, and the
        input grid if ``input_grid``."""
        g = self.geometry
        grad_bytes = g.groups * self.filters_padded * self.out_len * itemsize
        if not input_grid:
            return grad_bytes
        return grad_bytes + itemsize * Grid.image_stride_of(
            g.in_channels, g.stride[0] * g.stride[1], self.image_len, self.read_span)

    def weight_matrix(self, weight):
        """The (G * filters_padded, Kp) weight matrix of ``weight`` matching ``offsets``."""
        g = self.geometry
        taps, columns = weight[0].size, self.offsets.shape[1]
        if self.filters_padded == self.filters_per_group and columns == taps:
            return weight.reshape(g.out_channels, taps)  # no padding: the weight itself
        # one copy into a zeroed matrix: zero weights on padding taps and padding filters
        matrix = np.zeros((g.groups, self.filters_padded, columns), dtype=weight.dtype)
        matrix[:, :self.filters_per_group, :taps] = weight.reshape(
            g.groups, self.filters_per_group, taps)
        return matrix.reshape(g.groups * self.filters_padded, columns)

    def pack_grad_output(self, grad_out, room=None):
        """grad_out (N, F, OH, OW) -> (G * filters_padded, N, out_len), laid out as the forward's
        output grid (the positions the weight-gradient reduction pairs with the input grid),
        zero off the outputs; N may be a part of the batch. In ``room`` (flat, aligned) if
        given: a part after another reuses it (a new array per part page-faulted it in again,
        which on the project's VM cost up to 20 us per page)."""
        g = self.geometry
        rows, batch = g.groups * self.filters_padded, grad_out.shape[0]
        shape = (rows, batch, self.out_len)
        grid = (aligned_empty(shape, grad_out.dtype) if room is None
                else room[:rows * batch * self.out_len].reshape(shape))
        pack_phases(grad_out, grid.reshape(-1), rows, (batch * self.out_len, 0, self.out_len),
                    self.filters_per_group, self.filters_padded, 0, 0, 1, 1, g.out_height,
                    self.grid_w, self.out_len)
        return grid


class InputGradPlan(_OnePhasePacking):
    """Input gradient of a convolution as one stride-1 correlation per stride phase, all of
    them in one ``correlate`` call.

    Input position ``ih = i * sh + a`` (padded coordinates) receives gradient from the taps with
    ``kh * dh = a + m * sh`` (m >= 0), from output row ``i - m``. The output gradient is packed
    (by the correlation's tasks, image by image) into a grid with ``margin = ((K - 1) * d) // s``
    zero rows/columns in front, so every such read is a non-negative constant offset; each phase
    (a, b) then is a correlation with its own tap subset, never touching the zeros a
    zero-inserted ("dilated") gradient would have.
    """

    def __init__(self, geometry):
        g = geometry
        self.geometry = g
        (sh, sw), (dh, dw) = g.stride, g.dilation
        self.margin_h = ((g.kernel[0] - 1) * dh) // sh
        self.margin_w = ((g.kernel[1] - 1) * dw) // sw
        phase_rows = -(-g.padded_height // sh)
        self.grid_h = max(phase_rows, g.out_height) + self.margin_h
        # Columns: the grid must hold the gradient behind its margin (out_width + margin_w) and
        # a whole row of computed outputs must reach the last real input column (phase 0's
        # column ceil((W + pad_left) / sw) - 1). Reads past a row's end wrap into the next
        # row's margin, which is zero, so the right-hand padding columns need no room of their
        # own (res14: 16 columns computed per row instead of 18).
        last_input_cols = -(-(g.width + g.pad[2]) // sw)
        self.grid_w = max(last_input_cols, g.out_width + self.margin_w)
        self.image_len = self.grid_h * self.grid_w
        # per-thread packing of grad_out (_OnePhasePacking), behind its margins
        self.packed_rows, self.packed_pads = g.out_channels, (self.margin_h, self.margin_w)
        self.channels_per_group = g.in_channels // g.groups
        self.channels_padded = padded_rows(self.channels_per_group)
        self.filters_per_group = g.out_channels // g.groups
        self.read_span = self.margin_h * self.grid_w + self.margin_w + round_up(
            phase_rows * self.grid_w, 16)
        self.zero_offset = g.out_channels * self.image_len  # in the image-major grid
        self.phases = self._phase_taps()
        # one correlation of all phases: each output row holds the phases' grids one after
        # another (phase_pixels), their taps side by side (phase_taps), so that a task has all
        # of its rows' phases to write into dx: phase_table[a, b] is the index of phase (a, b),
        # -1 if it has no taps
        self.phase_table = np.full((sh, sw), -1, dtype=np.int64)
        for index, (phase_h, phase_w, *_) in enumerate(self.phases):
            self.phase_table[phase_h, phase_w] = index
        self.first_rows = np.array([phase[4] for phase in self.phases], dtype=np.int64)
        # each phase's pixels start on a cache line (its lengths are whole vectors)
        self.phase_pixels = np.cumsum([0] + [phase[5] for phase in self.phases]).astype(np.int64)
        self.offsets = np.concatenate([phase[6] for phase in self.phases], axis=1)
        self.phase_taps = np.cumsum([0] + [phase[6].shape[1] for phase in self.phases]).astype(
            np.int64)
        self.block_shapes = [phase[7] for phase in self.phases]
        self.crops = phase_crops(self.phase_table, self.phase_pixels, self.first_rows,
                                 self.grid_w, (g.pad[0], g.pad[2]), (g.height, g.width))

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def for_geometry(geometry):
        """The plan for ``geometry``, built once: training repeats the same shapes."""
        return InputGradPlan(geometry)

    def _phase_taps(self):
        """(phase_h, phase_w, taps_h, taps_w, first_row, out_len, offsets, block_shape) of
        every phase with taps; the phase's output grid starts at grid row ``first_row``;
        ``block_shape`` is ``tap_block``'s description of its taps."""
        g = self.geometry
        (sh, sw), (dh, dw) = g.stride, g.dilation
        filter_index = (np.arange(g.groups)[:, None] * self.filters_per_group
                        + np.arange(self.filters_per_group)[None, :])
        phases = []
        for phase_h in range(sh):
            taps_h = [kh for kh in range(g.kernel[0]) if (kh * dh - phase_h) % sh == 0
                      and kh * dh >= phase_h]
            for phase_w in range(sw):
                taps_w = [kw for kw in range(g.kernel[1]) if (kw * dw - phase_w) % sw == 0
                          and kw * dw >= phase_w]
                if not taps_h or not taps_w:
                    continue
                shift_h = np.array([self.margin_h - (kh * dh - phase_h) // sh for kh in taps_h])
                shift_w = np.array([self.margin_w - (kw * dw - phase_w) // sw for kw in taps_w])
                # compute only the grid rows whose input row lies inside x (not in its
                # padding): rows first_row <= i < stop_row of this phase
                first_row = -(-(g.pad[0] - phase_h) // sh)
                stop_row = -(-(g.height + g.pad[0] - phase_h) // sh)
                in_plane = (shift_h[:, None] + first_row) * self.grid_w + shift_w[None, :]
                # (not padded to whole tap tiles: only correlate reads them, tap by tap)
                offsets = (filter_index[:, :, None, None] * self.image_len
                           + in_plane[None, None]).reshape(g.groups, -1)
                out_len = round_up(max(stop_row - first_row, 0) * self.grid_w, 16)
                block_shape = (len(taps_h) * len(taps_w), 1,
                               int(in_plane.max() - in_plane.min()))
                phases.append((phase_h, phase_w, np.array(taps_h, dtype=np.int64),
                               np.array(taps_w, dtype=np.int64), first_row, out_len, offsets,
                               block_shape))
        return phases

    def pack_source(self, grad_out):
        """The output gradient's grid, of all of it or of a part of its batch."""
        g = self.geometry
        return pack_grid(grad_out, g.out_channels, g.out_channels, 1,
                         (self.margin_h, self.margin_w), (1, 1), (self.grid_h, self.grid_w),
                         self.image_len, self.read_span)

    def weight_matrix(self, weight):
        """The (G * channels_padded, K) matrix of all phases: rows are input channels, columns
        (filter, kh, kw) in the order of ``offsets``, phase by phase."""
        g = self.geometry
        matrix = np.empty((g.groups * self.channels_padded, self.offsets.shape[1]),
                          dtype=weight.dtype)
        for (_, _, taps_h, taps_w, *_), first_column, stop_column in zip(
                self.phases, self.phase_taps[:-1], self.phase_taps[1:]):
            gather_phase_weights(weight, g.groups, taps_h, taps_w, self.channels_padded, matrix,
                                 first_column, stop_column - first_column)
        return matrix


# Which passes run on the channel-blocked layout (ChannelBlockedPlan).
#
# The weight gradient runs on it when there is one group, at least CHANNEL_BLOCKED_MIN_FILTERS
# filters and the input channels fill at least CHANNEL_BLOCKED_MIN_FILL of their vectors.
# Elsewhere the grid kernel is as fast or faster (same-process A/B of the weight gradient
# alone, blocked / grid time: 24 channels, 0.75 of two vectors filled, 1.03; 8 filters 1.04,
# 3 filters 1.31; reference shapes 0.62-0.90).
CHANNEL_BLOCKED_MIN_FILTERS = 16
CHANNEL_BLOCKED_MIN_FILL = 0.8


def blocked_weight_gradient(geometry, itemsize):
    """Whether the weight gradient of ``geometry`` runs on the channel-blocked layout."""
    if FORCE_CHANNEL_BLOCKED is not None:
        return FORCE_CHANNEL_BLOCKED and geometry.groups == 1
    lanes = VECTOR_BYTES // itemsize
    channels = geometry.in_channels
    fill = channels / (-(-channels // lanes) * lanes)
    return (geometry.groups == 1 and geometry.out_channels >= CHANNEL_BLOCKED_MIN_FILTERS
            and fill >= CHANNEL_BLOCKED_MIN_FILL)


# The forward and the input gradient run on the channel-blocked layout where the correlation
# reads at least two vectors of channels (or one: see "Where they lose" below) and writes at
# least two, at least 15/16 filled, or
# 7/8 filled for output lines of at most PARTLY_FILLED_MAX_WIDTH pixels (filters for the
# forward, input channels for the input gradient: the vector lanes, which a partly filled last
# vector computes for nothing; a partly filled input vector costs nothing, its missing
# channels have no terms). Since ``blocked_correlate`` packs each image in the thread that
# reads it, that is almost everywhere. Same-process A/B of each pass alone (grid / blocked
# time), forward and input gradient: res14 1.10 and 1.16, res28 1.07 and 1.10, res56 1.04 and
# 1.04, mnist2 1.24 and 1.23, odd5 (48 -> 80 channels, 5x5) 1.08 and 1.08, dil56 1.04 and
# 1.10, a 1x1 kernel (256 -> 64 at 14x14) 1.04 and 1.15; stride 2: res14 1.17 and 1.36, res28
# 1.19 and 1.11, res56 1.05-1.11 (forward), dcgan's 64 -> 128 at 32x32 1.10 (forward).
# Partly filled vectors, 3x3, the same channel count in and out (both passes write that
# fill), forward / input gradient:
# - 15/16 and more: 120 channels at 28x28 1.03-1.05, 200 at 14x14 1.06-1.12, odd3's forward
#   (100 -> 120 at 19x19) 1.07-1.14;
# - 7/8 to 15/16 at widths up to 20: 56 channels at 14x14 1.00 / 1.07 and at 20x20 0.99 /
#   1.07, 72 at 7x7 1.20 / 1.29, at 14x14 1.02-1.04 and at 19x19 1.04 / 1.05, 88 at 14x14
#   1.05-1.11 and at 20x20 1.06 / 1.12, odd3's input gradient (100 of 112 lanes) 1.05-1.07;
# - the same fills wider: at 24x24 100 channels 0.96 / 0.99; at 28x28 104 0.98-1.00, 88
#   0.98-1.01, 72 0.93-0.96, 56 0.94-0.98;
# - less: 40 channels at 28x28 0.84-0.87, 33 0.74.
# Where they lose, the grid stays:
# - one vector of channels read, except at a batch of at least ONE_VECTOR_MIN_BATCH and, for
#   the input gradient, stride 1 (AMD Zen 4, float32 (16 lanes), 3x3 kernels at batch 8 unless
#   named, forward: 16 -> 32 channels at 56x56 1.04, at 28x28 1.07, at 112x112 1.03, at
#   32x32 and batch 16 0.99, at 8x8 and batch 64 1.09, stride 2 1.20; 16 -> 48, 64, 96, 128
#   1.05-1.24; 20 and 24 channels 1.06-1.11; a 5x5 kernel 1.21, dilation 2 1.08; but at 7x7
#   0.83 (0.07 ms); float64 (8 lanes), 8 -> 32 channels 1.05-1.08, stride 2 1.14. Input
#   gradient, 16 -> 32 channels at 56x56 1.05, 16 and 24 filters read from 32-128 channels
#   1.03-1.25, at 112x112 and batch 4 0.97; strided 0.81-0.83. Smaller batches lose: 16 -> 32
#   channels at 56x56, batch 1 0.94, 2 0.98, 4 1.00, batch 1 at stride 2 0.57 and at 112x112
#   0.78 (the threads pack the same image, each into its own slot). Less than one vector: 8
#   channels in 0.80-1.09, 12 0.97, 3 0.67-0.89 (float64: 4 channels 0.76). Before packing
#   went through in-register transposes, on the Intel machine: 16 channels in 0.96 (forward)
#   and 0.90 (input gradient);
# - one vector of channels written: 16 filters 0.87 (forward);
# - written vectors less filled (above): 64 -> 36 channels at 28x28 0.81 (forward);
# - strided input gradients of images wider than CHANNEL_BLOCKED_MAX_WIDTH (one correlation
#   per stride phase, over one shared packed gradient): res56 s2 0.94, 64 channels at 32x32
#   0.99, 56x56 with a 4x4 kernel 0.97, 128 channels at 56x56 0.99; at 28 and below the blocked
#   one wins (64 channels at 28x28 1.10, at 14x14 1.31; res28 s2 1.12). Since the grid's input
#   gradient computes all phases in one correlation, res56 s2 reads 0.82 (the transposed
#   ct28op's and dcgan's forwards 0.82 and 0.92). Such a layer runs its forward on one layout
#   and its input gradient on the other, so it compiles both correlations (18.4 s cold for 64
#   channels at 32x32 against 13-14 s); the forward on the grid too was 0.86 for res56 s2.
CHANNEL_BLOCKED_MAX_WIDTH = 28  # of x, for strided input gradients
ONE_VECTOR_MIN_BATCH = 8  # images, for correlations that read one vector of channels
PARTLY_FILLED_MAX_WIDTH = 20  # of the output lines, for written vectors 7/8 to 15/16 filled
# the forward's column strides measured channel-blocked (others run on the grid)
BLOCKED_COLUMN_STRIDES = (1, 2)
# None: each pass takes the layout the rules above choose; True / False: the channel-blocked
# layout wherever it is implemented (groups == 1) / nowhere. For tests.
FORCE_CHANNEL_BLOCKED = None


def _blocked_correlation_pays(in_channels, out_channels, out_width, itemsize, one_vector_pays):
    """Whether a correlation from ``in_channels`` to ``out_channels`` in output lines of
    ``out_width`` pixels runs channel-blocked; ``one_vector_pays``: whether reading one vector
    of channels (not two) is enough (see above)."""
    lanes = VECTOR_BYTES // itemsize
    out_lanes = -(-out_channels // lanes) * lanes
    filled = (16 * out_channels >= 15 * out_lanes
              or 8 * out_channels >= 7 * out_lanes and out_width <= PARTLY_FILLED_MAX_WIDTH)
    reads = in_channels >= (1 if one_vector_pays else 2) * lanes
    return reads and out_channels >= 2 * lanes and filled


def blocked_forward(geometry, itemsize):
    """Whether the forward of ``geometry`` runs on the channel-blocked layout."""
    g = geometry
    if g.groups != 1:
        return False
    if FORCE_CHANNEL_BLOCKED is not None:
        return FORCE_CHANNEL_BLOCKED
    if g.stride[1] not in BLOCKED_COLUMN_STRIDES:
        return False
    return _blocked_correlation_pays(g.in_channels, g.out_channels, g.out_width, itemsize,
                                     g.batch >= ONE_VECTOR_MIN_BATCH)


def blocked_input_gradient(geometry, itemsize):
    """Whether the input gradient of ``geometry`` runs on the channel-blocked layout."""
    g = geometry
    if g.groups != 1:
        return False
    if FORCE_CHANNEL_BLOCKED is not None:
        return FORCE_CHANNEL_BLOCKED
    return (_blocked_correlation_pays(g.out_channels, g.in_channels, g.width, itemsize,
                                      g.batch >= ONE_VECTOR_MIN_BATCH and g.stride == (1, 1))
            and (g.stride == (1, 1) or g.width <= CHANNEL_BLOCKED_MAX_WIDTH))


# One stride phase of BlockedInputGradPlan: its positions in x (first row and column, rows x
# columns of them, every stride-th), its terms (as ChannelBlockedPlan's: term_offsets,
# line_terms) and the taps they stand for.
BlockedPhase = collections.namedtuple(
    "BlockedPhase", "first_row first_column term_offsets taps_h taps_w rows columns line_terms")


def _line_terms(lines, stride, dilation, taps, first_real, real_lines, terms_per_tap):
    """(lines, 2) int64: the first term and the number of terms of each output line of a
    blocked correlation whose terms run tap rows outermost, ``terms_per_tap`` terms per tap
    row: the tap rows that read a real line. Line ``i``'s tap ``k`` reads line ``i * stride
    + k * dilation`` of its (padded) source, whose real lines are ``first_real <= line <
    first_real + real_lines``; the others are zero padding, which need not be summed (res14: 5%
    of the forward's terms, mnist2's input gradient 15%)."""
    starts = np.arange(lines) * stride
    first = np.clip(-(-(first_real - starts) // dilation), 0, taps)
    stop = np.clip(-(-(first_real + real_lines - starts) // dilation), first, taps)
    return np.stack([first * terms_per_tap, (stop - first) * terms_per_tap], axis=1)


class ChannelBlockedPlan:
    """The forward and the weight gradient on the channel-blocked layout
    (``conv2d.blocked_correlate`` and ``conv2d.blocked_grad_weight``). Only for ``groups == 1``.

    The padded input is stored ``(N, CB, H + pads, W + pads, LANES)``: LANES (one vector of
    the dtype) channels innermost. The weight gradient reads a whole vector of channels per
    output pixel for each tap ``(b, kh, kw)``, at ``offsets[(b * KH + kh) * KW + kw]``, and the
    output gradient as given, in rows of OW pixels. The forward reads one input value per term
    at ``term_offsets`` in the order (kh, b, kw, lane), channel ``b * LANES + lane`` at tap
    (kh, kw), for the real channels only (``blocked_term_offsets``), and writes LANES filters
    per vector; output line ``i`` sums the terms ``line_terms[i]`` (first, count): the tap
    rows that read real input lines (``all_line_terms``: all of them). Neither computes spare
    grid columns.

    The forward's copy stores each line's columns by column stride phase (``column_phases``
    phases of ``packed_width // column_phases`` pixels), so that its correlation reads
    consecutive pixels whatever the stride: one kernel for all strides, where one per stride
    cost 4.7 s more of cold compile for a strided layer (the weight gradient's copy is not
    split: its tile reads a vector per pixel, at any stride).
    """

    def __init__(self, geometry, itemsize):
        g = geometry
        self.geometry = g
        (dh, dw), (kernel_h, kernel_w) = g.dilation, g.kernel
        self.lanes = VECTOR_BYTES // itemsize
        self.blocks = -(-g.in_channels // self.lanes)
        block, kh, kw = np.meshgrid(np.arange(self.blocks), np.arange(kernel_h),
                                    np.arange(kernel_w), indexing="ij")

        def tap_offsets(column_phases):
            """(blocks, KH, KW): where tap (b, kh, kw) reads, relative to an output pixel's
            position, in lines of ``column_phases`` phases (padded column ``c`` at pixel ``c %
            P * (line // P) + c // P``), and the lines' length in pixels."""
            phase_len = -(-g.padded_width // column_phases)
            line = column_phases * phase_len
            column = kw * dw % column_phases * phase_len + kw * dw // column_phases
            return ((block * g.padded_height + kh * dh) * line + column) * self.lanes, line

        offsets, _ = tap_offsets(1)
        # an even number of taps for the tiles of 6, 4 or 2; a padding tap reads real data and
        # its (discarded) result lands in a column of its own
        self.offsets = np.zeros(round_up(offsets.size, 2), dtype=np.int64)
        self.offsets[:offsets.size] = offsets.reshape(-1)
        # the forward's terms run tap rows outermost (kh, b, kw, lane), so that the tap rows
        # that read an output line's padding rows are a range of terms it can leave out
        self.column_phases = g.stride[1]
        forward_offsets, self.packed_width = tap_offsets(self.column_phases)
        self.term_offsets = blocked_term_offsets(forward_offsets.transpose(1, 0, 2),
                                                 g.in_channels, self.lanes)
        self.line_terms = _line_terms(g.out_height, g.stride[0], dh, kernel_h, g.pad[0],
                                      g.height, self.term_offsets.size // kernel_h)
        # every line summing all terms (padding rows included), and whether that differs
        self.all_line_terms = np.zeros_like(self.line_terms)
        self.all_line_terms[:, 1] = self.term_offsets.size
        self.skips_padding = bool((self.line_terms[:, 1] < self.term_offsets.size).any())
        self.filter_blocks = -(-g.out_channels // self.lanes)
        self.pixel_tiles = -(-g.out_width // BROADCAST_PIXELS)
        # output lines per block, by the input lines they read
        line_bytes = g.stride[0] * g.padded_width * self.lanes * itemsize
        self.block_lines = max(1, BLOCKED_INPUT_BYTES // line_bytes)
        # the weight gradient's parts of the batch (see BATCH_PARTS_MIN_RATIO)
        image_bytes = self.blocks * g.padded_height * g.padded_width * self.lanes * itemsize
        partial_bytes = g.out_channels * self.offsets.size * self.lanes * itemsize
        self.batch_parts = 2 if (g.batch % 2 == 0 and g.batch * image_bytes
                                 >= BATCH_PARTS_MIN_RATIO * partial_bytes) else 1

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def for_geometry(geometry, itemsize):
        """The plan for ``geometry`` and an element size, built once."""
        return ChannelBlockedPlan(geometry, itemsize)

    def forward_weights(self, weight):
        """weight (F, C, KH, KW) as ``blocked_correlate``'s (FB, T, LANES) matrix, and whether
        all of it is finite."""
        g = self.geometry
        return gather_blocked(weight, False, np.arange(g.kernel[0]), np.arange(g.kernel[1]),
                              self.filter_blocks, self.term_offsets.size, self.lanes,
                              check=True)

    def splits(self, thread_count):
        """(row_splits, tap_splits) for ``blocked_grad_weight``: one task per thread, by rows
        where there are enough row tiles (every task reads all of the input for its taps)."""
        row_tiles = -(-self.geometry.out_channels // ROW_TILE)
        tap_tiles = -(-self.offsets.size // OUTER_TAPS)
        row_splits = min(row_tiles, thread_count)
        return row_splits, max(1, min(tap_tiles, thread_count // row_splits))


class BlockedInputGradPlan:
    """The input gradient on the channel-blocked layout, one stride-1 ``blocked_correlate`` of
    the output gradient per stride phase (as ``InputGradPlan`` on the grid).

    Input position ``h = i * sh + a - pad_top`` takes the taps with ``kh * dh = a + m * sh``,
    from output-gradient row ``i - m``. With the gradient's row ``r`` placed at ``margin + r``
    (``margin = ((K - 1) * d) // s``) every read is a non-negative constant offset; only the
    lines and columns some tap reads are packed (for stride 1 the H + reach lines of the
    transposed correlation, the gradient behind reach - pad_top zero lines). A phase's
    correlation computes its rows ``i0 <= i < i1`` (those inside x), which ``unblock_output``
    puts at every ``sh``-th row of grad_x.

    ``phases``: a ``BlockedPhase`` for each phase with taps and positions; ``complete``:
    whether they cover all of grad_x.
    """

    def __init__(self, geometry, itemsize):
        g = geometry
        self.geometry = g
        (sh, sw), (dh, dw) = g.stride, g.dilation
        self.lanes = VECTOR_BYTES // itemsize
        self.blocks = -(-g.out_channels // self.lanes)  # of the output gradient's channels
        self.channel_blocks = -(-g.in_channels // self.lanes)
        axes = [self._axis_phases(g.kernel[0], sh, dh, g.pad[0], g.height),
                self._axis_phases(g.kernel[1], sw, dw, g.pad[2], g.width)]
        (first_h, stop_h), (first_w, stop_w) = (self._read_range(axis) for axis in axes)
        self.pad_top, self.pad_left = axes[0][0][5] - first_h, axes[1][0][5] - first_w
        self.padded_height, self.padded_width = stop_h - first_h, stop_w - first_w
        self.phases = []
        self.complete = True
        for taps_h, first_row, rows, shifts_h, _, _ in axes[0]:
            for taps_w, first_column, columns, shifts_w, _, _ in axes[1]:
                if rows <= 0 or columns <= 0:
                    continue  # no position of x in this phase
                if not taps_h or not taps_w:
                    self.complete = False  # its positions get no gradient, only the bias
                    continue
                # terms (tap row, block, tap column, lane), tap rows outermost
                block = np.arange(self.blocks)[None, :, None]
                offsets = ((block * self.padded_height + (shifts_h - first_h)[:, None, None])
                           * self.padded_width + (shifts_w - first_w)[None, None, :])
                term_offsets = blocked_term_offsets(offsets * self.lanes, g.out_channels,
                                                    self.lanes)
                # the tap rows' reads are evenly spaced (a phase's taps are)
                step = int(shifts_h[1] - shifts_h[0]) if len(shifts_h) > 1 else 1
                assert (np.diff(shifts_h) == step).all()
                line_terms = _line_terms(rows, 1, step, len(taps_h),
                                         self.pad_top - int(shifts_h[0] - first_h),
                                         g.out_height, term_offsets.size // len(taps_h))
                self.phases.append(BlockedPhase(
                    first_row, first_column, term_offsets, np.array(taps_h, dtype=np.int64),
                    np.array(taps_w, dtype=np.int64), rows, columns, line_terms))

    @staticmethod
    def _axis_phases(kernel, stride, dilation, pad, size):
        """Per phase of one axis: (taps, first x position, positions, shifts, stop read,
        margin); tap k of the phase reads lines from shifts[k] on, in coordinates where the
        gradient starts at ``margin``."""
        margin = ((kernel - 1) * dilation) // stride
        phases = []
        for a in range(stride):
            # latest tap first: its reads start earliest, so a phase's terms read in
            # ascending order (descending, the stride-1 input gradient was ~2% slower)
            taps = [k for k in reversed(range(kernel)) if (k * dilation - a) % stride == 0
                    and k * dilation >= a]
            i0 = -(-(pad - a) // stride)
            positions = max(0, -(-(size + pad - a) // stride) - i0)
            shifts = np.array([i0 - (k * dilation - a) // stride + margin for k in taps],
                              dtype=np.int64)
            stop = int(shifts.max()) + positions if taps and positions else None
            phases.append((taps, i0 * stride + a - pad, positions, shifts, stop, margin))
        return phases

    @staticmethod
    def _read_range(axis):
        """(first, stop) line of one axis that some phase's tap reads."""
        starts = [int(shifts.min()) for taps, _, positions, shifts, _, _ in axis
                  if taps and positions]
        stops = [stop for *_, stop, _ in axis if stop is not None]
        return (min(starts), max(stops)) if starts else (0, 1)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def for_geometry(geometry, itemsize):
        """The plan for ``geometry`` and an element size, built once."""
        return BlockedInputGradPlan(geometry, itemsize)

    def phase_weights(self, weight, taps_h, taps_w, terms):
        """One phase's (CB, terms, LANES) matrix of ``blocked_correlate``."""
        return gather_blocked(weight, True, taps_h, taps_w, self.channel_blocks, terms,
                              self.lanes)


def pack_blocked(src, blocks, padded_height, padded_width, pad_top, pad_left, lanes):
    """``src`` (N, C, H, W) packed as (N, blocks, padded_height, padded_width, lanes), aligned."""
    blocked = aligned_empty((src.shape[0], blocks, padded_height, padded_width, lanes),
                            src.dtype)
    pack_channel_blocks(src, blocked, pad_top, pad_left)
    return blocked


def blocked_term_offsets(offsets, channels, lanes):
    """The terms of a channel-blocked correlation, in order, from ``offsets`` (taps_h, blocks,
    taps_w), where tap (u, v) reads block b's vector of LANES channels: one term per channel
    and tap, the block's lanes innermost, leaving out the lanes past ``channels`` (a partly
    filled last block: summing its zero lanes cost 12% more terms for 100 channels)."""
    real_lanes = np.arange(offsets.shape[1] * lanes).reshape(-1, lanes) < channels
    terms = offsets[..., None] + np.arange(lanes)
    return terms[np.broadcast_to(real_lanes[None, :, None, :], terms.shape)]


def gather_blocked(weight, transposed, taps_h, taps_w, out_blocks, terms, lanes,
                   check=False):
    """``layout.gather_blocked_weights`` into a new aligned (out_blocks, terms, lanes) array;
    with ``check``, also whether all the weights it holds are finite."""
    blocked = aligned_empty((out_blocks, terms, lanes), weight.dtype)
    inputs = weight.shape[0] if transposed else weight.shape[1]
    tasks = out_blocks * -(-inputs // lanes) if check else 0
    task_checks = np.empty(tasks, weight.dtype)
    gather_blocked_weights(weight, transposed, taps_h, taps_w, blocked, task_checks)
    return (blocked, not task_checks.any()) if check else blocked
