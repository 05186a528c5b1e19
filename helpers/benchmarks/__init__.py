"""Benchmarks run by `make bench` (helpers/bench.py): one module per chapter, each with run()."""
