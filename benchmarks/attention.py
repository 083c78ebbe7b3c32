"""Attention kernels beside PyTorch: ``python benchmarks/attention.py [options]``.

The same as ``qkv bench --suite attention [options]`` (the code lives in
``qkv.bench.attention`` so that the installed ``qkv`` command can run it too);
``--help`` lists the options, ``benchmarks/README.md`` explains the method.
Writes ``benchmarks/results/attention.{json,md,png}``.
"""

import sys

from qkv.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "attention", *sys.argv[1:]]))
