"""Benchmark machinery: the recipe runner and report (tables, plots), and micro-benchmarks (``bench ot``,
``bench train``)."""
