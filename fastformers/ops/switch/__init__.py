"""Switch Transformer ops: top-1 routing with expert capacity and the grouped expert FFN."""
from .op import Routing, route, switch_mlp

__all__ = ["Routing", "route", "switch_mlp"]
