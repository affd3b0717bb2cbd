"""asv (airspeed velocity) benchmark suite of numba_cnn; see asv.conf.json and the README section
"Benchmark history". Shared data makers and import guards are in ``common``."""
