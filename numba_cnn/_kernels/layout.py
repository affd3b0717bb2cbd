"""Packing NCHW arrays into the flat pixel grids the convolution kernels run on, and back.

A grid stores each row (a channel, or a filter) of each image as ``grid_h x grid_w`` pixels,
row-major, in a slot of ``image_len`` elements (``>= grid_h * grid_w``; the rest is zero). With
stride ``(sh, sw)`` the padded input is split into ``sh * sw`` phase planes,
``plane(a, b)[i, j] = padded[i * sh + a, j * sw + b]``, so that a strided convolution reads every
tap at unit stride. The caller chooses where each plane goes: the input grids
(``_conv_plan.Grid``) are ``[n, row, phase, pixel]`` with a zero tail after each image; the
weight gradient's output-gradient grid is ``[row, n, pixel]``.

These helpers are shared by every convolution family, so they compile once per dtype.
"""
import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from . import cached_njit, source_digest
from .register_tile import VECTOR_BYTES

# this module's source hash: conv2d's cached drivers, which compile in the helpers below that
# they call (image_in_slot, pack_grid_image, unblock_run), key their cache on it
SOURCE_DIGEST = source_digest(__file__)

# Input channels (matrix rows) per task of gather_phase_weights.
CHANNEL_BLOCK = 16


@cached_njit()
def data_address(array):
    """The address of ``array``'s first element, for ``_conv_plan.aligned_empty``.

    ``ndarray.ctypes.data`` builds a ctypes object on every call. With it ``aligned_empty``
    took 1.8 us, and 11.3 us with the caches cold, as a training loop finds them after the
    kernels; with this call 0.8 and 5.5 us (mnist1's forward and backward 1.3% faster)."""
    return array.ctypes.data


@cached_njit(parallel=True)
def pack_phases(src, dst, grid_rows, plane_strides, rows_per_group, rows_per_group_padded,
                pad_top, pad_left, stride_h, stride_w, grid_h, grid_w, image_len):
    """Fill the planes of ``grid_rows`` grid rows x sh*sw phases x N images in the flat ``dst``
    from ``src`` (N, rows, H, W), C-contiguous.

    ``plane_strides = (row, phase, image)``: plane (grid_row, phase, n) starts at
    ``grid_row * row + phase * phase + n * image`` and holds ``image_len`` elements (the
    caller chooses the layout; positions between planes are not written).
    Source row ``g * rows_per_group + r`` goes to grid row ``g * rows_per_group_padded + r``;
    grid rows beyond ``rows_per_group`` in each group, padding and spare pixels are zero.
    Grid pixel (i, j) of phase (a, b) holds ``src[..., i*sh + a - pad_top, j*sw + b - pad_left]``.
    Each grid row is written as zeros, a copy of the source columns
    it covers (computed up front, so the copy loop has no tests and LLVM vectorises it, unit
    stride or not) and zeros again; a per-pixel bounds test ran at ~4 GB/s.
    """
    batch, rows, height, width = src.shape
    row_stride, phase_stride, image_stride = plane_strides
    zero = dst.dtype.type(0)
    src_flat = src.reshape(-1)
    dst_flat = dst
    for task in prange(grid_rows * batch):
        task_index = np.int64(task)
        grid_row = task_index // batch
        n = task_index - grid_row * batch
        group = grid_row // rows_per_group_padded
        local = grid_row - group * rows_per_group_padded
        valid_row = local < rows_per_group
        row = group * rows_per_group + local
        for a in range(stride_h):
            for b in range(stride_w):
                plane_start = (grid_row * row_stride + (a * stride_w + b) * phase_stride
                               + n * image_stride)
                # grid columns j whose source column j*sw + b - pad_left lies in [0, width)
                column_first = min(grid_w, (max(pad_left - b, 0) + stride_w - 1) // stride_w)
                column_stop = column_first
                if width - 1 + pad_left - b >= 0:
                    column_stop = max(column_first,
                                      min(grid_w, (width - 1 + pad_left - b) // stride_w + 1))
                source_column = column_first * stride_w + b - pad_left
                for i in range(grid_h):
                    ih = i * stride_h + a - pad_top
                    out_row = np.uint64(plane_start + i * grid_w)
                    if valid_row and 0 <= ih < height:
                        for j in range(column_first):
                            dst_flat[out_row + np.uint64(j)] = zero
                        out_start = out_row + np.uint64(column_first)
                        src_start = np.uint64(((n * rows + row) * height + ih) * width
                                              + source_column)
                        if stride_w == 1:
                            for j in range(column_stop - column_first):
                                dst_flat[out_start + np.uint64(j)] = src_flat[src_start
                                                                              + np.uint64(j)]
                        else:
                            for j in range(column_stop - column_first):
                                dst_flat[out_start + np.uint64(j)] = src_flat[
                                    src_start + np.uint64(j * stride_w)]
                        for j in range(column_stop, grid_w):
                            dst_flat[out_row + np.uint64(j)] = zero
                    else:
                        for j in range(grid_w):
                            dst_flat[out_row + np.uint64(j)] = zero
                for pixel in range(grid_h * grid_w, image_len):
                    dst_flat[np.uint64(plane_start + pixel)] = zero


@njit
def write_crops(grids, row_start, crops, value, dst_flat, plane_start):
    """Write one output row of the stride phases' grids, from ``grids[row_start:]``, into the
    plane of the flat ``dst_flat`` from ``plane_start`` on, plus ``value``: each row of
    ``crops`` (K, 7) int64, (target, lines, columns, source, target line step, target column
    step, source line step), copies a rectangle from ``source`` on to ``target`` on, or sets it
    to ``value`` where ``source`` < 0 (``_conv_plan.phase_crops``: a stride phase each).
    ``unpack_phases``'s per plane; ``correlate``'s tasks have the same loops inline (called,
    this made mnist1's forward 4-6% slower; inlined by Numba, the kernel took 0.5-0.9 s longer
    to compile). The case is decided per crop, not per line: with the branches inside the line
    loop, mnist1's forward was 14% slower. (Flat unsigned indices: LLVM vectorises the
    unit-stride copy.)"""
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
                        grids[line_source + np.uint64(j)] + value)
        else:
            for i in range(lines):
                line_target = np.uint64(target + i * line_step)
                line_source = np.uint64(source + i * source_step)
                for j in range(columns):
                    dst_flat[line_target + np.uint64(j * column_step)] = (
                        grids[line_source + np.uint64(j)] + value)


@njit
def pack_grid_image(src, n, dst_flat, image_start, rows, pad_top, pad_left, grid_h, grid_w,
                    image_len):
    """Image ``n`` of ``src`` (N, rows, H, W) as ``pack_phases`` packs it with stride 1 and
    ``rows`` grid rows (no padding rows), on the calling thread, its planes one after another
    from ``image_start`` on: ``correlate``'s per-thread packing. (Its own code, not
    ``pack_phases``'s for all strides, and runs of ``_zero_run`` and ``_copy_run``, not loops:
    each helper inlined into ``correlate`` adds its compile time to the kernel's.)"""
    _, _, height, width = src.shape
    src_flat = src.reshape(-1)
    # the grid columns that hold source columns, and the grid lines that hold source lines
    first = min(grid_w, max(pad_left, 0))
    stop = max(first, min(grid_w, width + pad_left))
    first_line = min(grid_h, max(pad_top, 0))
    stop_line = max(first_line, min(grid_h, height + pad_top))
    if CHECK_BOUNDS and (image_start < 0 or image_start + rows * image_len > dst_flat.size
                         or n >= src.shape[0] or rows > src.shape[1]
                         or grid_h * grid_w > image_len):
        raise IndexError("pack_grid_image: the image is outside src or dst_flat")
    # the source runs, and between them one run of zeros each: a line's right margin, the
    # next one's left margin, and the lines and spare pixels between the planes
    zeros_from = image_start
    for row in range(rows):
        plane = image_start + row * image_len
        for i in range(first_line, stop_line):
            line = plane + i * grid_w
            _zero_run(dst_flat, zeros_from, line + first - zeros_from)
            _copy_run(dst_flat, line + first, src_flat, ((n * rows + row) * height + i
                                                         - pad_top) * width + first - pad_left,
                      stop - first)
            zeros_from = line + stop
    _zero_run(dst_flat, zeros_from, image_start + rows * image_len - zeros_from)


@cached_njit(parallel=True)
def unpack_phases(grids, row_len, crops, rows_per_group, rows_per_group_padded, bias, dst):
    """Write every position of ``dst`` (N, rows, H, W) from the stride phases' output grids.

    ``grids`` is the flat (rows_padded, N, ``row_len``) output of ``correlate``, each of its
    rows holding the phases' grids one after another; ``crops`` (``_conv_plan.phase_crops``)
    say where each phase's positions lie in a plane of ``dst`` (a phase without taps
    contributes zero, i.e. ``bias``), as ``write_crops`` writes them. Source row ``g *
    rows_per_group + r`` is grid row ``g * rows_per_group_padded + r``.

    A task writes one (n, row) plane of ``dst``, all its phases, so each cache line of ``dst``
    is written while in cache (one pass per phase wrote every line of a stride-2 output
    twice, from memory).
    """
    batch, rows, height, width = dst.shape
    dst_flat = dst.reshape(-1)
    for task in prange(batch * rows):
        task_index = np.int64(task)
        n = task_index // rows
        row = task_index - n * rows
        group = row // rows_per_group
        grid_row = group * rows_per_group_padded + row - group * rows_per_group
        write_crops(grids, (grid_row * batch + n) * row_len, crops, bias[row], dst_flat,
                    (n * rows + row) * height * width)


@cached_njit()
def gather_phase_weights(weight, groups, taps_h, taps_w, rows_padded, matrix, first_column,
                         phase_columns):
    """Fill columns ``first_column`` to ``first_column + phase_columns`` of ``matrix``
    (groups * rows_padded, columns) with one stride phase's weights of an input gradient: row
    ``g * rows_padded + c``, column ``first_column + (f * len(taps_h) + i) * len(taps_w) + j``
    holds ``weight[g * Fg + f, c, taps_h[i], taps_w[j]]``; padding rows and columns are zero.
    weight : (F, Cg, KH, KW), C-contiguous.

    NumPy's copy of the equivalent transposed, sliced view iterates over the (at most KW-long)
    last axis: 0.14 ms per phase of the dcgan layer, 0.5 ms for res14's weight. A task fills a
    block of CHANNEL_BLOCK rows filter by filter, so it reads the weight in runs of
    CHANNEL_BLOCK channels (one row at a time read a new cache line per element: res14 stride 2,
    0.65 ms for its four phases). On one thread: the grid's input gradients gather small
    weights (dcgan's 0.5 MB, ~0.1 ms), and as a parallel kernel it took 0.9 s longer to compile.
    """
    filters, channels_per_group, kernel_h, kernel_w = weight.shape
    filters_per_group = filters // groups
    taps_h_count = taps_h.shape[0]
    taps_w_count = taps_w.shape[0]
    taps = taps_h_count * taps_w_count
    used_columns = filters_per_group * taps
    columns = matrix.shape[1]
    zero = matrix.dtype.type(0)
    kernel_size = kernel_h * kernel_w
    # the phase's taps as offsets into one filter's (KH, KW) plane
    tap_offsets = np.empty(taps, dtype=np.int64)
    for i in range(taps_h_count):
        for j in range(taps_w_count):
            tap_offsets[i * taps_w_count + j] = taps_h[i] * kernel_w + taps_w[j]
    weight_flat = weight.reshape(-1)
    matrix_flat = matrix.reshape(-1)
    blocks = (rows_padded + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for task in range(groups * blocks):
        task_index = np.int64(task)
        group = task_index // blocks
        first = (task_index - group * blocks) * CHANNEL_BLOCK
        stop = min(first + CHANNEL_BLOCK, rows_padded)
        stop_valid = max(first, min(stop, channels_per_group))
        for f in range(filters_per_group):
            filter_start = (group * filters_per_group + f) * channels_per_group
            for channel in range(first, stop_valid):
                source = np.uint64((filter_start + channel) * kernel_size)
                target = np.uint64((group * rows_padded + channel) * columns + first_column
                                   + f * taps)
                for tap in range(taps):
                    matrix_flat[target + np.uint64(tap)] = weight_flat[
                        source + np.uint64(tap_offsets[tap])]
        for channel in range(first, stop):
            row = group * rows_padded + channel
            for column in range(first_column + (used_columns if channel < channels_per_group
                                                else 0), first_column + phase_columns):
                matrix[row, column] = zero


class _VectorIR:
    """The IR the two transposing intrinsics share, for one codegen call: one vector of the
    arrays' dtype (VECTOR_BYTES, LANES elements), array data pointers, lane masks, masked loads
    and stores, and the LANES x LANES transpose. (``register_tile._Emitter`` has the tiles'
    counterparts; this module's cached kernels are keyed on its own source only, so it does
    not compile in code from there.)"""

    def __init__(self, context, builder, signature):
        self.context, self.builder, self.signature = context, builder, signature
        element = context.get_value_type(signature.args[0].dtype)
        self.element_bytes = context.get_abi_sizeof(element)
        self.lanes = VECTOR_BYTES // self.element_bytes
        self.vector = ir.VectorType(element, self.lanes)
        self.mask_type = ir.VectorType(ir.IntType(1), self.lanes)

    def constant(self, value):
        return ir.Constant(ir.IntType(64), value)

    def data(self, position, value):
        """The data pointer of array argument ``position``."""
        array = self.context.make_array(self.signature.args[position])
        return array(self.context, self.builder, value).data

    def splat(self, value, vector_type):
        """``value`` in every lane of ``vector_type``."""
        builder = self.builder
        single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value,
                                        ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(single, single, ir.Constant(
            ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes))

    def lanes_below(self, count):
        """The mask of the lanes ``k < count``."""
        index_vector = ir.VectorType(ir.IntType(64), self.lanes)
        return self.builder.icmp_signed("<", ir.Constant(index_vector, list(range(self.lanes))),
                                        self.splat(count, index_vector))

    def mask_if(self, condition, mask):
        """``mask`` where ``condition`` holds, else no lanes."""
        return self.builder.select(condition, mask,
                                   ir.Constant(self.mask_type, [0] * self.lanes))

    def _masked(self, operation, arguments):
        """Call LLVM's ``llvm.masked.load`` (pointer, alignment, mask, passthrough) or
        ``llvm.masked.store`` (value, pointer, alignment, mask) on one vector."""
        bits = self.element_bytes * 8
        pointer_alignment_mask = [self.vector.as_pointer(), ir.IntType(32), self.mask_type]
        if operation == "load":
            function_type = ir.FunctionType(self.vector, pointer_alignment_mask + [self.vector])
        else:
            function_type = ir.FunctionType(ir.VoidType(), [self.vector] + pointer_alignment_mask)
        function = cgutils.get_or_insert_function(
            self.builder.module, function_type,
            f"llvm.masked.{operation}.v{self.lanes}f{bits}.p0v{self.lanes}f{bits}")
        return self.builder.call(function, arguments)

    def _vector_pointer(self, base, offset):
        return self.builder.bitcast(self.builder.gep(base, [offset]), self.vector.as_pointer())

    def load(self, base, offset, mask):
        """The vector at ``base + offset``, its lanes outside ``mask`` zero and not read."""
        return self._masked("load", [self._vector_pointer(base, offset),
                                     ir.Constant(ir.IntType(32), self.element_bytes), mask,
                                     ir.Constant(self.vector, None)])

    def store(self, value, base, offset, mask):
        """Store the lanes of ``value`` inside ``mask`` at ``base + offset``."""
        self._masked("store", [value, self._vector_pointer(base, offset),
                               ir.Constant(ir.IntType(32), self.element_bytes), mask])

    def transposed(self, vectors):
        """The LANES x LANES block ``vectors[c][k]`` as ``result[k][c]``: at each scale from
        LANES / 2 down to 1, the two vectors of each pair ``scale`` apart swap their
        off-diagonal blocks, one two-vector shuffle each."""
        lanes = self.lanes
        mask_type = ir.VectorType(ir.IntType(32), lanes)
        scale = lanes // 2
        while scale >= 1:
            swapped = list(vectors)
            for low in (c for c in range(lanes) if not c & scale):
                high = low + scale
                low_mask = [k if not k & scale else lanes + k - scale for k in range(lanes)]
                high_mask = [k + scale if not k & scale else lanes + k for k in range(lanes)]
                swapped[low] = self.builder.shuffle_vector(vectors[low], vectors[high],
                                                           ir.Constant(mask_type, low_mask))
                swapped[high] = self.builder.shuffle_vector(vectors[low], vectors[high],
                                                            ir.Constant(mask_type, high_mask))
            vectors = swapped
            scale //= 2
        return vectors


def _build_transpose_into_line():
    """An intrinsic ``transpose_into_line(src, src_start, plane, channels, pixels, dst,
    line_start, phase, pixel, phase_len, phases)``: the channel-blocked packing of up to LANES
    consecutive source columns at once (LANES = one vector of the dtype). It sets

        dst[line_start + (phase_c * phase_len + pixel_c) * LANES + c] =
            src[src_start + c * plane + k]   (0 if c >= channels)

    for ``k < pixels`` and every ``c < LANES``, where column ``k`` is the ``k``-th pixel from
    (``phase``, ``pixel``) on in phase order: (phase + 1, pixel), ..., (0, pixel + 1) after
    (phases - 1, pixel). It loads LANES vectors (a channel's ``pixels`` columns each, masked, so
    nothing is read past them or past ``channels``), transposes them in registers (log2(LANES)
    rounds of two-vector shuffles that swap off-diagonal blocks) and stores a vector per pixel.
    The same packing element by element, LANES loads per stored vector, compiled to gathers:
    res56's input packed at 1.3-1.5 ms against 0.11 ms this way on an AMD Zen 4, where gathers
    are slow.
    """
    @intrinsic
    def transpose_into_line(typingctx, src, src_start, plane, channels, pixels, dst, line_start,
                            phase, pixel, phase_len, phases):
        index = types.int64
        signature = types.void(src, index, index, index, index, dst, index, index, index, index,
                               index)

        def codegen(context, builder, signature, args):
            (src_array, src_start, plane, channels, pixels, dst_array, line_start, phase, pixel,
             phase_len, phases) = args
            emit = _VectorIR(context, builder, signature)
            lanes = emit.lanes
            column_mask = emit.lanes_below(pixels)
            source = builder.gep(emit.data(0, src_array), [src_start])
            # a channel past the last one reads nothing and packs zeros
            vectors = [emit.load(source, builder.mul(plane, emit.constant(c)), emit.mask_if(
                builder.icmp_signed("<", emit.constant(c), channels), column_mask))
                for c in range(lanes)]
            vectors = emit.transposed(vectors)
            line = builder.gep(emit.data(5, dst_array), [line_start])
            one, zero = emit.constant(1), emit.constant(0)
            all_lanes = ir.Constant(emit.mask_type, [1] * lanes)
            for k in range(lanes):
                with builder.if_then(builder.icmp_signed("<", emit.constant(k), pixels),
                                     likely=True):
                    target = builder.mul(builder.add(builder.mul(phase, phase_len), pixel),
                                         emit.constant(lanes))
                    emit.store(vectors[k], line, target, all_lanes)
                next_phase = builder.add(phase, one)
                wraps = builder.icmp_signed("==", next_phase, phases)
                phase = builder.select(wraps, zero, next_phase)
                pixel = builder.select(wraps, builder.add(pixel, one), pixel)
            return context.get_dummy_value()

        return signature, codegen

    return transpose_into_line


def _python_transpose_into_line(src, src_start, plane, channels, pixels, dst, line_start, phase,
                                pixel, phase_len, phases):
    """``_build_transpose_into_line``'s packing in NumPy, for runs with NUMBA_DISABLE_JIT."""
    lanes = VECTOR_BYTES // src.itemsize
    for k in range(pixels):
        target = line_start + (phase * phase_len + pixel) * lanes
        if src_start + (channels - 1) * plane + k >= src.shape[0] or (
                target < 0 or target + lanes > dst.shape[0]):
            raise IndexError("transpose_into_line: a column outside src or dst")
        dst[target:target + lanes] = 0
        dst[target:target + channels] = src[src_start + k:src_start + k + channels * plane:plane]
        phase += 1
        if phase == phases:
            phase, pixel = 0, pixel + 1


_transpose_into_line = (_python_transpose_into_line if config.DISABLE_JIT
                        else _build_transpose_into_line())


def _build_transpose_from_block():
    """An intrinsic ``transpose_from_block(blocked, start, pixels, channels, bias, first_output,
    dst, target, plane)``, the inverse of ``transpose_into_line``'s transpose, plus a bias:

        dst[target + c * plane + k] = blocked[start + k * LANES + c] + bias[first_output + c]

    for ``k < pixels`` (<= LANES) and ``c < channels`` (<= LANES): up to LANES pixels of a
    channel block, each a vector of LANES channels, into LANES rows of ``plane`` elements. It
    loads the pixels' vectors (masked: nothing past ``pixels``), transposes them in registers
    and stores each channel's pixels as one masked vector. Element by element the unblocking
    compiled to scalar loads and stores (res56's output unblocked at 0.40-0.48 ms).
    """
    @intrinsic
    def transpose_from_block(typingctx, blocked, start, pixels, channels, bias, first_output,
                             dst, target, plane):
        index = types.int64
        signature = types.void(blocked, index, index, index, bias, index, dst, index, index)

        def codegen(context, builder, signature, args):
            (blocked_array, start, pixels, channels, bias_array, first_output, dst_array, target,
             plane) = args
            emit = _VectorIR(context, builder, signature)
            lanes = emit.lanes
            pixel_mask = emit.lanes_below(pixels)
            all_lanes = ir.Constant(emit.mask_type, [1] * lanes)
            source = builder.gep(emit.data(0, blocked_array), [start])
            vectors = [emit.load(source, emit.constant(k * lanes), emit.mask_if(
                builder.icmp_signed("<", emit.constant(k), pixels), all_lanes))
                for k in range(lanes)]
            vectors = emit.transposed(vectors)
            bias_values = builder.gep(emit.data(4, bias_array), [first_output])
            rows = builder.gep(emit.data(6, dst_array), [target])
            for c in range(lanes):
                with builder.if_then(builder.icmp_signed("<", emit.constant(c), channels),
                                     likely=True):
                    value = builder.fadd(vectors[c], emit.splat(builder.load(builder.gep(
                        bias_values, [emit.constant(c)])), emit.vector))
                    emit.store(value, rows, builder.mul(plane, emit.constant(c)), pixel_mask)
            return context.get_dummy_value()

        return signature, codegen

    return transpose_from_block


def _python_transpose_from_block(blocked, start, pixels, channels, bias, first_output, dst, target,
                                 plane):
    """``_build_transpose_from_block``'s unblocking in NumPy, for runs with NUMBA_DISABLE_JIT."""
    lanes = VECTOR_BYTES // blocked.itemsize
    if (start < 0 or start + pixels * lanes > blocked.shape[0] or target < 0
            or target + (channels - 1) * plane + pixels > dst.shape[0]
            or first_output + channels > bias.shape[0]):
        raise IndexError("transpose_from_block: a pixel outside blocked or dst")
    block = blocked[start:start + pixels * lanes].reshape(pixels, lanes)
    for c in range(channels):
        dst[target + c * plane:target + c * plane + pixels] = block[:, c] + bias[first_output + c]


_transpose_from_block = (_python_transpose_from_block if config.DISABLE_JIT
                         else _build_transpose_from_block())


def _build_run_fills():
    """Intrinsics ``zero_run(dst, start, count)``, ``dst[start:start + count] = 0``, and
    ``copy_run(dst, dst_start, src, src_start, count)``, ``dst[dst_start:dst_start + count] =
    src[src_start:src_start + count]`` (distinct arrays, ``count >= 0``): one ``llvm.memset``
    or ``llvm.memcpy`` call each, which LLVM leaves as it is. Written as loops, a packing's
    runs let LLVM unswitch the loops around them on every bound and unroll each version:
    ``pack_grid_image`` came to 3,500 lines of optimised IR (147 memsets), and compiled inside
    ``correlate``'s body it cost that kernel's cold compile about 1.1 s. (A run of up to a
    vector as a masked store instead of a call: loop-invariant tests, which LLVM unswitched
    again, +0.7 s.) ``pack_phases`` keeps its loops: there LLVM's vectorised copy runs faster
    than a call per line (64 channels of 56 x 56, 0.16 ms against 0.19), and its compile
    time counts once, not in every kernel."""
    index = types.int64

    @intrinsic
    def zero_run(typingctx, dst, start, count):
        def codegen(context, builder, signature, args):
            dst_array, start, count = args
            emit = _VectorIR(context, builder, signature)
            cgutils.memset(builder, builder.gep(emit.data(0, dst_array), [start]),
                           builder.mul(count, emit.constant(emit.element_bytes)), 0)
            return context.get_dummy_value()

        return types.void(dst, index, index), codegen

    @intrinsic
    def copy_run(typingctx, dst, dst_start, src, src_start, count):
        def codegen(context, builder, signature, args):
            dst_array, dst_start, src_array, src_start, count = args
            emit = _VectorIR(context, builder, signature)
            cgutils.raw_memcpy(builder, builder.gep(emit.data(0, dst_array), [dst_start]),
                               builder.gep(emit.data(2, src_array), [src_start]), count,
                               emit.element_bytes)
            return context.get_dummy_value()

        return types.void(dst, index, src, index, index), codegen

    return zero_run, copy_run


def _python_zero_run(dst, start, count):
    """``_build_run_fills``'s ``zero_run`` in NumPy, for runs with NUMBA_DISABLE_JIT."""
    if count > 0 and (start < 0 or start + count > dst.shape[0]):
        raise IndexError("zero_run: a run outside dst")
    dst[start:start + count] = 0


def _python_copy_run(dst, dst_start, src, src_start, count):
    """``_build_run_fills``'s ``copy_run`` in NumPy, for runs with NUMBA_DISABLE_JIT."""
    if count > 0 and (dst_start < 0 or dst_start + count > dst.shape[0] or src_start < 0
                      or src_start + count > src.shape[0]):
        raise IndexError("copy_run: a run outside dst or src")
    dst[dst_start:dst_start + count] = src[src_start:src_start + count]


_zero_run, _copy_run = ((_python_zero_run, _python_copy_run) if config.DISABLE_JIT
                        else _build_run_fills())
# The intrinsics read and write without bounds checks: under NUMBA_BOUNDSCHECK their callers
# (_pack_channel_line, unblock_run, pack_grid_image) check each call's range.
CHECK_BOUNDS = bool(config.BOUNDSCHECK)


@njit
def _pack_channel_line(src_flat, dst_flat, line_start, n, block, i, src_shape, padded_width,
                       lanes, pad_left, column_phases):
    """Fill the ``padded_width * lanes`` elements of ``dst_flat`` from ``line_start`` on with line
    ``i`` (a row of src when ``0 <= i < H``) of channel block ``block`` of image ``n`` of
    ``src_flat``, the flat (N, C, H, W) ``src_shape`` array: the padding with zeros, then the
    LANES channels of up to LANES pixels at a time (``_transpose_into_line``; ``lanes`` must be
    its LANES, one vector), with zeros for channels >= C. A negative ``pad_left`` crops.

    With ``column_phases`` P > 1 the line's columns are stored phase by phase: padded column
    ``c`` at pixel ``(c % P) * (padded_width // P) + c // P`` (``padded_width`` a multiple of
    P), so that a correlation with column stride P reads each phase at stride 1."""
    _, channels, height, width = src_shape
    zero = dst_flat.dtype.type(0)
    line_len = padded_width * lanes
    phase_len = padded_width // column_phases
    # the source columns that land inside the line
    first = max(0, -pad_left)
    stop = max(first, min(width, padded_width - pad_left))
    if CHECK_BOUNDS and (np.int64(line_start) + line_len > dst_flat.size
                         or lanes * dst_flat.itemsize != VECTOR_BYTES):
        raise IndexError("pack_channel_line: the line is outside dst or not of vectors")
    if i < 0 or i >= height:
        for element in range(line_len):
            dst_flat[line_start + np.uint64(element)] = zero
        return
    for phase in range(column_phases):
        phase_start = line_start + np.uint64(phase * phase_len * lanes)
        # the phase's pixels p (padded column phase + p * P) that hold source columns; a left
        # pad can reach past the line: clamped. The others are padding.
        first_pixel = min(phase_len, max(0, -(-(first + pad_left - phase) // column_phases)))
        stop_pixel = min(phase_len, max(first_pixel,
                                        -(-(stop + pad_left - phase) // column_phases)))
        for element in range(first_pixel * lanes):
            dst_flat[phase_start + np.uint64(element)] = zero
        for element in range(stop_pixel * lanes, phase_len * lanes):
            dst_flat[phase_start + np.uint64(element)] = zero
    valid_lanes = min(lanes, channels - block * lanes)
    plane = height * width
    rows = ((n * channels + block * lanes) * height + i) * width
    for column in range(first, stop, lanes):
        pixels = min(lanes, stop - column)
        padded_column = column + pad_left
        if CHECK_BOUNDS and rows + (valid_lanes - 1) * plane + column + pixels > src_flat.size:
            raise IndexError("pack_channel_line: a column outside src")
        _transpose_into_line(src_flat, rows + column, plane, valid_lanes, pixels, dst_flat,
                             np.int64(line_start), padded_column % column_phases,
                             padded_column // column_phases, phase_len, column_phases)


@cached_njit(parallel=True)
def pack_channel_blocks(src, dst, pad_top, pad_left):
    """Fill ``dst`` (N, CB, H + pads, W + pads, LANES) from ``src`` (N, C, H, W): the
    channel-blocked layout, ``dst[n, b, i, j, lane] = src[n, b * LANES + lane, i - pad_top,
    j - pad_left]``, zero in the padding and for channels >= C. Negative pads crop. A task
    fills one (n, b, i) line of ``dst``."""
    _, blocks, padded_height, padded_width, lanes = dst.shape
    if lanes * dst.itemsize != VECTOR_BYTES:
        # the transposes' vector width is compiled in (and this module's cache is keyed on
        # its own source only: a copy cached for another width must fail, not run)
        raise ValueError("pack_channel_blocks: LANES must fill one vector")
    dst_flat = dst.reshape(-1)
    src_flat = src.reshape(-1)
    for task in prange(src.shape[0] * blocks * padded_height):
        line = np.int64(task)
        n = line // (blocks * padded_height)
        block = (line // padded_height) - n * blocks
        i = line - (n * blocks + block) * padded_height - pad_top
        # (an int64 column phase, as in the blocked kernels' packing: the literal 1 compiled the
        # line helper again)
        _pack_channel_line(src_flat, dst_flat, np.uint64(line * padded_width * lanes), n, block,
                           i, src.shape, padded_width, lanes, pad_left, np.int64(1))


@njit
def pack_channel_image(src, n, dst_flat, image_start, blocks, padded_height, padded_width,
                       lanes, pad_top, pad_left, column_phases):
    """``pack_channel_blocks`` for image ``n`` alone, on the calling thread: its (blocks,
    padded_height, padded_width, lanes) blocked layout into ``dst_flat`` from ``image_start``
    on, each line's columns in ``column_phases`` phases (``_pack_channel_line``)."""
    src_flat = src.reshape(-1)
    line_len = padded_width * lanes
    for line in range(blocks * padded_height):
        block = line // padded_height
        _pack_channel_line(src_flat, dst_flat, np.uint64(image_start + line * line_len), n,
                           block, line - block * padded_height - pad_top, src.shape,
                           padded_width, lanes, pad_left, column_phases)


@njit
def image_in_slot(src, n, packed, slot_images, slot, pad_top, pad_left, column_phases):
    """Where image ``n`` of ``src`` starts in the flat ``packed`` (S, CB, H, W, LANES): in slot
    ``slot``, packed there first (``pack_channel_image``, lines in ``column_phases``) unless
    ``slot_images[slot]`` says the slot holds it already, and recorded there. The per-thread
    packing of the blocked kernels: each thread calls it with its own slot only."""
    _, blocks, height, width, lanes = packed.shape
    image_start = slot * blocks * height * width * lanes
    if slot_images[slot] != n:
        pack_channel_image(src, n, packed.reshape(-1), image_start, blocks, height, width,
                           lanes, pad_top, pad_left, column_phases)
        slot_images[slot] = n
    return image_start


@cached_njit(parallel=True)
def unblock_grad_weight(partials, grad_weight, scratch):
    """Fill ``grad_weight`` (F, C, KH, KW) with the sum, in order, of the channel-blocked
    partial weight gradients ``partials`` (S, F, K, LANES) of ``blocked_grad_weight``, whose tap
    ``(b * KH + kh) * KW + kw`` holds channels ``b * LANES + lane``: ``grad_weight[f, c, kh, kw]
    = sum_s partials[s, f, (c // LANES * KH + kh) * KW + kw, c % LANES]``. (Flat unsigned
    indices: indexed as 4-D arrays, res14's 2.4 MB took 0.32 ms instead of 0.20.)

    ``grad_weight`` may be ``partials[0]``'s memory (when C is a multiple of LANES, the two
    layouts of a filter take the same place): a task sums its filter's partials into its
    thread's row of ``scratch`` (S, K * LANES) first, then writes the filter, so the weight
    gradient needs no array of its own (res14 stride 2's backward peaked at a second
    weight-sized array)."""
    filters, channels, kernel_h, kernel_w = grad_weight.shape
    parts, _, taps, lanes = partials.shape
    kernel_size = kernel_h * kernel_w
    partials_flat = partials.reshape(-1)
    grad_weight_flat = grad_weight.reshape(-1)
    part_len = filters * taps * lanes
    row_len = taps * lanes
    scratch_flat = scratch.reshape(-1)
    overflows = 0  # a reduction (a flag set in the loop would stay private to it)
    for f in prange(filters):
        thread = get_thread_id()
        if thread >= scratch.shape[0] or scratch.shape[1] < row_len:
            overflows += 1  # raised below: a raise in the loop would make it serial
            continue
        # (the thread's row of scratch: a row allocated per task made res14 stride 2's 4%
        # slower)
        row = np.uint64(thread * scratch.shape[1])
        source = np.uint64(f * row_len)
        for element in range(row_len):
            at = source + np.uint64(element)
            total = partials_flat[at]
            for part in range(1, parts):
                total += partials_flat[at + np.uint64(part * part_len)]
            scratch_flat[row + np.uint64(element)] = total
        for c in range(channels):
            block = c // lanes
            start = row + np.uint64((block * kernel_size * lanes) + c - block * lanes)
            target = np.uint64((f * channels + c) * kernel_size)
            for k in range(kernel_size):
                grad_weight_flat[target + np.uint64(k)] = scratch_flat[start
                                                                       + np.uint64(k * lanes)]
    if overflows > 0:
        raise ValueError("unblock_grad_weight: fewer scratch rows than threads")


@cached_njit(parallel=True, fastmath={"reassoc"})
def gather_blocked_weights(weight, transposed, taps_h, taps_w, blocked, task_checks):
    """Fill ``blocked`` (OB, T, LANES), the weights of ``blocked_correlate``, from ``weight``
    (F, C, KH, KW) at the taps ``taps_h x taps_w``, for the terms of ``blocked_term_offsets``:
    tap rows outermost, then input blocks, tap columns and the input block's channels. Term
    ``u * len(taps_w) * I + ib * len(taps_w) * LANES + v * lanes_ib + lane`` (I inputs, IB
    input blocks, of which only the last may hold fewer than LANES channels, ``lanes_ib``) of
    output block ``ob`` holds, in lane ``ol``, the weight from input channel ``ib * LANES +
    lane`` to output channel ``ob * LANES + ol`` at tap ``(taps_h[u], taps_w[v])``; zero where
    the output channel is out of range. T must be ``len(taps_h) * len(taps_w) * I``.

    Forward (``transposed`` false): outputs are filters, inputs channels, ``weight[o, i, kh,
    kw]``. Input gradient (``transposed`` true): outputs are the channels, inputs the filters,
    ``weight[i, o, kh, kw]``.

    ``task_checks`` (OB * IB,), unless empty, is set to each task's gathered weights times zero,
    summed: all zero if and only if every gathered weight is finite (NaN for a NaN or an inf).
    Each run is summed right after it is written, from L1, and the reassociated sum vectorises:
    on res14 the check costs 19 us here, where a separate pass over the weights took 68.

    A task fills one (output block, input block) pair (36 KB for 3x3 float32), tap by tap and
    input channel by input channel, each a contiguous run of LANES outputs gathered from a
    source block that stays in L1 (9 KB). Kernel by kernel, scattering each one's taps LANES^2
    elements apart, ran 2.3-2.7x slower: 0.28 ms for res14's 2.4 MB against 0.11.
    """
    filters, channels, kernel_h, kernel_w = weight.shape
    out_blocks, terms, lanes = blocked.shape
    outputs, inputs = (channels, filters) if transposed else (filters, channels)
    taps_h_count = taps_h.shape[0]
    taps_w_count = taps_w.shape[0]
    if terms != taps_h_count * taps_w_count * inputs:
        raise ValueError("gather_blocked_weights: terms must be taps x inputs")
    in_blocks = (inputs + lanes - 1) // lanes
    row_terms = taps_w_count * inputs  # one tap row
    zero = blocked.dtype.type(0)
    weight_flat = weight.reshape(-1)
    blocked_flat = blocked.reshape(-1)
    kernel_size = kernel_h * kernel_w
    # elements between consecutive outputs and inputs in weight
    out_stride = kernel_size if transposed else channels * kernel_size
    in_stride = channels * kernel_size if transposed else kernel_size
    for task in prange(out_blocks * in_blocks):
        out_block = task // in_blocks
        in_block = task - out_block * in_blocks
        out_lanes = min(lanes, outputs - out_block * lanes)
        in_lanes = min(lanes, inputs - in_block * lanes)
        block_source = np.uint64(out_block * lanes * out_stride + in_block * lanes * in_stride)
        check = zero
        run = taps_w_count * in_lanes * lanes  # one tap row of one (output, input) block pair
        for u in range(taps_h_count):
            run_start = np.uint64((out_block * terms + u * row_terms
                                   + in_block * taps_w_count * lanes) * lanes)
            if out_lanes < lanes:
                for element in range(run):
                    blocked_flat[run_start + np.uint64(element)] = zero
            for v in range(taps_w_count):
                tap = taps_h[u] * kernel_w + taps_w[v]
                for in_lane in range(in_lanes):
                    source = block_source + np.uint64(in_lane * in_stride + tap)
                    target = run_start + np.uint64((v * in_lanes + in_lane) * lanes)
                    for out_lane in range(out_lanes):
                        blocked_flat[target + np.uint64(out_lane)] = weight_flat[
                            source + np.uint64(out_lane * out_stride)]
            if task_checks.size > 0:
                for element in range(run):
                    check += blocked_flat[run_start + np.uint64(element)] * zero
        if task_checks.size > 0:
            task_checks[task] = check


@njit
def unblock_run(blocked_flat, start, pixels, lanes, bias, first_output, outputs, dst_flat,
                target, plane):
    """Set ``dst_flat[target + lane * plane + p] = blocked_flat[start + p * LANES + lane] +
    bias[first_output + lane]`` for ``p < pixels`` and the lanes of outputs below ``outputs``:
    a run of pixels of one channel block, LANES outputs innermost, into the NCHW planes (of
    ``plane`` elements) of outputs ``first_output`` on, from ``target`` in the first one;
    LANES pixels at a time (``_transpose_from_block``: ``lanes`` must be its LANES)."""
    channels = min(lanes, outputs - first_output)
    if channels < 1:
        return
    if CHECK_BOUNDS and (start < 0 or start + pixels * lanes > blocked_flat.size or target < 0
                         or target + (channels - 1) * plane + pixels > dst_flat.size
                         or first_output + channels > bias.size
                         or lanes * blocked_flat.itemsize != VECTOR_BYTES):
        raise IndexError("unblock_run: a pixel outside blocked_flat, dst_flat or bias")
    for first_pixel in range(0, pixels, lanes):
        _transpose_from_block(blocked_flat, start + first_pixel * lanes,
                              min(lanes, pixels - first_pixel), channels, bias, first_output,
                              dst_flat, target + first_pixel, plane)


@cached_njit(parallel=True)
def unblock_output(blocked, bias, dst, first_row, first_column, row_step, column_step):
    """Set ``dst[n, o, first_row + i * row_step, first_column + j * column_step] =
    blocked[n, o // LANES, i, j, o % LANES] + bias[o]``: the channel-blocked output
    (N, OB, OH, OW, LANES) of ``blocked_correlate`` back in NCHW, (N, O, H, W): one stride
    phase of an input gradient with several, or all of ``dst`` (0, 0, 1, 1) where output slots
    would outweigh the blocked output (otherwise the forward and one-phase input gradients are
    unblocked by ``blocked_correlate``'s own tasks, ``unblock_run``). A task writes
    the LANES planes of one (image, block) line by line: a line of the blocked source stays in
    L1 while each lane is picked out of it (lane by lane over a whole plane re-read it from L2
    LANES times: res56 0.58 ms against 0.39).
    """
    batch, out_blocks, out_height, out_width, lanes = blocked.shape
    if lanes * blocked.itemsize != VECTOR_BYTES:  # (as in pack_channel_blocks)
        raise ValueError("unblock_output: LANES must fill one vector")
    outputs, height, width = dst.shape[1], dst.shape[2], dst.shape[3]
    blocked_flat = blocked.reshape(-1)
    dst_flat = dst.reshape(-1)
    for task in prange(batch * out_blocks):
        n = task // out_blocks
        out_block = task - n * out_blocks
        valid_lanes = min(lanes, outputs - out_block * lanes)
        for i in range(out_height):
            # (int64 here, uint64 below: unblock_run's start is an int64 in blocked_correlate
            # too, so it compiles once, not once per type)
            source = (task * out_height + i) * out_width * lanes
            row_start = (first_row + i * row_step) * width + first_column
            if column_step == 1:  # unit-stride stores (the strided loop: 20% slower)
                unblock_run(blocked_flat, source, out_width, lanes, bias, out_block * lanes,
                            outputs, dst_flat,
                            (n * outputs + out_block * lanes) * height * width + row_start,
                            height * width)
                continue
            for lane in range(valid_lanes):
                o = out_block * lanes + lane
                target = np.uint64((n * outputs + o) * height * width + row_start)
                value = bias[o]
                for j in range(out_width):
                    dst_flat[target + np.uint64(j * column_step)] = (
                        blocked_flat[np.uint64(source + j * lanes + lane)] + value)
