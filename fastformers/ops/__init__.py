"""Fused ops; each family has a ``naive.py`` reference beside its kernels."""
from .feedback import feedback_memory
from .switch import Routing, route, switch_mlp

__all__ = ["Routing", "feedback_memory", "route", "switch_mlp"]
