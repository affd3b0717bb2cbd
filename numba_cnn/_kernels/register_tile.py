"""The correlation micro-kernel, written in LLVM IR: a tile of output rows x pixel vectors whose
accumulators live in registers for the whole reduction over the taps.

    out[out_start + r * out_row_stride + p] =
        sum_k  src[src_start + offsets[k] + p] * weight[weight_start + r * weight_row_stride + k]

for ``r < rows`` and ``p < vectors * LANES`` (``k < taps``). The sum runs over ``k`` in order,
one fused multiply-add per term, starting from zero (the result is written, not accumulated).

Why IR: Numba has no vector types, and LLVM's loop vectoriser only vectorises the innermost
loop. Written in Python the pixel loop must be innermost, so the partial sums of a tile go
through memory on every tap (the first kernels did: 4 loads and 4 stores per 16 FMAs, stalling
at ~55% of the FMA peak). Here the tap loop is the loop, and ``rows * vectors`` vector
accumulators stay in registers across it: per tap, ``vectors`` input loads and ``rows`` weight
broadcasts feed ``rows * vectors`` FMAs. On AVX-512 (32 vector registers) the tile is 4 x 6
zmm (24 accumulators, 96 float32 pixels); with 16 vector registers it is 4 x 3.

The same module builds the weight gradient's reduction tile on the grid, and the two tiles of
the channel-blocked layout, where a vector holds LANES channels of one pixel: the broadcast tile
(output pixels x vectors of output channels, broadcasting input values) and the outer tile
(filters x taps, broadcasting output-gradient values against input-channel vectors).

The tile functions are Numba intrinsics, inlined into the ``@njit(parallel=True)`` drivers of
``conv2d.py`` and cached with them. Under ``NUMBA_DISABLE_JIT`` (the coverage run) they are
replaced by a NumPy implementation of the formula above.
"""
import contextlib
import itertools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from . import source_digest

ROWS = 4


def _has_avx512():
    """Whether Numba compiles for a target with AVX-512 (32 vector registers of 64 bytes)."""
    features = config.CPU_FEATURES
    if features is None:
        if config.CPU_NAME not in (None, "host"):
            return False  # a named (portable) target: assume the common AVX2 register file
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


VECTOR_BYTES = 64 if _has_avx512() else 32
# Vectors per tile: ROWS * VECTORS accumulators plus VECTORS inputs and a broadcast weight must
# fit the register file (32 registers with AVX-512, 16 without).
VECTORS = 6 if VECTOR_BYTES == 64 else 3
# Taps per weight-gradient tile: ROWS * REDUCE_TAPS accumulators plus ROWS + REDUCE_TAPS loaded
# vectors (4 x 6 + 10 = 34 would spill on 16 registers; 4 x 2 + 6 = 14 does not).
REDUCE_TAPS = 6 if VECTOR_BYTES == 64 else 2


# This module's source hash and tile shape: the cached drivers that inline the tiles key their
# cache on it (``conv2d._build_drivers``).
SOURCE_FINGERPRINT = f"{source_digest(__file__)}-{VECTOR_BYTES}-{VECTORS}-{REDUCE_TAPS}"


_LOOP_IDS = itertools.count()  # placeholders that make each loop ID a node of its own


class _Emitter:
    """The IR vocabulary the tiles share, for one codegen call: argument data pointers,
    (unaligned) vector loads and stores, broadcasts, FMAs and register accumulators."""

    def __init__(self, context, builder, signature, args):
        self.context, self.builder = context, builder
        self.array_types, self.args = signature.args, args
        dtype = signature.args[0].dtype
        self.element_bytes = 4 if dtype == types.float32 else 8
        self.lanes = VECTOR_BYTES // self.element_bytes
        self.vector = ir.VectorType(context.get_value_type(dtype), self.lanes)
        self._fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vector, [self.vector] * 3),
            f"llvm.fma.v{self.lanes}f{self.element_bytes * 8}")
        self._splat = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes)

    def constant(self, value):
        return ir.Constant(ir.IntType(64), value)

    @contextlib.contextmanager
    def loop(self, count):
        """``for index in range(count)``, yielding the index, in a loop LLVM must not unroll.
        Its unrolling (2x to 4x, plus remainder loops) doubled the tiles' machine code (617
        FMA instructions in ``blocked_correlate`` instead of 315) and cost a layer's cold
        compile 1.0-1.4 s, for about 1% of speed in the tiles of fewer than 16 FMAs (res14
        stride 2's forward, 7-pixel tiles; unrolling those 2x alone kept half the compile
        time)."""
        builder = self.builder
        entry = builder.basic_block
        head = builder.append_basic_block("tile.loop")
        body = builder.append_basic_block("tile.body")
        done = builder.append_basic_block("tile.done")
        builder.branch(head)
        with builder.goto_block(head):
            index = builder.phi(count.type)
            builder.cbranch(builder.icmp_signed("<", index, count), body, done)
        builder.position_at_end(body)
        yield index
        following = builder.add(index, ir.Constant(count.type, 1))
        latch = builder.basic_block
        builder.branch(head).set_metadata("llvm.loop", self._no_unroll())
        index.add_incoming(ir.Constant(count.type, 0), entry)
        index.add_incoming(following, latch)
        builder.position_at_end(done)

    def _no_unroll(self):
        """A loop ID that disables unrolling: LLVM takes a loop's ID to be a node whose first
        operand is the node itself (created with a unique placeholder, then pointed at itself)."""
        module = self.builder.module
        disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
        loop_id = module.add_metadata([ir.MetaDataString(module, f"tile loop {next(_LOOP_IDS)}")])
        loop_id.operands = (loop_id, disable)
        return loop_id

    def data(self, position):
        """The data pointer of array argument ``position``."""
        array = self.context.make_array(self.array_types[position])
        return array(self.context, self.builder, self.args[position]).data

    def rows(self, position, start, stride, count):
        """Pointers to elements ``start + i * stride`` (i < count) of array ``position``."""
        builder = self.builder
        return [builder.gep(self.data(position), [builder.add(
            start, builder.mul(stride, self.constant(i)))]) for i in range(count)]

    def _vector_pointer(self, base, offset):
        if isinstance(offset, int):
            offset = self.constant(offset)
        return self.builder.bitcast(self.builder.gep(base, [offset]), self.vector.as_pointer())

    def load_vector(self, base, offset):
        return self.builder.load(self._vector_pointer(base, offset), align=self.element_bytes)

    def store_vector(self, value, base, offset):
        self.builder.store(value, self._vector_pointer(base, offset), align=self.element_bytes)

    def broadcast(self, scalar):
        undefined = ir.Constant(self.vector, ir.Undefined)
        single = self.builder.insert_element(undefined, scalar, ir.Constant(ir.IntType(32), 0))
        return self.builder.shuffle_vector(single, undefined, self._splat)

    def accumulators(self, outer, inner):
        """outer x inner vector slots, zeroed: allocas in the entry block, which LLVM's SROA
        promotes to registers."""
        slots = [[cgutils.alloca_once(self.builder, self.vector) for _ in range(inner)]
                 for _ in range(outer)]
        for row in slots:
            for slot in row:
                self.builder.store(ir.Constant(self.vector, None), slot)
        return slots

    def accumulate(self, slot, a, b):
        """slot = fma(a, b, slot): one rounding per term."""
        builder = self.builder
        builder.store(builder.call(self._fma, [a, b, builder.load(slot)]), slot)

    def lane_sum(self, value):
        """The sum of a vector's lanes, adding the upper half onto the lower half until one
        lane is left (a fixed order)."""
        builder = self.builder
        width = self.lanes
        while width > 1:
            width //= 2
            halves = [builder.shuffle_vector(value, value, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(start, start + width))))
                for start in (0, width)]
            value = builder.fadd(*halves)
        return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))


def _build_tile(rows, vectors):
    """An intrinsic ``tile(src, src_start, offsets, weight, weight_start, weight_row_stride, out,
    out_start, out_row_stride, taps, accumulate)`` computing the module docstring's formula, or
    adding it to ``out`` when ``accumulate`` is non-zero (the sum then continues from ``out``'s
    values: a correlation split into tap blocks adds the same terms in the same order); the
    arrays are 1-D and contiguous, all starts and strides int64 element counts."""
    @intrinsic
    def tile(typingctx, src, src_start, offsets, weight, weight_start, weight_row_stride, out,
             out_start, out_row_stride, taps, accumulate):
        index = types.int64
        signature = types.void(src, index, offsets, weight, index, index, out, index, index, index,
                               index)

        def codegen(context, builder, signature, args):
            (_, src_start, _, _, weight_start, weight_row_stride, _, out_start, out_row_stride,
             taps, accumulate) = args
            emit = _Emitter(context, builder, signature, args)
            lanes = emit.lanes
            src_tile = builder.gep(emit.data(0), [src_start])
            offsets_data = emit.data(2)
            weight_rows = emit.rows(3, weight_start, weight_row_stride, rows)
            out_rows = emit.rows(6, out_start, out_row_stride, rows)
            accumulators = emit.accumulators(rows, vectors)
            with builder.if_then(builder.icmp_unsigned("!=", accumulate, emit.constant(0))):
                for r, out_row in enumerate(out_rows):
                    for v in range(vectors):
                        builder.store(emit.load_vector(out_row, v * lanes), accumulators[r][v])
            with emit.loop(taps) as tap:
                tap_src = builder.gep(src_tile, [builder.load(builder.gep(offsets_data, [tap]))])
                inputs = [emit.load_vector(tap_src, v * lanes) for v in range(vectors)]
                for r in range(rows):
                    weight_value = emit.broadcast(builder.load(builder.gep(weight_rows[r], [tap])))
                    for v in range(vectors):
                        emit.accumulate(accumulators[r][v], inputs[v], weight_value)
            for r, out_row in enumerate(out_rows):
                for v in range(vectors):
                    emit.store_vector(builder.load(accumulators[r][v]), out_row, v * lanes)
            return context.get_dummy_value()

        return signature, codegen

    return tile


def _build_reduce_tile(rows, taps):
    """An intrinsic ``reduce_tile(src, src_start, src_image_stride, offsets, grad, grad_start,
    grad_row_stride, grad_image_stride, images, vectors, grad_weight, grad_weight_start,
    grad_weight_row_stride, columns)`` adding

        sum_{n < images, p < vectors * LANES}
            grad[grad_start + r * grad_row_stride + n * grad_image_stride + p]
            * src[src_start + n * src_image_stride + offsets[t] + p]

    to ``grad_weight[grad_weight_start + r * grad_weight_row_stride + columns[t]]`` for
    ``r < rows``, ``t < taps`` (``offsets`` and ``columns`` start at the tile's first tap; the
    columns let the caller order the taps by where they read). The ``rows * taps`` vector
    accumulators stay in registers over the pixels of all the images (per vector: ``rows +
    taps`` loads, ``rows * taps`` FMAs); each is then summed across its lanes by halving, in a
    fixed order.
    """
    @intrinsic
    def reduce_tile(typingctx, src, src_start, src_image_stride, offsets, grad, grad_start,
                    grad_row_stride, grad_image_stride, images, vectors, grad_weight,
                    grad_weight_start, grad_weight_row_stride, columns):
        index = types.int64
        signature = types.void(src, index, index, offsets, grad, index, index, index, index,
                               index, grad_weight, index, index, columns)

        def codegen(context, builder, signature, args):
            (_, src_start, src_image_stride, _, _, grad_start, grad_row_stride,
             grad_image_stride, images, vectors, _, grad_weight_start, grad_weight_row_stride,
             _) = args
            emit = _Emitter(context, builder, signature, args)
            offsets_data = emit.data(3)
            tap_offsets = [builder.load(builder.gep(offsets_data, [emit.constant(t)]))
                           for t in range(taps)]
            accumulators = emit.accumulators(rows, taps)
            with emit.loop(images) as image:
                src_image = builder.gep(emit.data(0), [builder.add(
                    src_start, builder.mul(image, src_image_stride))])
                tap_sources = [builder.gep(src_image, [offset]) for offset in tap_offsets]
                grad_rows = emit.rows(4, builder.add(grad_start, builder.mul(
                    image, grad_image_stride)), grad_row_stride, rows)
                with emit.loop(vectors) as vector:
                    pixel = builder.mul(vector, emit.constant(emit.lanes))
                    grads = [emit.load_vector(base, pixel) for base in grad_rows]
                    inputs = [emit.load_vector(base, pixel) for base in tap_sources]
                    for r in range(rows):
                        for t in range(taps):
                            emit.accumulate(accumulators[r][t], grads[r], inputs[t])
            weight_rows = emit.rows(10, grad_weight_start, grad_weight_row_stride, rows)
            columns_data = emit.data(13)
            tap_columns = [builder.load(builder.gep(columns_data, [emit.constant(t)]))
                           for t in range(taps)]
            for r, row in enumerate(weight_rows):
                for t in range(taps):
                    total = emit.lane_sum(builder.load(accumulators[r][t]))
                    address = builder.gep(row, [tap_columns[t]])
                    builder.store(builder.fadd(builder.load(address), total), address)
            return context.get_dummy_value()

        return signature, codegen

    return reduce_tile


def _build_outer_tile(rows, taps):
    """An intrinsic ``outer_tile(src, src_start, src_line_stride, src_pixel_stride, offsets,
    grad, grad_start, grad_row_stride, grad_line_stride, lines, pixels, grad_weight,
    grad_weight_start, grad_weight_row_stride)`` adding

        sum_{i < lines, j < pixels}
            grad[grad_start + r * grad_row_stride + i * grad_line_stride + j]
            * src[src_start + i * src_line_stride + offsets[t] + j * src_pixel_stride + lane]

    to ``grad_weight[grad_weight_start + r * grad_weight_row_stride + t * LANES + lane]`` for
    ``r < rows``, ``t < taps`` and every ``lane < LANES``: the weight-gradient tile of the
    channel-blocked layout, where the LANES input channels of a pixel are one vector. Per pixel
    it broadcasts ``rows`` gradient values and loads ``taps`` input vectors for ``rows * taps``
    FMAs into vector accumulators whose lanes are channels, so, unlike ``reduce_tile``, no sum
    across lanes is needed at the end. The sum runs over lines, then pixels, in order.
    """
    @intrinsic
    def outer_tile(typingctx, src, src_start, src_line_stride, src_pixel_stride, offsets, grad,
                   grad_start, grad_row_stride, grad_line_stride, lines, pixels, grad_weight,
                   grad_weight_start, grad_weight_row_stride):
        index = types.int64
        signature = types.void(src, index, index, index, offsets, grad, index, index, index,
                               index, index, grad_weight, index, index)

        def codegen(context, builder, signature, args):
            (_, src_start, src_line_stride, src_pixel_stride, _, _, grad_start, grad_row_stride,
             grad_line_stride, lines, pixels, _, grad_weight_start, grad_weight_row_stride) = args
            emit = _Emitter(context, builder, signature, args)
            offsets_data = emit.data(4)
            tap_offsets = [builder.load(builder.gep(offsets_data, [emit.constant(t)]))
                           for t in range(taps)]
            accumulators = emit.accumulators(rows, taps)
            with emit.loop(lines) as line:
                src_line = builder.gep(emit.data(0), [builder.add(
                    src_start, builder.mul(line, src_line_stride))])
                tap_sources = [builder.gep(src_line, [offset]) for offset in tap_offsets]
                grad_rows = emit.rows(5, builder.add(grad_start, builder.mul(
                    line, grad_line_stride)), grad_row_stride, rows)
                with emit.loop(pixels) as pixel:
                    src_pixel = builder.mul(pixel, src_pixel_stride)
                    grads = [emit.broadcast(builder.load(builder.gep(row, [pixel])))
                             for row in grad_rows]
                    inputs = [emit.load_vector(base, src_pixel) for base in tap_sources]
                    for r in range(rows):
                        for t in range(taps):
                            emit.accumulate(accumulators[r][t], grads[r], inputs[t])
            weight_rows = emit.rows(11, grad_weight_start, grad_weight_row_stride, rows)
            for r, row in enumerate(weight_rows):
                for t in range(taps):
                    total = builder.fadd(emit.load_vector(row, t * emit.lanes),
                                         builder.load(accumulators[r][t]))
                    emit.store_vector(total, row, t * emit.lanes)
            return context.get_dummy_value()

        return signature, codegen

    return outer_tile


def _python_outer_tile(rows, taps):
    """``_build_outer_tile``'s computation in NumPy, for runs with NUMBA_DISABLE_JIT."""
    def outer_tile(src, src_start, src_line_stride, src_pixel_stride, offsets, grad, grad_start,
                   grad_row_stride, grad_line_stride, lines, pixels, grad_weight,
                   grad_weight_start, grad_weight_row_stride):
        lanes = VECTOR_BYTES // src.itemsize
        for r in range(rows):
            for t in range(taps):
                target = grad_weight_start + r * grad_weight_row_stride + t * lanes
                _check_range(grad_weight, target, target + lanes)
                for i in range(lines):
                    grad_line = grad_start + r * grad_row_stride + i * grad_line_stride
                    _check_range(grad, grad_line, grad_line + pixels)
                    if pixels == 0:
                        continue
                    first = src_start + i * src_line_stride + offsets[t]
                    last = first + (pixels - 1) * src_pixel_stride
                    _check_range(src, first, last + lanes)
                    inputs = src[first:last + lanes].copy()
                    window = np.lib.stride_tricks.as_strided(
                        inputs, (pixels, lanes), (src_pixel_stride * src.itemsize, src.itemsize))
                    grads = grad[grad_line:grad_line + pixels]
                    grad_weight[target:target + lanes] += grads @ window
    return outer_tile


def _python_reduce_tile(rows, taps):
    """``_build_reduce_tile``'s computation in NumPy, for runs with NUMBA_DISABLE_JIT."""
    def reduce_tile(src, src_start, src_image_stride, offsets, grad, grad_start,
                    grad_row_stride, grad_image_stride, images, vectors, grad_weight,
                    grad_weight_start, grad_weight_row_stride, columns):
        width = vectors * (VECTOR_BYTES // src.itemsize)
        for r in range(rows):
            for t in range(taps):
                position = grad_weight_start + r * grad_weight_row_stride + columns[t]
                _check_range(grad_weight, position, position + 1)
                for n in range(images):
                    grad_row = grad_start + r * grad_row_stride + n * grad_image_stride
                    _check_range(grad, grad_row, grad_row + width)
                    start = src_start + n * src_image_stride + offsets[t]
                    _check_range(src, start, start + width)
                    grad_weight[position] += np.dot(grad[grad_row:grad_row + width],
                                                    src[start:start + width])
    return reduce_tile


def _check_range(array, start, stop):
    """The IR tiles read and write without bounds checks; their NumPy twins check."""
    if start < 0 or stop > array.shape[0]:
        raise IndexError(f"tile range [{start}, {stop}) outside [0, {array.shape[0]})")


def _python_tile(rows, vectors):
    """The same computation in NumPy, for runs with NUMBA_DISABLE_JIT."""
    def tile(src, src_start, offsets, weight, weight_start, weight_row_stride, out, out_start,
             out_row_stride, taps, accumulate):
        width = vectors * (VECTOR_BYTES // src.itemsize)

        for r in range(rows):
            weight_row = weight_start + r * weight_row_stride
            _check_range(weight, weight_row, weight_row + taps)
            out_row = out_start + r * out_row_stride
            _check_range(out, out_row, out_row + width)
            total = (out[out_row:out_row + width].copy() if accumulate
                     else np.zeros(width, dtype=out.dtype))
            for k in range(taps):
                start = src_start + offsets[k]
                _check_range(src, start, start + width)
                total += src[start:start + width] * weight[weight_row + k]
            out[out_row:out_row + width] = total
    return tile


_build = _python_tile if config.DISABLE_JIT else _build_tile


@intrinsic
def _inline_into_callers(typingctx):
    """Marks the function it is lowered in ``alwaysinline``: Numba compiles that function on
    its own, and LLVM still inlines it wherever a kernel linked with it calls it."""
    def codegen(context, builder, signature, args):
        builder.function.attributes.add("alwaysinline")
        return context.get_dummy_value()
    return types.none(), codegen


def _literal_dispatch(tiles, arguments, separate=False):
    """A ``dispatch(key, *arguments)``, inlined into its callers, that calls ``tiles[key]``:
    each tile has a literal shape (LLVM must know the number of accumulators), and the branch
    picks one at run time. Generated, so that every runner below is the same few lines; keys
    are small ints.

    ``separate``: Numba compiles the dispatch as a function of its own, typed and lowered once,
    and LLVM inlines it (``_inline_into_callers``), so the machine code is the same. Inlined in
    Numba's IR, its tiles were typed twice and copied through the parfor passes of every
    parallel kernel calling it: the 14 broadcast tiles cost ``blocked_correlate`` about 1 s of
    its 3.6-4.5 s cold compile. Called without LLVM's inlining, the blocked passes ran 1-2%
    slower (a call per tile). The other dispatches, of 6 tiles or 3, compiled no faster
    separately."""
    names = ", ".join(arguments)
    lines = [f"def dispatch(key, {names}):"]
    if separate and not config.DISABLE_JIT:
        lines.append("    _inline_into_callers()")
    for number, key in enumerate(tiles):
        lines.append(f"    {'if' if number == 0 else 'elif'} key == {int(key)}:")
        lines.append(f"        tile_{number}({names})")
    namespace = {f"tile_{number}": tile for number, tile in enumerate(tiles.values())}
    namespace["_inline_into_callers"] = _inline_into_callers
    exec("\n".join(lines), namespace)  # noqa: S102 - source generated above, no user input
    return njit(inline="never" if separate else "always")(namespace["dispatch"])


def _build_runner(rows):
    """``run_tile(vectors, src, src_start, offsets, weight, weight_start, weight_row_stride,
    out, out_start, out_row_stride, accumulate)``: the tile of ``rows`` x ``vectors``
    (1..VECTORS), over all ``offsets.shape[0]`` taps."""
    dispatch = _literal_dispatch(
        {vectors: _build(rows, vectors) for vectors in range(VECTORS, 0, -1)},
        ("src", "src_start", "offsets", "weight", "weight_start", "weight_row_stride", "out",
         "out_start", "out_row_stride", "taps", "accumulate"))

    @njit(inline="always")
    def run_tile(vectors, src, src_start, offsets, weight, weight_start, weight_row_stride, out,
                 out_start, out_row_stride, accumulate):
        dispatch(vectors, src, src_start, offsets, weight, weight_start, weight_row_stride, out,
                 out_start, out_row_stride, offsets.shape[0], accumulate)

    return run_tile


run_tile_4_rows = _build_runner(ROWS)
run_tile_1_row = _build_runner(1)


_build_reduce = _python_reduce_tile if config.DISABLE_JIT else _build_reduce_tile
_REDUCE_ARGUMENTS = ("src", "src_start", "src_image_stride", "offsets", "grad", "grad_start",
                     "grad_row_stride", "grad_image_stride", "images", "vectors", "grad_weight",
                     "grad_weight_start", "grad_weight_row_stride", "columns")
# The weight-gradient tile of ROWS rows x ``taps`` (6, 4 or 2) taps: the driver's tap ranges are
# multiples of TAP_TILE = 4 cut into REDUCE_TAPS (6 or 2), so no other count occurs.
run_reduce_tile_4_rows = _literal_dispatch(
    {taps: _build_reduce(ROWS, taps) for taps in (6, 4, 2)}, _REDUCE_ARGUMENTS)


_build_outer = _python_outer_tile if config.DISABLE_JIT else _build_outer_tile
# Taps per outer tile: OUTER_TAPS, and 4 or 2 for the rest (the driver pads the taps to an even
# count). With AVX-512, 4 x 6 accumulators, 4 broadcasts and 6 inputs fit 32 registers; with 16
# registers, 4 x 2 + 4 + 2 do.
OUTER_TAPS = REDUCE_TAPS
_OUTER_ARGUMENTS = ("src", "src_start", "src_line_stride", "src_pixel_stride", "offsets",
                    "grad", "grad_start", "grad_row_stride", "grad_line_stride", "lines",
                    "pixels", "grad_weight", "grad_weight_start", "grad_weight_row_stride")
_outer_by_rows = {rows: _literal_dispatch({taps: _build_outer(rows, taps) for taps in (6, 4, 2)},
                                          _OUTER_ARGUMENTS) for rows in (ROWS, 1)}
_run_outer_4_rows, _run_outer_1_row = _outer_by_rows[ROWS], _outer_by_rows[1]


@njit(inline="always")
def run_outer_tile(rows, taps, src, src_start, src_line_stride, src_pixel_stride, offsets, grad,
                   grad_start, grad_row_stride, grad_line_stride, lines, pixels, grad_weight,
                   grad_weight_start, grad_weight_row_stride):
    """The channel-blocked weight-gradient tile of ``rows`` (ROWS or 1) x ``taps`` (6, 4 or 2)
    taps."""
    if rows == ROWS:
        _run_outer_4_rows(taps, src, src_start, src_line_stride, src_pixel_stride, offsets,
                          grad, grad_start, grad_row_stride, grad_line_stride, lines, pixels,
                          grad_weight, grad_weight_start, grad_weight_row_stride)
    else:
        _run_outer_1_row(taps, src, src_start, src_line_stride, src_pixel_stride, offsets, grad,
                         grad_start, grad_row_stride, grad_line_stride, lines, pixels,
                         grad_weight, grad_weight_start, grad_weight_row_stride)


# ---------------------------------------------------------------------------------------------
# The channel-blocked correlation: pixels x vectors of output channels, broadcasting the input
# ---------------------------------------------------------------------------------------------

# Output pixels per broadcast tile, with up to 2 vectors of output channels: 2 x 14 accumulators,
# 2 weight vectors and a broadcast fit 32 registers (2 x 6 + 3 fit 16).
BROADCAST_PIXELS = 14 if VECTOR_BYTES == 64 else 6
BROADCAST_VECTORS = 2


def _build_broadcast_tile(pixels, vectors):
    """An intrinsic ``broadcast_tile(src, src_start, offsets, weight, weight_start,
    weight_vector_stride, out, out_start, out_vector_stride, terms)`` setting

        out[out_start + v * out_vector_stride + j * LANES + lane] =
            sum_{t < terms}  src[src_start + offsets[t] + j * LANES]
                             * weight[weight_start + v * weight_vector_stride + t * LANES + lane]

    for ``v < vectors``, ``j < pixels`` and every ``lane < LANES``, summed over ``t`` in order,
    one FMA per term: the correlation of the channel-blocked layout, whose vector lanes are
    LANES output channels. A term is one input channel at one tap; per term the tile loads
    ``vectors`` weight vectors and broadcasts ``pixels`` input values, for ``pixels * vectors``
    FMAs. The pixels are consecutive vectors, so every broadcast address is the term's offset
    plus a constant: with a run-time pixel stride their pointers did not fit the 16 general
    registers (196 instead of 332 GFLOP/s on res14). A column-strided correlation reads an input
    whose lines are stored by stride phase (``layout._pack_channel_line``) instead.
    """
    @intrinsic
    def broadcast_tile(typingctx, src, src_start, offsets, weight, weight_start,
                       weight_vector_stride, out, out_start, out_vector_stride, terms):
        index = types.int64
        signature = types.void(src, index, offsets, weight, index, index, out, index, index,
                               index)

        def codegen(context, builder, signature, args):
            (_, src_start, _, _, weight_start, weight_vector_stride, _, out_start,
             out_vector_stride, terms) = args
            emit = _Emitter(context, builder, signature, args)
            lanes = emit.lanes
            src_tile = builder.gep(emit.data(0), [src_start])
            offsets_data = emit.data(2)
            weight_rows = emit.rows(3, weight_start, weight_vector_stride, vectors)
            out_rows = emit.rows(6, out_start, out_vector_stride, vectors)
            accumulators = emit.accumulators(vectors, pixels)
            with emit.loop(terms) as term:
                term_src = builder.gep(src_tile, [builder.load(builder.gep(offsets_data,
                                                                           [term]))])
                weights = [emit.load_vector(row, builder.mul(term, emit.constant(lanes)))
                           for row in weight_rows]
                for j in range(pixels):
                    value = emit.broadcast(builder.load(builder.gep(
                        term_src, [emit.constant(j * lanes)])))
                    for v in range(vectors):
                        emit.accumulate(accumulators[v][j], weights[v], value)
            for v, out_row in enumerate(out_rows):
                for j in range(pixels):
                    emit.store_vector(builder.load(accumulators[v][j]), out_row, j * lanes)
            return context.get_dummy_value()

        return signature, codegen

    return broadcast_tile


def _python_broadcast_tile(pixels, vectors):
    """``_build_broadcast_tile``'s computation in NumPy, for runs with NUMBA_DISABLE_JIT."""
    def broadcast_tile(src, src_start, offsets, weight, weight_start, weight_vector_stride, out,
                       out_start, out_vector_stride, terms):
        lanes = VECTOR_BYTES // src.itemsize
        for v in range(vectors):
            row = weight_start + v * weight_vector_stride
            _check_range(weight, row, row + terms * lanes)
            matrix = weight[row:row + terms * lanes].reshape(terms, lanes)
            target = out_start + v * out_vector_stride
            _check_range(out, target, target + pixels * lanes)
            for j in range(pixels):
                reads = src_start + offsets[:terms] + j * lanes
                if terms:
                    _check_range(src, reads.min(), reads.max() + 1)
                out[target + j * lanes:target + (j + 1) * lanes] = src[reads] @ matrix
    return broadcast_tile


_build_broadcast = _python_broadcast_tile if config.DISABLE_JIT else _build_broadcast_tile


def _build_broadcast_runner():
    """``run_broadcast_tile(vectors, pixels, src, src_start, offsets, weight, weight_start,
    weight_vector_stride, out, out_start, out_vector_stride, terms)``: the broadcast tile of
    ``vectors`` (1 or BROADCAST_VECTORS) x ``pixels`` (1..BROADCAST_PIXELS)."""
    arguments = ("src", "src_start", "offsets", "weight", "weight_start",
                 "weight_vector_stride", "out", "out_start", "out_vector_stride", "terms")
    by_pixels = [_literal_dispatch({pixels: _build_broadcast(pixels, vectors)
                                    for pixels in range(BROADCAST_PIXELS, 0, -1)}, arguments,
                                   separate=True)
                 for vectors in (1, BROADCAST_VECTORS)]
    one_vector, two_vectors = by_pixels

    @njit(inline="always")
    def run_broadcast_tile(vectors, pixels, src, src_start, offsets, weight, weight_start,
                           weight_vector_stride, out, out_start, out_vector_stride, terms):
        if vectors == BROADCAST_VECTORS:
            two_vectors(pixels, src, src_start, offsets, weight, weight_start,
                        weight_vector_stride, out, out_start, out_vector_stride, terms)
        else:
            one_vector(pixels, src, src_start, offsets, weight, weight_start,
                       weight_vector_stride, out, out_start, out_vector_stride, terms)

    return run_broadcast_tile


run_broadcast_tile = _build_broadcast_runner()
