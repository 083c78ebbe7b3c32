"""The multi-head attention comparison: ``python benchmarks/mha_comparison.py [options]``.

The same as ``qkv bench --suite mha [options]`` (code in ``qkv.bench.mha``): B=8,
L=1024, d_model=768, H=12, causal, forward and forward+backward, every comparator
loaded with the same weights. Writes ``benchmarks/results/mha_comparison.{json,md}``.
"""

import sys

from qkv.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "mha", *sys.argv[1:]]))
