"""The correlation kernels (``_kernels/conv2d.py``) and their IR register tiles, against the
formula in NumPy, on every tile width and remainder; plus the NUMBA_BOUNDSCHECK range check,
and the channel-blocked weight gradient with its layout kernels.

The convolution tests reach these kernels through the plans; here the arguments are drawn
directly, so every tile width (1..VECTORS vectors) and both row counts run on random taps.
"""
import re

import numba
import numpy as np
import pytest

from numba_cnn._kernels.conv2d import (_check_reads, blocked_correlate, blocked_grad_weight,
                                      correlate, correlate_grad_weight)
from numba_cnn._conv_plan import Grid, phase_crops
from numba_cnn._kernels.layout import (gather_blocked_weights, pack_channel_blocks,
                                       pack_channel_image, pack_grid_image, pack_phases,
                                       unblock_grad_weight, unblock_output, unpack_phases)
from numba_cnn._kernels.register_tile import (BROADCAST_PIXELS, BROADCAST_VECTORS, VECTOR_BYTES,
                                              VECTORS, run_broadcast_tile)


def correlation_by_formula(src, src_image_stride, offsets, weight, out_shape, phase_taps=None,
                           phase_pixels=None):
    """out[r, n, P_p + q] = sum_k src[n * stride + offsets[group(r), k] + q] * weight[r, k],
    the sum over phase p's taps k, for its pixels q (from P_p = phase_pixels[p] on), float64;
    by default one phase of all taps and pixels."""
    rows, batch, length = out_shape
    if phase_taps is None:
        phase_taps, phase_pixels = [0, offsets.shape[1]], [0, length]
    rows_per_group = rows // offsets.shape[0]
    out = np.zeros(out_shape)
    for p in range(len(phase_taps) - 1):
        first, pixels = phase_pixels[p], phase_pixels[p + 1] - phase_pixels[p]
        for r in range(rows):
            for n in range(batch):
                for k in range(phase_taps[p], phase_taps[p + 1]):
                    start = n * src_image_stride + offsets[r // rows_per_group, k]
                    out[r, n, first:first + pixels] += (src[start:start + pixels].astype(
                        np.float64) * weight[r, k])
    return out


def random_correlation(rng, dtype, rows, groups, vectors, phases=1):
    """(src, image_stride, offsets, weight, out_shape, phase_taps, phase_pixels): 8 taps per
    phase with ``phases == 1``; else phases of 4 and 8 taps by turns, and of ``vectors`` and
    ``vectors + 1`` vectors of pixels."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    phase_taps = np.cumsum([0] + [8 if phases == 1 or p % 2 else 4 for p in range(phases)])
    phase_pixels = np.cumsum([0] + [(vectors + p % 2) * lanes for p in range(phases)])
    batch, taps, length = 2, int(phase_taps[-1]), int(phase_pixels[-1])
    image_stride = 3 * length + 5
    src = rng.standard_normal(batch * image_stride + 2 * length).astype(dtype)
    offsets = rng.integers(0, image_stride, size=(groups, taps)).astype(np.int64)
    weight = rng.standard_normal((rows, taps)).astype(dtype)
    return (src, image_stride, offsets, weight, (rows, batch, length),
            phase_taps.astype(np.int64), phase_pixels.astype(np.int64))


# one phase: unpacking crops it (phase_table, first_rows of unpack_phases)
ONE_PHASE = (np.zeros((1, 1), dtype=np.int64), np.zeros(1, dtype=np.int64))


def run_correlation(src, image_stride, offsets, phase_taps, weight, out, phase_pixels,
                    tap_block, tiles_per_task, unpack=False, bias=None, dst=None, crops=None,
                    pack_src=None, packing=(0,) * 6):
    """``correlate`` with one tap block size for every phase, its other arguments typed as the
    library passes them (other types would compile another specialisation); with
    ``pack_src``, packing per thread into ``src``, a slot per thread."""
    dtype = src.dtype
    tap_blocks = np.full(phase_taps.size - 1, tap_block, dtype=np.int64)
    bias = np.zeros(0, dtype) if bias is None else bias
    dst = np.zeros((0, 0, 0, 0), dtype) if dst is None else dst
    crops = np.zeros((0, 7), dtype=np.int64) if crops is None else crops
    slot_images = np.zeros(0, dtype=np.int64)
    if pack_src is not None:
        slot_images = np.full(numba.get_num_threads() + 1, -1, dtype=np.int64)
    else:
        pack_src = np.zeros((0, 0, 0, 0), dtype)
    correlate(src, image_stride, offsets, phase_taps, weight, out, phase_pixels, tap_blocks,
              tiles_per_task, unpack, bias, dst, crops, pack_src, slot_images, packing)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vectors", range(1, 2 * VECTORS + 2))
@pytest.mark.parametrize("rows, groups", [(8, 2), (3, 3), (6, 2), (16, 1)],
                         ids=["4_row_tiles", "1_row_groups", "3_row_groups", "4_tiles"])
# all 8 taps at once, or blocks of 3 (3 + 3 + 2) or 5; 1, 2 or 3 row tiles per task
@pytest.mark.parametrize("tap_block, tiles_per_task", [(8, 1), (3, 2), (5, 3)])
def test_correlation_kernel_matches_formula(rows, groups, vectors, tap_block, tiles_per_task,
                                            dtype, rng):
    src, image_stride, offsets, weight, out_shape, phase_taps, phase_pixels = (
        random_correlation(rng, dtype, rows, groups, vectors))
    out = np.full(out_shape, np.nan, dtype=dtype)  # every position must be written
    run_correlation(src, image_stride, offsets, phase_taps, weight, out, phase_pixels,
                    tap_block, tiles_per_task)
    expected = correlation_by_formula(src, image_stride, offsets, weight, out_shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vectors", [1, VECTORS + 1])
@pytest.mark.parametrize("rows, groups", [(8, 2), (3, 3), (6, 2), (16, 1)],
                         ids=["4_row_tiles", "1_row_groups", "3_row_groups", "4_tiles"])
@pytest.mark.parametrize("tap_block, tiles_per_task", [(8, 1), (3, 2)])
def test_phases_of_a_correlation_match_formula(rows, groups, vectors, tap_block,
                                               tiles_per_task, dtype, rng):
    src, image_stride, offsets, weight, out_shape, phase_taps, phase_pixels = (
        random_correlation(rng, dtype, rows, groups, vectors, phases=3))
    out = np.full(out_shape, np.nan, dtype=dtype)
    run_correlation(src, image_stride, offsets, phase_taps, weight, out, phase_pixels,
                    tap_block, tiles_per_task)
    expected = correlation_by_formula(src, image_stride, offsets, weight, out_shape,
                                      phase_taps, phase_pixels)
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


def unpack_crop(rows, groups, length):
    """(filters, first_row, first_column, grid_w, height, width) of a crop of every row of
    ``length`` pixels: a group's last row is left out (it stands for a padding row) where the
    groups have several, and the crop keeps 1 or 2 of the grid's first rows and columns out."""
    rows_per_group = rows // groups
    filters = groups * (rows_per_group - 1 if rows_per_group > 1 else 1)
    grid_w, width, first_column = 5, 3, 1
    first_row = 1 if length >= 16 else 0
    height = (length - first_column - width) // grid_w - first_row + 1
    return filters, first_row, first_column, grid_w, height, width


def unpacking_slots(rows, groups, tiles_per_task, length, dtype):
    rows_per_task = tiles_per_task * (4 if (rows // groups) % 4 == 0 else 1)
    return np.full((numba.get_num_threads(), rows_per_task, length), np.nan, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vectors", [1, 2, VECTORS + 1])
@pytest.mark.parametrize("rows, groups", [(8, 2), (3, 3), (6, 2), (16, 1)],
                         ids=["4_row_tiles", "1_row_groups", "3_row_groups", "4_tiles"])
@pytest.mark.parametrize("tap_block, tiles_per_task", [(8, 1), (3, 2), (5, 3)])
def test_unpacking_correlation_matches_crop_formula(rows, groups, vectors, tap_block,
                                                   tiles_per_task, dtype, rng):
    src, image_stride, offsets, weight, out_shape, phase_taps, phase_pixels = (
        random_correlation(rng, dtype, rows, groups, vectors))
    _, batch, length = out_shape
    filters, first_row, first_column, grid_w, height, width = unpack_crop(rows, groups, length)
    rows_per_group, filters_per_group = rows // groups, filters // groups
    bias = rng.standard_normal(filters).astype(dtype)
    dst = np.full((batch, filters, height, width), np.nan, dtype)
    crops = phase_crops(*ONE_PHASE[:1], phase_pixels, ONE_PHASE[1], grid_w,
                        (first_row, first_column), (height, width))
    run_correlation(src, image_stride, offsets, phase_taps, weight,
                    unpacking_slots(rows, groups, tiles_per_task, length, dtype), phase_pixels,
                    tap_block, tiles_per_task, True, bias, dst, crops)
    sums = correlation_by_formula(src, image_stride, offsets, weight, out_shape)
    f = np.arange(filters)
    row = f // filters_per_group * rows_per_group + f % filters_per_group
    pixels = ((first_row + np.arange(height))[:, None] * grid_w + first_column
              + np.arange(width)[None, :])
    expected = sums[row][:, :, pixels].transpose(1, 0, 2, 3) + bias[:, None, None]
    np.testing.assert_allclose(dst, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, groups", [(8, 2), (3, 3), (16, 1)],
                         ids=["4_row_tiles", "1_row_groups", "4_tiles"])
@pytest.mark.parametrize("tap_block, tiles_per_task", [(8, 1), (3, 2)])
# a stride-3 x 2 layout of 3 phases (two (row, column) phases have no taps), padded (1, 2)
def test_unpacking_phases_match_the_unpack_phases_formula(rows, groups, tap_block,
                                                         tiles_per_task, dtype, rng):
    src, image_stride, offsets, weight, out_shape, phase_taps, phase_pixels = (
        random_correlation(rng, dtype, rows, groups, 2, phases=3))
    _, batch, length = out_shape
    filters, *_ = unpack_crop(rows, groups, length)
    rows_per_group, filters_per_group = rows // groups, filters // groups
    phase_table = np.array([[0, -1], [1, 2], [-1, -1]], dtype=np.int64)
    first_rows = np.array([1, 0, 0], dtype=np.int64)
    # (each phase reads inside its own pixels: up to pixel 10, 15 and 14 of its 16, 24 and 16
    # float64 pixels)
    (sh, sw), grid_w, (pad_top, pad_left) = phase_table.shape, 5, (1, 2)
    dst_shape = (batch, filters, 7, 9)
    bias = rng.standard_normal(filters).astype(dtype)
    crops = phase_crops(phase_table, phase_pixels, first_rows, grid_w, (pad_top, pad_left),
                        dst_shape[2:])
    grid = np.empty(out_shape, dtype)
    run_correlation(src, image_stride, offsets, phase_taps, weight, grid, phase_pixels,
                    tap_block, tiles_per_task)
    # unpack_phases' formula, position by position: (ih, iw) with ih + pad_top = i * sh + a,
    # iw + pad_left = j * sw + b takes phase_table[a, b]'s grid pixel (i - first_row, j)
    expected = np.empty(dst_shape, dtype)
    for f in range(filters):
        row = f // filters_per_group * rows_per_group + f % filters_per_group
        for ih in range(dst_shape[2]):
            for iw in range(dst_shape[3]):
                (i, a), (j, b) = divmod(ih + pad_top, sh), divmod(iw + pad_left, sw)
                phase = phase_table[a, b]
                expected[:, f, ih, iw] = bias[f] + (0 if phase < 0 else grid[
                    row, :, phase_pixels[phase] + (i - first_rows[phase]) * grid_w + j])
    unpacked = np.full(dst_shape, np.nan, dtype)
    unpack_phases(grid.reshape(-1), length, crops, filters_per_group, rows_per_group, bias,
                  unpacked)
    np.testing.assert_array_equal(unpacked, expected)
    dst = np.full(dst_shape, np.nan, dtype)
    run_correlation(src, image_stride, offsets, phase_taps, weight,
                    unpacking_slots(rows, groups, tiles_per_task, length, dtype), phase_pixels,
                    tap_block, tiles_per_task, True, bias, dst, crops)
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, groups", [(8, 2), (3, 3)], ids=["4_row_tiles", "1_row_groups"])
@pytest.mark.parametrize("batch", [1, 5])
def test_packing_per_thread_matches_the_packed_grid_formula(rows, groups, batch, dtype, rng):
    # A (batch, 6, 5, 7) source, packed with margins (2, 1) into 8 x 10 planes of 96 pixels
    # (spare ones zero), read by 4 + 8 taps at random places of an image's planes; the tasks
    # packing their images into per-thread slots must give what the whole packed grid gives.
    channels, height, width, grid_h, grid_w, image_len, read_span = 6, 5, 7, 8, 10, 96, 130
    source = rng.standard_normal((batch, channels, height, width)).astype(dtype)
    packing = (channels, 2, 1, grid_h, grid_w, image_len)
    grid = Grid(channels, 1, batch, image_len, read_span, dtype)
    pack_phases(source, grid.data, channels, grid.plane_strides, channels, channels, 2, 1, 1, 1,
                grid_h, grid_w, image_len)
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    phase_taps = np.array([0, 4, 12], dtype=np.int64)
    phase_pixels = np.array([0, 2 * lanes, 3 * lanes], dtype=np.int64)
    offsets = rng.integers(0, channels * image_len, size=(groups, 12)).astype(np.int64)
    weight = rng.standard_normal((rows, 12)).astype(dtype)
    filters, *_ = unpack_crop(rows, groups, 2 * lanes)
    bias = rng.standard_normal(filters).astype(dtype)
    crops = phase_crops(np.array([[0], [1]], dtype=np.int64), phase_pixels,
                        np.zeros(2, dtype=np.int64), 4, (0, 0), (3, 4))
    results = []
    for per_thread in (False, True):
        dst = np.full((batch, filters, 3, 4), np.nan, dtype)
        slots = Grid(channels, 1, numba.get_num_threads(), image_len, read_span, dtype)
        # NaN planes (zero tails): the tasks' packing must fill them
        slots.data.reshape(-1, slots.image_stride)[:, :channels * image_len] = np.nan
        run_correlation(slots.data if per_thread else grid.data, grid.image_stride, offsets,
                        phase_taps, weight, unpacking_slots(rows, groups, 1, 3 * lanes, dtype),
                        phase_pixels, 5, 1, True, bias, dst, crops,
                        source if per_thread else None, packing)
        results.append(dst)
    assert not np.isnan(results[0]).any()
    np.testing.assert_array_equal(results[1], results[0])


def grid_by_formula(src, n, stride, pads, grid_h, grid_w, image_len):
    """Image ``n``'s phase planes as the grid packers fill them, (rows, sh * sw, image_len):
    phase (a, b)'s pixel (i, j) holds ``src[n, row, i * sh + a - pad_top, j * sw + b -
    pad_left]`` where that lies in ``src``; padding and the spare pixels are zero."""
    rows, height, width = src.shape[1:]
    (stride_h, stride_w), (top, left) = stride, pads
    planes = np.zeros((rows, stride_h * stride_w, image_len), dtype=src.dtype)
    for a in range(stride_h):
        for b in range(stride_w):
            for i in range(grid_h):
                for j in range(grid_w):
                    ih, iw = i * stride_h + a - top, j * stride_w + b - left
                    if 0 <= ih < height and 0 <= iw < width:
                        planes[:, a * stride_w + b, i * grid_w + j] = src[n, :, ih, iw]
    return planes


# (top, left) pads: margins, none, crops (a transposed convolution's negative padding), a
# margin wider than the grid; grids that cover the source, and that end inside it
GRID_PADS = [(2, 1), (0, 0), (-1, -2), (1, 9)]
GRID_SHAPES = [(8, 10), (3, 4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [(1, 1), (2, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("pads", GRID_PADS)
@pytest.mark.parametrize("grid_shape", GRID_SHAPES)
def test_pack_phases_matches_the_grid_formula(stride, pads, grid_shape, dtype, rng):
    """Every plane (row, phase, image) where ``plane_strides`` puts it, NaN left between them."""
    batch, rows, height, width = 2, 3, 5, 7
    grid_h, grid_w = grid_shape
    image_len = grid_h * grid_w + 3
    phases = stride[0] * stride[1]
    src = rng.standard_normal((batch, rows, height, width)).astype(dtype)
    # planes [row, phase, n] with a 2-element gap after each, so stray writes show
    plane_strides = (phases * batch * (image_len + 2), batch * (image_len + 2), image_len + 2)
    dst = np.full(rows * plane_strides[0] + 5, np.nan, dtype=dtype)
    pack_phases(src, dst, rows, plane_strides, rows, rows, *pads, *stride, grid_h, grid_w,
                image_len)
    planes = dst[:rows * plane_strides[0]].reshape(rows, phases, batch, image_len + 2)
    for n in range(batch):
        np.testing.assert_array_equal(planes[:, :, n, :image_len], grid_by_formula(
            src, n, stride, pads, grid_h, grid_w, image_len))
    assert np.isnan(planes[..., image_len:]).all() and np.isnan(dst[-5:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pads", GRID_PADS)
@pytest.mark.parametrize("grid_shape", GRID_SHAPES)
def test_pack_grid_image_matches_the_grid_formula(pads, grid_shape, dtype, rng):
    """One image's planes at stride 1 from ``image_start`` on, nothing written around them."""
    rows, height, width = 3, 5, 7
    grid_h, grid_w = grid_shape
    image_len = grid_h * grid_w + 3
    src = rng.standard_normal((2, rows, height, width)).astype(dtype)
    dst = np.full(rows * image_len + 9, np.nan, dtype=dtype)
    pack_grid_image(src, 1, dst, 4, rows, *pads, grid_h, grid_w, image_len)
    np.testing.assert_array_equal(dst[4:4 + rows * image_len], grid_by_formula(
        src, 1, (1, 1), pads, grid_h, grid_w, image_len).reshape(-1))
    assert np.isnan(dst[:4]).all() and np.isnan(dst[4 + rows * image_len:]).all()


def test_unpacking_correlation_refuses_slots_or_outputs_that_do_not_fit(rng):
    src, image_stride, offsets, weight, (_, batch, length), phase_taps, phase_pixels = (
        random_correlation(rng, np.float32, 8, 1, 2))
    bias = np.zeros(8, np.float32)
    threads = numba.get_num_threads()

    def run(slots_shape, dst_shape, tiles_per_task=1, pixels=phase_pixels, first_row=0):
        crops = phase_crops(*ONE_PHASE[:1], phase_pixels, ONE_PHASE[1], length,
                            (first_row, 0), dst_shape[2:])
        run_correlation(src, image_stride, offsets, phase_taps, weight,
                        np.empty(slots_shape, np.float32), pixels, 8, tiles_per_task, True,
                        bias, np.empty(dst_shape, np.float32), crops)

    run((threads, 4, length), (batch, 8, 1, length))  # fits
    with pytest.raises(ValueError, match="do not fit"):
        run((threads, 4, length), (batch, 8, 1, length), tiles_per_task=2)  # 8 rows per task
    with pytest.raises(ValueError, match="do not fit"):  # pixels past the scratch rows
        run((threads, 4, length), (batch, 8, 1, length), pixels=phase_pixels + 16)
    with pytest.raises(ValueError, match="do not fit"):  # a crop past the grid row
        run((threads, 4, length), (batch, 8, 1, length), first_row=1)
    with pytest.raises(ValueError, match="do not fit"):
        run((threads, 4, length), (batch, 9, 1, length))  # more filters than rows
    with pytest.raises(ValueError, match="fewer output slots"):
        run((0, 4, length), (batch, 8, 1, length))
    with pytest.raises(ValueError, match="packing per thread"):  # without output slots
        run_correlation(src, image_stride, offsets, phase_taps, weight,
                        np.empty((4, batch, length), np.float32), phase_pixels, 8, 1,
                        pack_src=np.zeros((batch, 1, 1, 1), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tap_block", [8, 3])  # tap blocks continue the sum from ``out``
def test_tile_sums_taps_in_order_with_one_fma_each(tap_block, dtype, rng):
    """The tile's documented rounding: out = fma(x_k, w_k, out) for k = 0, 1, ... from zero."""
    src, image_stride, offsets, weight, out_shape, phase_taps, phase_pixels = (
        random_correlation(rng, dtype, 4, 1, 2))
    out = np.empty(out_shape, dtype=dtype)
    run_correlation(src, image_stride, offsets, phase_taps, weight, out, phase_pixels,
                    tap_block, 1)
    expected = np.zeros(out_shape[2], dtype=np.float64)
    for k, offset in enumerate(offsets[0]):
        # an FMA rounds once: exact product + sum, rounded to dtype (float64 products of float32
        # are exact; for float64 the check is only as tight as this emulation)
        expected = (expected + src[offset:offset + out_shape[2]].astype(np.float64)
                    * weight[0, k]).astype(dtype).astype(np.float64)
    if dtype == np.float32:
        np.testing.assert_array_equal(out[0, 0], expected.astype(dtype))
    else:
        np.testing.assert_allclose(out[0, 0], expected, rtol=1e-14)


def test_range_check_catches_reads_past_the_input(rng):
    src, image_stride, offsets, weight, out_shape, _, _ = random_correlation(
        rng, np.float32, 4, 1, 1)
    _, batch, length = out_shape
    last_start = (batch - 1) * image_stride
    _check_reads(src, offsets, last_start, length)  # in range: silent
    offsets[0, 3] = src.shape[0] - last_start - length + 1
    with pytest.raises(IndexError, match="outside the packed input"):
        _check_reads(src, offsets, last_start, length)
    offsets[0, 3] = -1
    with pytest.raises(IndexError, match="outside the packed input"):
        _check_reads(src, offsets, last_start, length)


PIXEL_BLOCK = 2048  # the weight gradient's block in the tests


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("taps", [4, 8, 12, 20])  # tiles of 6 taps and the 2- and 4-tap rests
# blocks of several whole images (2048 // 48 = 42 images: two blocks for 50), one image, or an
# image in two or three parts
@pytest.mark.parametrize("batch, length", [(1, 16), (50, 48), (3, PIXEL_BLOCK + 512),
                                           (2, 3 * PIXEL_BLOCK - 16)])
@pytest.mark.parametrize("tiles_per_task, tap_splits", [(1, 1), (1, 3), (3, 2)])
def test_grad_weight_kernel_matches_formula(taps, batch, length, tiles_per_task, tap_splits,
                                            dtype, rng):
    rows, groups = 16, 2  # 4 row tiles: with 3 per task, the second task has one
    image_stride = 3 * length + 5
    src = rng.standard_normal(batch * image_stride).astype(dtype)
    offsets = rng.integers(0, 2 * length, size=(groups, taps)).astype(np.int64)
    grad = rng.standard_normal((rows, batch, length)).astype(dtype)
    columns = rng.permutation(taps).astype(np.int64)  # tap k's result goes to columns[k]
    grad_weight = np.full((rows, taps), np.nan, dtype=dtype)  # every entry must be written
    correlate_grad_weight(src, image_stride, offsets, columns, grad, grad_weight, PIXEL_BLOCK,
                          tiles_per_task, tap_splits)
    expected = np.empty((rows, taps))
    for r in range(rows):
        for k, offset in enumerate(offsets[r // (rows // groups)]):
            expected[r, columns[k]] = sum(
                grad[r, n].astype(np.float64) @ src[n * image_stride + offset:][:length]
                for n in range(batch))
    np.testing.assert_allclose(grad_weight, expected, rtol=1e-4 if dtype == np.float32 else 1e-11,
                               atol=1e-3 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# tiles of OUTER_TAPS taps and the 4- and 2-tap rests
@pytest.mark.parametrize("taps", [2, 4, 6, 10, 14])
# 4-row tiles and a 1-row rest, or single rows only
@pytest.mark.parametrize("rows", [9, 3])
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
# blocks of one line, of several (the last one partial), or of the whole output
@pytest.mark.parametrize("block_lines", [1, 2, 50])
@pytest.mark.parametrize("row_splits, tap_splits", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_blocked_grad_weight_kernel_matches_formula(taps, rows, stride, block_lines, row_splits,
                                                    tap_splits, dtype, rng):
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    batch, blocks, height, width = 3, 2, 9, 11
    out_height, out_width = 3, 4
    # the kernel packs src itself (as blocked_correlate), or reads it prepacked
    top, left = 1, 2
    src = rng.standard_normal((batch, 2 * lanes - 3, height - top, width - left + 1))
    src = src.astype(dtype)
    prepacked = block_lines == 2
    slots = batch if prepacked else numba.get_num_threads() + taps % 2
    packed = np.full((slots, blocks, height, width, lanes), np.nan, dtype=dtype)
    if prepacked:
        pack_channel_blocks(src, packed, top, left)
    slot_images = np.full(0 if prepacked else slots + 1, -1, dtype=np.int64)
    # taps read anywhere an output pixel's reads stay inside the image
    sh, sw = stride
    reach = ((out_height - 1) * sh * width + (out_width - 1) * sw + 1) * lanes
    offsets = rng.integers(0, blocks * height * width * lanes - reach, size=taps).astype(np.int64)
    grad = rng.standard_normal((batch, rows, out_height, out_width)).astype(dtype)
    parts = 1 + taps % 3  # the batch in 1, 2 (images 0 | 1, 2) or 3 parts
    # every entry is written
    partials = np.full((parts, rows, taps, lanes), np.nan, dtype=dtype)
    blocked_grad_weight(np.full_like(src, np.nan) if prepacked else src, top, left, packed,
                        slot_images, offsets, grad, partials, sh, sw, block_lines, row_splits,
                        tap_splits)
    expected = np.empty((parts, rows, taps, lanes))
    image = blocked_by_formula(src, lanes, top, left, height, width).reshape(batch, -1)
    i, j = np.meshgrid(np.arange(out_height), np.arange(out_width), indexing="ij")
    pixel_starts = ((i * sh * width + j * sw) * lanes).reshape(-1)
    for part in range(parts):
        images = slice(part * batch // parts, (part + 1) * batch // parts)
        for k, offset in enumerate(offsets):
            # (n, pixels, L)
            reads = image[images, (offset + pixel_starts)[:, None] + np.arange(lanes)]
            expected[part, :, k] = np.einsum("nrp,npl->rl",
                                             grad[images].reshape(-1, rows, i.size), reads)
    np.testing.assert_allclose(partials, expected, rtol=1e-4 if dtype == np.float32 else 1e-11,
                               atol=1e-4 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("parts", [1, 3])
# a partly filled last block; whole blocks, grad_weight in the first partial's place
@pytest.mark.parametrize("rest, in_place", [(3, False), (0, True)])
def test_unblock_grad_weight_sums_the_parts_in_order(parts, rest, in_place, rng):
    lanes = VECTOR_BYTES // 4
    blocks = 2
    filters, channels, kernel_h, kernel_w = 5, (blocks - 1) * lanes + (rest or lanes), 2, 3
    partials = rng.standard_normal((parts, filters, blocks * kernel_h * kernel_w, lanes))
    partials = partials.astype(np.float32)
    total = partials[0].copy()
    for part in partials[1:]:
        total += part  # float32, in order: the same rounding
    shape = (filters, channels, kernel_h, kernel_w)
    grad_weight = partials[0].reshape(shape) if in_place else np.full(shape, np.nan, np.float32)
    unblock_grad_weight(partials, grad_weight,
                        np.empty((numba.get_num_threads(), partials[0, 0].size), np.float32))
    # (f, b, kh, kw, lane) -> (f, b * lanes + lane, kh, kw), the channels >= C dropped
    expected = total.reshape(filters, blocks, kernel_h, kernel_w, lanes).transpose(0, 1, 4, 2, 3)
    expected = expected.reshape(filters, blocks * lanes, kernel_h, kernel_w)[:, :channels]
    np.testing.assert_array_equal(grad_weight, expected)


def test_unblock_grad_weight_refuses_too_few_scratch_rows(rng):
    partials = rng.standard_normal((1, 4, 9, VECTOR_BYTES // 4)).astype(np.float32)
    grad_weight = np.empty((4, VECTOR_BYTES // 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="scratch rows"):
        unblock_grad_weight(partials, grad_weight, np.empty((0, 9 * 16), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 16, 21])  # one partial block, whole blocks, a rest
# (top, bottom, left, right) pads; negative ones crop
@pytest.mark.parametrize("pads", [(1, 2, 3, 0), (0, 0, 0, 0), (-1, 2, -2, -1), (2, -3, 1, -4)])
# lines packed LANES columns at a time: fewer, exactly that many, and two vectors' worth and a
# rest (a lanes-independent width list: 16 float32 or 8 float64 lanes on AVX-512)
@pytest.mark.parametrize("width", [5, 8, 16, 37])
def test_pack_channel_blocks(channels, pads, width, dtype, rng):
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    height = 4
    src = rng.standard_normal((2, channels, height, width)).astype(dtype)
    blocks = -(-channels // lanes)
    top, bottom, left, right = pads
    padded_h, padded_w = height + top + bottom, width + left + right
    dst = np.full((2, blocks, padded_h, padded_w, lanes), np.nan, dtype=dtype)
    pack_channel_blocks(src, dst, top, left)
    np.testing.assert_array_equal(dst, blocked_by_formula(src, lanes, top, left, padded_h,
                                                          padded_w))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [3, 16, 37])
@pytest.mark.parametrize("column_phases", [1, 2, 3])
@pytest.mark.parametrize("left, width", [(2, 5), (0, 40), (-3, 41), (4, 33)])
def test_pack_channel_image_stores_columns_by_phase(channels, column_phases, left, width, dtype,
                                                    rng):
    """Image by image, lines in column phases: padded column c at pixel (c % P) * (W / P)
    + c // P of its line."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    height, top = 3, 1
    src = rng.standard_normal((2, channels, height, width)).astype(dtype)
    blocks = -(-channels // lanes)
    padded_h = height + 2
    padded_w = -(-(width + left + 1) // column_phases) * column_phases
    image_len = blocks * padded_h * padded_w * lanes
    dst = np.full(3 * image_len, np.nan, dtype=dtype)  # image 1 in the middle slot
    pack_channel_image(src, 1, dst, image_len, blocks, padded_h, padded_w, lanes, top, left,
                       column_phases)
    image = blocked_by_formula(src, lanes, top, left, padded_h, padded_w)[1]
    columns = np.arange(padded_w)
    pixels = columns % column_phases * (padded_w // column_phases) + columns // column_phases
    expected = np.empty_like(image)
    expected[:, :, pixels] = image
    assert np.isnan(dst[:image_len]).all() and np.isnan(dst[2 * image_len:]).all()
    np.testing.assert_array_equal(dst[image_len:2 * image_len], expected.reshape(-1))


def test_blocked_layout_kernels_refuse_lanes_of_another_vector_width():
    """The transposes compile in one vector's lanes: a layout of other lanes is refused (as
    would be a cached copy compiled for another width)."""
    lanes = VECTOR_BYTES // 4
    src = np.ones((2, lanes, 3, 3), np.float32)
    with pytest.raises(ValueError, match="one vector"):
        pack_channel_blocks(src, np.zeros((2, 2, 3, 3, lanes // 2), np.float32), 0, 0)
    with pytest.raises(ValueError, match="one vector"):
        unblock_output(np.ones((2, 2, 3, 3, lanes // 2), np.float32), np.zeros(lanes, np.float32),
                       np.zeros((2, lanes, 3, 3), np.float32), 0, 0, 1, 1)


def blocked_by_formula(src, lanes, top, left, padded_h, padded_w):
    """src (N, C, H, W) in the blocked layout (N, CB, padded_h, padded_w, lanes), zero-padded
    by ``top`` and ``left`` (negative: cropped) and zero in the channels >= C."""
    batch, channels, height, width = src.shape
    blocks = -(-channels // lanes)
    big = np.zeros((batch, blocks * lanes, height + padded_h + 8, width + padded_w + 8),
                   dtype=src.dtype)  # room for pads and crops of up to 4 on either side
    big[:, :channels, 4:4 + height, 4:4 + width] = src
    window = big[:, :, 4 - top:4 - top + padded_h, 4 - left:4 - left + padded_w]
    return window.reshape(batch, blocks, lanes, padded_h, padded_w).transpose(0, 1, 3, 4, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# pairs of filter blocks and a single one; every tile width and a rest (3 tiles: as even as
# possible); a row stride, and lines packed in 1, 2 or 3 column phases
@pytest.mark.parametrize("filter_blocks", [2, 3])
@pytest.mark.parametrize("out_width", list(range(1, BROADCAST_PIXELS + 1))
                         + [2 * BROADCAST_PIXELS + 3])
@pytest.mark.parametrize("stride_h, column_phases", [(1, 1), (3, 2), (2, 3)])
def test_blocked_correlation_kernel_matches_formula(filter_blocks, out_width, stride_h,
                                                    column_phases, dtype, rng):
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    sh = stride_h
    batch, blocks, out_height, terms = 3, 2, 3, 7
    # lines of a multiple of the phases: the packed lines' columns
    height = (out_height - 1) * sh + 2
    width = -(-((out_width - 1) * column_phases + 3) // column_phases) * column_phases
    # the kernel packs src itself, image by image: a partial channel block, padding on the top
    # and left, a crop on the right
    top, left = 1, 2
    src = rng.standard_normal((batch, 2 * lanes - 3, height - top, width - left + 1))
    src = src.astype(dtype)
    # a packing slot per thread (or more), or all images packed beforehand
    prepacked = out_width % 4 == 3
    slots = batch if prepacked else numba.get_num_threads() + out_width % 3
    packed = np.full((slots, blocks, height, width, lanes), np.nan, dtype=dtype)
    if prepacked:
        pack_channel_blocks(src, packed, top, left)
    reach = ((out_height - 1) * sh * width + out_width - 1) * lanes + 1
    offsets = rng.integers(0, packed[0].size - reach, size=terms).astype(np.int64)
    weight = rng.standard_normal((filter_blocks, terms, lanes)).astype(dtype)
    # the sums in the blocked layout, or unblocked to NCHW by the tasks (not prepacked), in
    # tasks of 1, 2 or 3 lines (the last one partial), with the last block partly used
    unblock = not prepacked and out_width % 2 == 0
    outputs = filter_blocks * lanes - 5
    if unblock:
        out = np.full((numba.get_num_threads(), 2, 1 + out_width % 3, out_width, lanes), np.nan,
                      dtype=dtype)
        dst = np.full((batch, outputs, out_height, out_width), np.nan, dtype=dtype)
    else:
        out = np.full((batch, filter_blocks, out_height, out_width, lanes), np.nan, dtype=dtype)
        dst = np.empty((0, 0, 0, 0), dtype=dtype)
    bias = rng.standard_normal(outputs).astype(dtype)
    # each line sums a range of the terms: all, a middle range, none
    line_terms = np.array([[0, terms], [2, terms - 3], [terms, 0]], dtype=np.int64)
    unused = np.full_like(src, np.nan)  # what src is for a prepacked call
    slot_images = np.full(0 if prepacked else slots + 1, -1, dtype=np.int64)
    blocked_correlate(unused if prepacked else src, top, left, column_phases, packed,
                      slot_images, offsets, line_terms, weight, out, unblock, bias, dst, sh,
                      -(-out_width // BROADCAST_PIXELS))
    image = blocked_by_formula(src, lanes, top, left, height, width)
    if not prepacked:  # (a prepacked input is the caller's: packed above in one phase)
        # padded column c at pixel (c % P) * (width / P) + c // P of its line
        columns = np.arange(width)
        pixels = columns % column_phases * (width // column_phases) + columns // column_phases
        phased = np.empty_like(image)
        phased[:, :, :, pixels] = image
        image = phased
    image = image.reshape(batch, -1)
    i, j = np.meshgrid(np.arange(out_height), np.arange(out_width), indexing="ij")
    starts = (i * sh * width + j) * lanes  # (OH, OW)
    reads = image.astype(np.float64)[:, starts[..., None] + offsets]  # (N, OH, OW, T)
    first, count = line_terms[:, :1], line_terms[:, 1:]
    summed = (np.arange(terms) >= first) & (np.arange(terms) < first + count)  # (OH, T)
    expected = np.einsum("nijt,btl,it->nbijl", reads, weight, summed)
    if unblock:
        out = dst
        expected = expected.transpose(0, 1, 4, 2, 3).reshape(batch, -1, out_height, out_width)
        expected = expected[:, :outputs] + bias[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


def test_blocked_correlation_refuses_slots_or_outputs_that_do_not_fit():
    # a thread without a slot of its own would pack into another thread's image, or out of bounds
    src = np.ones((1, 16, 3, 3), dtype=np.float32)
    packed = np.empty((0, 1, 3, 3, 16), dtype=np.float32)
    out = np.empty((1, 1, 3, 3, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="slots"):
        blocked_correlate(src, 0, 0, 1, packed, np.full(1, -1), np.zeros(1, dtype=np.int64),
                             np.array([[0, 1]] * 3), np.ones((1, 1, 16), dtype=np.float32), out,
                             False, np.zeros(16, np.float32),
                             np.empty((0, 0, 0, 0), np.float32), 1, 1)
    # unblocking: a thread without an output slot of its own
    packed = np.empty((numba.get_num_threads(), 1, 3, 3, 16), dtype=np.float32)
    out_slots = np.empty((0, 2, 1, 3, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="slots"):
        blocked_correlate(src, 0, 0, 1, packed, np.full(packed.shape[0] + 1, -1),
                             np.zeros(1, dtype=np.int64), np.array([[0, 1]] * 3),
                             np.ones((1, 1, 16), dtype=np.float32), out_slots, True,
                             np.zeros(16, np.float32), np.empty((1, 16, 3, 3), np.float32), 1, 1)
    # unblocking into a dst of another shape than the sums
    with pytest.raises(ValueError, match="do not fit"):
        blocked_correlate(src, 0, 0, 1, packed, np.full(packed.shape[0] + 1, -1),
                             np.zeros(1, dtype=np.int64), np.array([[0, 1]] * 3),
                             np.ones((1, 1, 16), dtype=np.float32),
                             np.empty((packed.shape[0], 2, 1, 3, 16), dtype=np.float32), True,
                             np.zeros(16, np.float32), np.empty((1, 16, 3, 4), np.float32), 1, 1)
    # unblocking a prepacked input (no bookkeeping): no slots to unblock from
    with pytest.raises(ValueError, match="slot per thread"):
        blocked_correlate(src, 0, 0, 1, packed, np.full(0, -1), np.zeros(1, dtype=np.int64),
                             np.array([[0, 1]] * 3), np.ones((1, 1, 16), dtype=np.float32),
                             np.empty((packed.shape[0], 2, 1, 3, 16), dtype=np.float32), True,
                             np.zeros(16, np.float32), np.empty((1, 16, 3, 3), np.float32), 1, 1)


def test_broadcast_tiles_compile_once_and_inline_into_their_callers(rng):
    # Numba compiles the broadcast tiles' dispatch as a function of its own (run_broadcast_tile
    # does not copy them into its callers' IR), and LLVM inlines it: the caller's optimised IR
    # calls no dispatch, and computes every tile shape
    @numba.njit
    def run(vectors, pixels, src, offsets, weight, out):
        terms, lanes = offsets.shape[0], weight.shape[2]
        run_broadcast_tile(vectors, pixels, src.reshape(-1), 1, offsets, weight.reshape(-1),
                           0, terms * lanes, out.reshape(-1), 0, pixels * lanes, terms)

    lanes, terms = VECTOR_BYTES // 4, 5
    src = rng.standard_normal(64 + BROADCAST_PIXELS * lanes).astype(np.float32)
    offsets = rng.integers(0, 64, size=terms).astype(np.int64)
    for vectors in (1, BROADCAST_VECTORS):
        weight = rng.standard_normal((vectors, terms, lanes)).astype(np.float32)
        for pixels in range(1, BROADCAST_PIXELS + 1):
            out = np.full((vectors, pixels, lanes), np.nan, dtype=np.float32)
            run(vectors, pixels, src, offsets, weight, out)
            inputs = src[1 + offsets[None, :] + lanes * np.arange(pixels)[:, None]]  # (J, T)
            np.testing.assert_allclose(out, np.einsum("jt,vtl->vjl", inputs, weight),
                                       rtol=1e-5, atol=1e-5)
    dispatches = [cell.cell_contents for cell in run_broadcast_tile.py_func.__closure__
                  if isinstance(cell.cell_contents, numba.core.registry.CPUDispatcher)]
    assert len(dispatches) == 2 and all(dispatch.signatures for dispatch in dispatches)
    optimised = run.inspect_llvm(run.signatures[0])
    assert "llvm.fma" in optimised
    assert not re.search(r"call [^\n]*dispatch", optimised)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "input_gradient"])
@pytest.mark.parametrize("filters, channels", [(16, 32), (5, 21), (40, 3)])
# all taps, or a stride phase's subset in any order (the last tap included)
@pytest.mark.parametrize("subset", [False, True], ids=["all_taps", "phase"])
# kernels of fewer taps than a vector's lanes, and of more (transposed LANES taps at a time)
@pytest.mark.parametrize("kernel", [(2, 3), (5, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gather_blocked_weights(filters, channels, transposed, subset, kernel, dtype, rng):
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    taps_h, taps_w = (([kernel[0] - 1], [kernel[1] - 1, 0]) if subset
                      else (list(range(kernel[0])), list(range(kernel[1]))))
    weight = rng.standard_normal((filters, channels, *kernel)).astype(dtype)
    outputs, inputs = (channels, filters) if transposed else (filters, channels)
    out_blocks, in_blocks = -(-outputs // lanes), -(-inputs // lanes)
    taps = len(taps_h) * len(taps_w)
    blocked = np.full((out_blocks, taps * inputs, lanes), np.nan, dtype=dtype)
    gather_blocked_weights(weight, transposed, np.array(taps_h), np.array(taps_w), blocked,
                           np.empty(0, dtype))  # no finiteness check
    # (output, input, taps_h, taps_w), outputs zero-padded to whole blocks
    by_output = weight.transpose(1, 0, 2, 3) if transposed else weight
    at_taps = by_output[:, :, taps_h][:, :, :, taps_w]
    padded = np.zeros((out_blocks * lanes, inputs, len(taps_h), len(taps_w)), dtype)
    padded[:outputs] = at_taps
    # terms: tap row, input block, tap column, the block's inputs (none past the last input)
    expected = np.empty_like(blocked)
    term = 0
    for u in range(len(taps_h)):
        for in_block in range(in_blocks):
            for v in range(len(taps_w)):
                for i in range(in_block * lanes, min(inputs, (in_block + 1) * lanes)):
                    expected[:, term] = padded[:, i, u, v].reshape(out_blocks, lanes)
                    term += 1
    assert term == blocked.shape[1]
    np.testing.assert_array_equal(blocked, expected)

    # the check: zero for tasks (output block, input block) that gathered finite weights only,
    # NaN for one that gathered an inf or a NaN; weights at taps not gathered do not count
    weight[-1, -1, taps_h[0], taps_w[-1]] = np.inf
    weight[0, 0, 0, 0] = np.nan if 0 not in taps_h else weight[0, 0, 0, 0]
    task_checks = np.full(out_blocks * in_blocks, 7.0, dtype)
    gather_blocked_weights(weight, transposed, np.array(taps_h), np.array(taps_w), blocked,
                           task_checks)
    expected_nan = np.zeros((out_blocks, in_blocks), bool)
    expected_nan[-1, -1] = True  # the last filter and channel: the last block of both
    np.testing.assert_array_equal(np.isnan(task_checks), expected_nan.reshape(-1))
    np.testing.assert_array_equal(task_checks[~expected_nan.reshape(-1)], 0)


@pytest.mark.parametrize("outputs", [16, 21, 40])
# all of dst, or one stride phase of it
@pytest.mark.parametrize("first_row, first_column, row_step, column_step",
                         [(0, 0, 1, 1), (1, 2, 2, 3)])
def test_unblock_output(outputs, first_row, first_column, row_step, column_step, rng):
    lanes = VECTOR_BYTES // 4
    blocks, rows, columns = -(-outputs // lanes), 3, 33
    blocked = rng.standard_normal((2, blocks, rows, columns, lanes)).astype(np.float32)
    bias = rng.standard_normal(outputs).astype(np.float32)
    height, width = first_row + rows * row_step, first_column + columns * column_step
    dst = np.full((2, outputs, height, width), np.nan, dtype=np.float32)
    unblock_output(blocked, bias, dst, first_row, first_column, row_step, column_step)
    expected = np.full_like(dst, np.nan)
    values = blocked.transpose(0, 1, 4, 2, 3).reshape(2, blocks * lanes, rows, columns)
    expected[:, :, first_row::row_step, first_column::column_step] = (
        values[:, :outputs] + bias[:, None, None])
    np.testing.assert_array_equal(dst, expected)
