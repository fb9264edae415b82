"""Fused ops; each family has a ``naive.py`` reference beside its kernels."""
from .feedback import feedback_memory
from .switch import Routing, route, switch_mlp
from .xl import rel_attention

__all__ = ["Routing", "feedback_memory", "rel_attention", "route", "switch_mlp"]
