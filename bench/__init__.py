"""Benchmarks (run as scripts: ``python bench/bench_<name>.py``); shared helpers in bench/common.py."""
