"""Run Hugging Face transformers models on qkv's attention: ``attn_implementation="qkv"``.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · R chosen query rows.

Importing this package registers two functions with transformers (``import qkv`` alone
never imports transformers):

* an attention function (``AttentionInterface``): q/k/v go to
  :func:`qkv.scaled_dot_product_attention` with grouped-query heads unrepeated, the
  model's ``scaling`` and ``dropout``, and exact weights from the fast kernels when
  ``output_attentions`` is asked for;
* a mask function (``AttentionMaskInterface``): transformers hands over structure
  instead of dense (B, 1, L, S) masks wherever qkv can express it — plain causal and
  sliding-window patterns arrive as ``is_causal`` / ``window=``, padding as
  ``key_padding_mask``, static-cache prefill with the cache's unfilled slots cut off.
  Without it transformers would pass no mask at all to an unknown implementation.

Typical use::

    import qkv.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="qkv")
    with qkv.hf.weights(rows=[-1], layers=[0, -1], average_heads=True):
        out = model(**batch, output_attentions=True)

See ``docs/hf.md``.
"""

from __future__ import annotations

import functools

from torch import nn

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "qkv.hf needs Hugging Face transformers (>= 5): pip install transformers"
    ) from exc

from ..backends import get_backend
from ._forward import BACKEND_ATTR, qkv_attention_forward
from ._mask import qkv_mask
from ._weights import WeightSelection, current_selection, weights

__all__ = [
    "DEFAULT_NAME",
    "WeightSelection",
    "current_selection",
    "qkv_attention_forward",
    "qkv_mask",
    "register",
    "unregister",
    "use",
    "weights",
]

#: The ``attn_implementation`` name importing :mod:`qkv.hf` registers.
DEFAULT_NAME = "qkv"

# Names registered through register(): use() leaves a model on any of them.
_REGISTERED: set[str] = set()


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__}")
    if backend != "auto":
        get_backend(backend)  # unknown names fail now, not inside a model's forward
    return backend


def register(name: str = DEFAULT_NAME, *, backend: str = "auto") -> str:
    """Register qkv with transformers as ``attn_implementation=name``.

    Registers the attention function and the mask function under the same ``name``
    (transformers looks both up by the model's ``config._attn_implementation``).
    Calling it again with the same name replaces the registration, so
    ``register(backend="flash")`` changes the default backend of every model on
    ``"qkv"``; another name gives a second implementation with its own backend.

    Args:
        name: the ``attn_implementation`` string to register.
        backend: ``"auto"`` or a qkv backend name (``"flash"``, ``"torch"``,
            ``"reference"``, ``"triton"``); a module's :func:`use` choice and, for
            ``"auto"``, a surrounding :func:`qkv.use_backend` block take precedence.

    Returns:
        ``name``, ready for ``from_pretrained(..., attn_implementation=name)``.
    """
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name must be a non-empty string other than 'eager', got {name!r}")
    fn = functools.partial(qkv_attention_forward, default_backend=_check_backend(backend))
    functools.update_wrapper(fn, qkv_attention_forward)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, qkv_mask)
    _REGISTERED.add(name)
    return name


def unregister(name: str) -> None:
    """Remove an implementation added by :func:`register` (models on it stop working)."""
    if name not in _REGISTERED:
        raise KeyError(f"{name!r} was not registered by qkv.hf.register")
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    _REGISTERED.discard(name)


def use(model: nn.Module, backend: str | None = "auto", *, name: str | None = None) -> nn.Module:
    """Put ``model`` on qkv attention and fix its backend (per model, not global).

    A model already on an implementation registered by :func:`register` stays on it;
    any other (``"eager"``, ``"sdpa"``, ...) is switched to ``name`` (default ``"qkv"``)
    through transformers' ``set_attn_implementation``. ``backend`` is stored on every
    submodule as ``qkv_backend``, which the attention function reads before the
    registered default; ``backend=None`` removes the per-model choice.

    Args:
        model: a transformers ``PreTrainedModel`` (or any module holding one).
        backend: ``"auto"``, a qkv backend name, or ``None`` to clear.
        name: the implementation to switch to; given explicitly, the model is always
            switched to it (registering it with defaults if needed).

    Returns:
        ``model`` itself.
    """
    if backend is not None:
        _check_backend(backend)
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    target = name if name is not None else (current if current in _REGISTERED else DEFAULT_NAME)
    if target not in _REGISTERED:
        register(target)
    if config is not None and current != target:
        model.set_attn_implementation(target)
    for module in model.modules():
        if backend is None:
            module.__dict__.pop(BACKEND_ATTR, None)
        else:
            # Plain attribute (not a buffer / parameter): nothing is saved with the weights.
            object.__setattr__(module, BACKEND_ATTR, backend)
    return model


register()
