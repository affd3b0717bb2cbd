"""The correlation micro-kernel, written in LLVM IR: a tile of output rows x pixel vectors whose
accumulators live in registers for the whole reduction over the taps.

    out[out_start + r * out_row_stride + p] = sum_k  src[src_start + offsets[k] + p]
                                                     * weight[weight_start + r * weight_row_stride + k]

for ``r < rows`` and ``p < vectors * LANES`` (``k < taps``). The sum runs over ``k`` in order,
one fused multiply-add per term, starting from zero (the result is written, not accumulated).

Why IR: Numba has no vector types, and LLVM's loop vectoriser only vectorises the innermost
loop. Written in Python the pixel loop must be innermost, so the partial sums of a tile go
through memory on every tap (the first kernels did: 4 loads and 4 stores per 16 FMAs, stalling
at ~55% of the FMA peak). Here the tap loop is the loop, and ``rows * vectors`` vector
accumulators stay in registers across it: per tap, ``vectors`` input loads and ``rows`` weight
broadcasts feed ``rows * vectors`` FMAs. On AVX-512 (32 vector registers) the tile is 4 x 6
zmm (24 accumulators, 96 float32 pixels); with 16 vector registers it is 4 x 3.

The tile functions are Numba intrinsics, inlined into the ``@njit(parallel=True)`` drivers of
``conv2d.py`` and cached with them. Under ``NUMBA_DISABLE_JIT`` (the coverage run) they are
replaced by a NumPy implementation of the formula above.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

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


def _build_tile(rows, vectors):
    """An intrinsic ``tile(src, src_start, offsets, weight, weight_start, weight_row_stride, out,
    out_start, out_row_stride, taps)`` computing the module docstring's formula; the arrays are
    1-D and contiguous, all starts and strides int64 element counts."""
    @intrinsic
    def tile(typingctx, src, src_start, offsets, weight, weight_start, weight_row_stride, out,
             out_start, out_row_stride, taps):
        index = types.int64
        signature = types.void(src, index, offsets, weight, index, index, out, index, index, index)

        def codegen(context, builder, signature, args):
            (src_array, src_start, offsets_array, weight_array, weight_start, weight_row_stride,
             out_array, out_start, out_row_stride, taps) = args
            array_types = signature.args
            dtype = array_types[0].dtype
            scalar = context.get_value_type(dtype)
            element_bytes = 4 if dtype == types.float32 else 8
            lanes = VECTOR_BYTES // element_bytes
            vector = ir.VectorType(scalar, lanes)
            int64 = ir.IntType(64)

            def data(position):
                array = context.make_array(array_types[position])
                return array(context, builder, args[position]).data

            def vector_at(base, offset):
                address = builder.gep(base, [ir.Constant(int64, offset)])
                return builder.bitcast(address, vector.as_pointer())

            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector] * 3),
                f"llvm.fma.v{lanes}f{element_bytes * 8}")
            src_tile = builder.gep(data(0), [src_start])
            offsets_data = data(2)
            weight_rows = [builder.gep(data(3), [builder.add(
                weight_start, builder.mul(weight_row_stride, ir.Constant(int64, r)))])
                for r in range(rows)]
            # allocas in the entry block: LLVM's SROA promotes them to registers
            accumulators = [[cgutils.alloca_once(builder, vector) for _ in range(vectors)]
                            for _ in range(rows)]
            for row in accumulators:
                for slot in row:
                    builder.store(ir.Constant(vector, None), slot)
            undefined = ir.Constant(vector, ir.Undefined)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            with cgutils.for_range(builder, taps) as loop:
                tap = loop.index
                tap_src = builder.gep(src_tile, [builder.load(builder.gep(offsets_data, [tap]))])
                inputs = [builder.load(vector_at(tap_src, v * lanes), align=element_bytes)
                          for v in range(vectors)]
                for r in range(rows):
                    weight_value = builder.load(builder.gep(weight_rows[r], [tap]))
                    broadcast = builder.shuffle_vector(
                        builder.insert_element(undefined, weight_value,
                                               ir.Constant(ir.IntType(32), 0)),
                        undefined, splat)
                    for v in range(vectors):
                        slot = accumulators[r][v]
                        builder.store(builder.call(fma, [inputs[v], broadcast,
                                                         builder.load(slot)]), slot)
            out_data = data(6)
            for r in range(rows):
                out_row = builder.gep(out_data, [builder.add(
                    out_start, builder.mul(out_row_stride, ir.Constant(int64, r)))])
                for v in range(vectors):
                    builder.store(builder.load(accumulators[r][v]),
                                  vector_at(out_row, v * lanes), align=element_bytes)
            return context.get_dummy_value()

        return signature, codegen

    return tile


def _python_tile(rows, vectors):
    """The same computation in NumPy, for runs with NUMBA_DISABLE_JIT."""
    def tile(src, src_start, offsets, weight, weight_start, weight_row_stride, out, out_start,
             out_row_stride, taps):
        width = vectors * (VECTOR_BYTES // src.itemsize)

        def check(array, start, stop):  # the IR tile reads and writes without bounds checks
            if start < 0 or stop > array.shape[0]:
                raise IndexError(f"tile range [{start}, {stop}) outside [0, {array.shape[0]})")

        for r in range(rows):
            weight_row = weight_start + r * weight_row_stride
            check(weight, weight_row, weight_row + taps)
            total = np.zeros(width, dtype=out.dtype)
            for k in range(taps):
                start = src_start + offsets[k]
                check(src, start, start + width)
                total += src[start:start + width] * weight[weight_row + k]
            out_row = out_start + r * out_row_stride
            check(out, out_row, out_row + width)
            out[out_row:out_row + width] = total
    return tile


_build = _python_tile if config.DISABLE_JIT else _build_tile


def _build_runner(rows):
    """``run_tile(vectors, src, src_start, offsets, weight, weight_start, weight_row_stride,
    out, out_start, out_row_stride)``: the tile of ``rows`` x ``vectors`` (1..6), over all
    ``offsets.shape[0]`` taps. Each width is its own literal tile (the accumulators' count must
    be known to LLVM); the branch picks one at run time."""
    tile_1, tile_2, tile_3, tile_4, tile_5, tile_6 = (_build(rows, v) for v in range(1, 7))

    @njit(inline="always")
    def run_tile(vectors, src, src_start, offsets, weight, weight_start, weight_row_stride, out,
                 out_start, out_row_stride):
        taps = offsets.shape[0]
        arguments = (src, src_start, offsets, weight, weight_start, weight_row_stride, out,
                     out_start, out_row_stride, taps)
        if vectors == 6:
            tile_6(*arguments)
        elif vectors == 5:
            tile_5(*arguments)
        elif vectors == 4:
            tile_4(*arguments)
        elif vectors == 3:
            tile_3(*arguments)
        elif vectors == 2:
            tile_2(*arguments)
        else:
            tile_1(*arguments)

    return run_tile


run_tile_4_rows = _build_runner(ROWS)
run_tile_1_row = _build_runner(1)
