"""Benchmark harness: reported numbers, suites of runs, runner, report, regression check."""
