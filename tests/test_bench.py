"""The benchmark script's bookkeeping (its timings are measured by running it, never in tests)."""
from numba_cnn import bench


def test_median_over_rounds_takes_each_timing_median_and_skips_failed_rounds():
    rounds = [{"res28": {"forward": 3.0, "forward_backward": 9.0}},
              None,  # a worker that failed in this round
              {"res28": {"forward": 1.0, "forward_backward": 7.0}},
              {"res28": {"forward": 2.0, "forward_backward": 8.0}}]
    assert bench._median_over_rounds(rounds) == {
        "res28": {"forward": 2.0, "forward_backward": 8.0}}
    assert bench._median_over_rounds([None, None]) is None


def test_sgemm_is_not_a_case_name():
    assert bench.SGEMM not in bench.ALL_CASES
