"""Transformer-XL relative-position attention ops."""
from .naive import causal_mask, position_window
from .op import rel_attention

__all__ = ["causal_mask", "position_window", "rel_attention"]
