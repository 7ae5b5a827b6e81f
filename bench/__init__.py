"""Benchmark scripts; each writes ``bench/results/<script>.json`` through :mod:`bench.common`."""
