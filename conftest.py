"""Doctest collection of the package: skip modules whose optional dependency is absent.

``qkv.hf`` needs Hugging Face transformers (in the ``test`` extra); on a machine without
it, its modules are not collected rather than failing collection of the whole suite.
"""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("transformers") else ["src/qkv/hf/*"]
