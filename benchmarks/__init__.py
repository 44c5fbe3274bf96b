"""Benchmark scripts (run them as ``python benchmarks/<name>.py``); a package so that tests can import the
accuracy suite's cases."""
