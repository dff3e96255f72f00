"""Veil's benchmarks: ``perf/bench_*.py`` scripts, run together by ``python -m perf.run``."""
