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


def test_median_over_rounds_takes_each_case_over_the_rounds_that_have_it():
    rounds = [{"mnist1": {"forward": 1.0, "forward_backward": 4.0}},  # res28 failed here
              {"mnist1": {"forward": 3.0, "forward_backward": 6.0},
               "res28": {"forward": 5.0, "forward_backward": 9.0}},
              {}]  # and everything here
    assert bench._median_over_rounds(rounds) == {
        "mnist1": {"forward": 2.0, "forward_backward": 5.0},
        "res28": {"forward": 5.0, "forward_backward": 9.0}}


def test_libraries_take_turns_case_by_case(monkeypatch):
    asked = []

    class Worker:
        def __init__(self, library, dtype, threads, quick):
            self.library = library

        def wait_ready(self):
            asked.append((self.library, "ready"))

        def measure(self, name):
            asked.append((self.library, name))
            if (self.library, name) == ("torch", "res28"):
                return None  # a failed case is left out of its round
            return {"forward": float(len(asked))}

        def close(self):
            asked.append((self.library, "closed"))

    monkeypatch.setattr(bench, "_Worker", Worker)
    libraries = ["numba_cnn", "torch", "numpy"]
    rounds = bench._run_rounds(libraries, ["mnist1", "res28"], "float32", 2, True, 2)
    assert asked == ([(library, "ready") for library in libraries]  # all started first
                     + [("numpy", bench.SGEMM)] * 2  # the sgemm yardstick: the numpy worker's
                     + [(library, "mnist1") for library in libraries] * 2  # each round in turn
                     + [(library, "res28") for library in libraries] * 2
                     + [(library, "closed") for library in libraries])
    assert rounds["numpy"][1] == {bench.SGEMM: {"forward": 5.0}, "mnist1": {"forward": 11.0},
                                  "res28": {"forward": 17.0}}
    assert rounds["torch"][0] == {"mnist1": {"forward": 7.0}}


def test_a_worker_process_answers_each_case_and_reports_a_failed_one():
    worker = bench._Worker("numpy", "float32", 1, True)
    try:
        timings = worker.measure("avgpool2")
        assert timings["forward"] > 0 and timings["forward_backward"] > 0
        assert worker.measure("no such case") is None  # reported on stderr, the worker lives on
        assert worker.measure("avgpool2")["forward"] > 0
    finally:
        worker.close()
    assert worker.process.returncode == 0


def test_a_worker_that_dies_is_reported_once_and_its_cases_left_out(capsys):
    worker = bench._Worker("numpy", "float16", 1, True)  # not a --dtype choice: it exits
    try:
        assert worker.measure("avgpool2") is None
        assert worker.measure("mnist1") is None
    finally:
        worker.close()
    assert capsys.readouterr().err.count("[numpy failed]") == 1
