"""In-place conversion of labml_nn 0.5.1 transformer modules to :mod:`fastformers.nn`.

labml_nn is never imported: its classes are recognised by the name of their
defining module and their qualified name, so this module works, and is
importable, without labml_nn installed.
"""
from typing import Callable, Dict, List, Optional, Tuple, Type

from torch import nn

from . import hf, nn as ffnn
from ._backend import BACKENDS

_LABML_CLASSES: Dict[str, Type[nn.Module]] = {
    "labml_nn.transformers.mha.PrepareForMultiHeadAttention": ffnn.PrepareForMultiHeadAttention,
    "labml_nn.transformers.mha.MultiHeadAttention": ffnn.MultiHeadAttention,
    "labml_nn.transformers.feed_forward.FeedForward": ffnn.FeedForward,
    "labml_nn.transformers.xl.relative_mha.RelativeMultiHeadAttention": ffnn.RelativeMultiHeadAttention,
    "labml_nn.transformers.xl.TransformerXLLayer": ffnn.TransformerXLLayer,
    "labml_nn.transformers.xl.TransformerXL": ffnn.TransformerXL,
    "labml_nn.transformers.feedback.FeedbackAttention": ffnn.FeedbackAttention,
    "labml_nn.transformers.feedback.FeedbackTransformerLayer": ffnn.FeedbackTransformerLayer,
    "labml_nn.transformers.feedback.FeedbackTransformer": ffnn.FeedbackTransformer,
    "labml_nn.transformers.feedback.FeedbackTransformerKV": ffnn.FeedbackTransformerKV,
    "labml_nn.transformers.compressive.Conv1dCompression": ffnn.Conv1dCompression,
    "labml_nn.transformers.compressive.CompressiveTransformerLayer": ffnn.CompressiveTransformerLayer,
    "labml_nn.transformers.compressive.CompressiveTransformer": ffnn.CompressiveTransformer,
    "labml_nn.transformers.switch.SwitchFeedForward": ffnn.SwitchFeedForward,
    "labml_nn.transformers.switch.SwitchTransformerLayer": ffnn.SwitchTransformerLayer,
    "labml_nn.transformers.switch.SwitchTransformer": ffnn.SwitchTransformer,
}

_OUR_CLASSES = frozenset(_LABML_CLASSES.values())

_LAYER_ATTRS = ("size", "feed_forward", "dropout", "norm_self_attn", "norm_ff")
_MHA_ATTRS = ("d_k", "heads", "query", "key", "value", "softmax", "output", "dropout", "scale")
_POS_ATTRS = ("P", "key_pos_embeddings", "key_pos_bias", "query_pos_bias")

# Attributes the forward passes read; a module lacking one is not a labml_nn 0.5.1 layout.
_REQUIRED: Dict[Type[nn.Module], Tuple[str, ...]] = {
    ffnn.PrepareForMultiHeadAttention: ("linear", "heads", "d_k"),
    ffnn.MultiHeadAttention: _MHA_ATTRS,
    ffnn.RelativeMultiHeadAttention: _MHA_ATTRS + _POS_ATTRS,
    ffnn.FeedForward: ("layer1", "layer2", "dropout", "activation", "is_gated"),
    ffnn.TransformerXLLayer: _LAYER_ATTRS + ("self_attn",),
    ffnn.TransformerXL: ("layers", "norm"),
    ffnn.FeedbackAttention: _MHA_ATTRS + _POS_ATTRS,
    ffnn.FeedbackTransformerLayer: _LAYER_ATTRS + ("attn",),
    ffnn.FeedbackTransformer: ("layers", "norm", "weights"),
    ffnn.FeedbackTransformerKV: ("layers", "norm", "weights", "key", "value"),
    ffnn.Conv1dCompression: ("conv",),
    ffnn.CompressiveTransformerLayer: _LAYER_ATTRS + ("self_attn", "compress"),
    ffnn.CompressiveTransformer: ("layers", "norm"),
    ffnn.SwitchFeedForward: ("capacity_factor", "is_scale_prob", "n_experts", "drop_tokens", "experts", "switch",
                             "softmax"),
    ffnn.SwitchTransformerLayer: _LAYER_ATTRS + ("attn",),
    ffnn.SwitchTransformer: ("layers", "norm"),
}

# labml state our classes do not have: the feedback models mix memory with the
# fused op instead of their `softmax`, and keep no cross-call K/V buffers.
_LABML_ONLY: Dict[Type[nn.Module], Tuple[str, ...]] = {
    ffnn.FeedbackAttention: ("attn",),
    ffnn.FeedbackTransformer: ("softmax",),
    ffnn.FeedbackTransformerKV: ("softmax", "mem_key", "mem_value"),
}

# Attributes our classes add, with their value on a freshly converted module.
_EXTRA: Dict[Type[nn.Module], Dict[str, Optional[str]]] = {
    ffnn.RelativeMultiHeadAttention: {"backend": None, "last_backend": None},
    ffnn.FeedbackTransformer: {"backend": None, "last_backend": None},
    ffnn.FeedbackTransformerKV: {"backend": None, "last_backend": None},
    ffnn.Conv1dCompression: {"backend": None, "last_backend": None},
    ffnn.SwitchFeedForward: {"backend": None, "last_backend": None, "drop_policy": "labml", "generator": None},
}


def _check_pos_tables(m: nn.Module, rows: int) -> List[str]:
    return [
        f"{name} has {getattr(m, name).shape[0]} rows, expected {rows} (P={m.P})"
        for name in ("key_pos_embeddings", "key_pos_bias")
        if getattr(m, name).shape[0] != rows
    ]


def _check_weights(m: nn.Module) -> List[str]:
    expected = len(m.layers) + 1
    if tuple(m.weights.shape) != (expected,):
        return [f"weights has shape {tuple(m.weights.shape)}, expected ({expected},) = (len(layers) + 1,)"]
    return []


def _check_feed_forward(m: nn.Module) -> List[str]:
    if m.is_gated and not hasattr(m, "linear_v"):
        return ["is_gated is set but the gate projection linear_v is missing"]
    return []


def _check_switch(m: nn.Module) -> List[str]:
    if len(m.experts) != m.n_experts:
        return [f"has {len(m.experts)} experts but n_experts={m.n_experts}"]
    return []


def _check_stackable(m: nn.Module) -> List[str]:
    if isinstance(m, ffnn.SwitchFeedForward) and m.stacked:
        return []
    try:
        ffnn.switch.ExpertSpec.of(m.experts)
    except ValueError as error:
        return [str(error)]
    return []


_CHECKS: Dict[Type[nn.Module], Callable[[nn.Module], List[str]]] = {
    ffnn.RelativeMultiHeadAttention: lambda m: _check_pos_tables(m, 2 * m.P),
    ffnn.FeedbackAttention: lambda m: _check_pos_tables(m, m.P),
    ffnn.FeedbackTransformer: _check_weights,
    ffnn.FeedbackTransformerKV: _check_weights,
    ffnn.FeedForward: _check_feed_forward,
    ffnn.SwitchFeedForward: _check_switch,
}


def _target(module: nn.Module) -> Optional[Type[nn.Module]]:
    cls = type(module)
    if cls in _OUR_CLASSES:
        return cls
    return _LABML_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")


def _validate(module: nn.Module, target: Type[nn.Module], path: str, stacked_experts: bool) -> None:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    missing = [name for name in _REQUIRED[target] if not hasattr(module, name)]
    if missing:
        raise ValueError(f"cannot convert {path} ({kind}): missing attribute(s) {', '.join(missing)}")
    check = _CHECKS.get(target)
    problems = check(module) if check is not None else []
    if not problems and stacked_experts and target is ffnn.SwitchFeedForward:
        problems = _check_stackable(module)
    if problems:
        raise ValueError(f"cannot convert {path} ({kind}): {'; '.join(problems)}")


def _swap(module: nn.Module, target: Type[nn.Module], backend: Optional[str], stacked_experts: bool) -> nn.Module:
    if type(module) is target:
        new = module
    else:
        new = target.__new__(target)
        new.__dict__.update(module.__dict__)
        # Own containers, so dropping labml-only entries leaves the old module intact.
        for store in ("_parameters", "_buffers", "_modules"):
            new.__dict__[store] = module.__dict__[store].copy()
        for name in _LABML_ONLY.get(target, ()):
            for store in (new._parameters, new._buffers, new._modules, new.__dict__):
                store.pop(name, None)
        for name, value in _EXTRA.get(target, {}).items():
            new.__dict__.setdefault(name, value)
    if "backend" in _EXTRA.get(target, {}):
        new.backend = backend
    if stacked_experts and target is ffnn.SwitchFeedForward:
        new.stack_experts_()
    return new


def _validate_tree(module: nn.Module, path: str, seen: set, stacked_experts: bool) -> None:
    """Every module :func:`_convert` would swap, checked before any is: a failure leaves the model as it was."""
    if id(module) in seen:
        return
    seen.add(id(module))
    for name, child in module._modules.items():
        if child is not None:
            _validate_tree(child, f"{path}.{name}", seen, stacked_experts)
    target = _target(module)
    if target is not None:
        _validate(module, target, path, stacked_experts)
    elif hf.is_hf_sparse_mlp(module):
        problems = hf.check_hf_sparse_mlp(module)
        if problems:
            raise ValueError(f"cannot convert {path} ({type(module).__module__}.{type(module).__qualname__}): "
                             f"{'; '.join(problems)}")


def _convert(module: nn.Module, backend: Optional[str], stacked_experts: bool, done: Dict[int, nn.Module]
             ) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    for name, child in list(module._modules.items()):
        if child is not None:
            new_child = _convert(child, backend, stacked_experts, done)
            if new_child is not child:
                module._modules[name] = new_child
    target = _target(module)
    if target is not None:
        new = _swap(module, target, backend, stacked_experts)
    elif hf.is_hf_sparse_mlp(module):
        new = hf.FusedSwitchSparseMLP.from_hf(module, backend)
    else:
        new = module
    done[id(module)] = new
    return new


def convert(model: nn.Module, backend: Optional[str] = None, *, stacked_experts: bool = True) -> nn.Module:
    """Replace labml_nn 0.5.1 transformer modules in ``model`` by :mod:`fastformers.nn` ones.

    Walks ``model`` and all its submodules, children first. Every instance of
    one of the 16 labml_nn module classes mirrored in :mod:`fastformers.nn`
    (exact class, not subclasses, which may override behaviour) is replaced in
    its parent by an instance of the equivalent class sharing the same
    Parameter and buffer objects, so ``state_dict`` keys and values are
    unchanged; modules that already are :mod:`fastformers.nn` ones are kept.

    Hugging Face: every ``transformers`` ``SwitchTransformersSparseMLP``
    (matched by class name; ``transformers`` is not imported) becomes a
    :class:`fastformers.hf.FusedSwitchSparseMLP` with HF's semantics (its
    router object kept, its experts copied into stacked weights, HF's
    ``state_dict`` keys).

    Switch experts: with ``stacked_experts`` (default) every
    ``SwitchFeedForward``'s experts are copied into its stacked layout (one
    Parameter per tensor kind, see :class:`fastformers.nn.SwitchFeedForward`;
    ``state_dict`` keys stay labml's). Those Parameters are new objects:
    **build the optimizer after convert** (an optimizer built before keeps
    updating the old, unused expert tensors). ``stacked_experts=False`` keeps
    the per-expert modules and shares their Parameters.
    Other modules, including other labml_nn classes such as experiment
    wrappers, are left as they are, with their children converted.

    ``backend`` (None for automatic, or one of ``'reference'``, ``'cpp'``,
    ``'triton'``) is set on every converted module that has a ``backend``
    attribute (the feedback transformers, ``SwitchFeedForward`` and the HF
    sparse MLP).

    Returns the converted model: ``model`` itself, or its replacement when the
    root is one of the converted classes (the old root object must then no
    longer be used).

    Raises TypeError if ``model`` is not an ``nn.Module``, ValueError for an
    invalid ``backend`` or a module whose structure does not match its class
    (the message names the module path, ``model`` being the root). The whole
    tree is checked before anything is replaced, so after an error the model
    is exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    _validate_tree(model, "model", set(), stacked_experts)
    return _convert(model, backend, stacked_experts, {})


def labml_counterpart(module: nn.Module) -> Optional[Type[nn.Module]]:
    """The :mod:`fastformers.nn` class :func:`convert` would put in place of this
    labml_nn module, or None (not a labml_nn module it converts)."""
    target = _target(module)
    return None if target is None or type(module) is target else target
