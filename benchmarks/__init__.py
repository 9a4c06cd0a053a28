"""Benchmarks against peers (not part of ``make test``): ``make bench``. See README."""
