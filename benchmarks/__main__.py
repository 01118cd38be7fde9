"""``python -m benchmarks``: the benchmark report (see :mod:`benchmarks.report`)."""

from benchmarks.report import main

main()
