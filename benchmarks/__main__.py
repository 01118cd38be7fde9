"""``python -m benchmarks``: the benchmark report (see :mod:`benchmarks.report`)."""

from .report import main

main()
