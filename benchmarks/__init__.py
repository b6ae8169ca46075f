"""Benchmarks of aace, never run as tests: :mod:`benchmarks.micro` (timings) and
:mod:`benchmarks.studies` (training runs), sharing :mod:`benchmarks.harness` (the clock and the
result files) and :mod:`benchmarks.baselines` (the reference implementations they compare
against). Results go to ``benchmarks/results``."""
