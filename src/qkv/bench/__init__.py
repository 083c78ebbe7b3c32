"""Benchmarks that set qkv beside PyTorch (``qkv bench``; scripts in ``benchmarks/``).

They live in the package (not only in ``benchmarks/``) so that ``qkv bench`` works
from an installed copy; ``benchmarks/*.py`` are thin scripts calling the same CLI.
Nothing here is imported by ``import qkv``: matplotlib and the comparators load
only when a benchmark runs.
"""
