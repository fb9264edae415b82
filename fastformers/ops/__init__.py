"""Fused ops; each family has a ``naive.py`` reference beside its kernels."""
from . import dropout
from .compressive import attention_reconstruction_loss, conv_compress
from .feedback import feedback_attention_step, feedback_memory
from .switch import Routing, route, switch_mlp
from .xl import rel_attention

__all__ = [
    "Routing",
    "attention_reconstruction_loss",
    "conv_compress",
    "dropout",
    "feedback_attention_step",
    "feedback_memory",
    "rel_attention",
    "route",
    "switch_mlp",
]
