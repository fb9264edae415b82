"""``fastformers.explain(model)``: which backend every module with a fused path
runs in train and in eval mode, and why it is the reference where it is.

A module opts in with ``fused_backend(device, training) -> (backend, reason)``,
computed by the same code its forward uses to choose, without running it.
labml_nn modules that :func:`fastformers.convert` would replace are listed too,
as not converted.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    path: str
    cls: str
    train_backend: str
    eval_backend: str
    why: str

    @property
    def falls_back(self) -> bool:
        return "reference" in (self.train_backend, self.eval_backend) or "labml_nn" in self.train_backend


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _plan(path: str, module: nn.Module, device: torch.device) -> Optional[ModulePlan]:
    from .convert import labml_counterpart

    name = type(module).__name__
    if hasattr(module, "fused_backend"):
        train_backend, train_why = module.fused_backend(device, True)
        eval_backend, eval_why = module.fused_backend(device, False)
        reasons = []
        for mode, why in (("train", train_why), ("eval", eval_why)):
            if why and why not in [r.split(": ", 1)[-1] for r in reasons]:
                reasons.append(f"{mode}: {why}" if train_why != eval_why else why)
        return ModulePlan(path or "(model)", name, train_backend, eval_backend, "; ".join(reasons) or "fused")
    if labml_counterpart(module) is not None:
        why = "a labml_nn module: run fastformers.convert(model) to use the fused kernels"
        return ModulePlan(path or "(model)", name, "labml_nn (not converted)", "labml_nn (not converted)", why)
    return None


def explain(model: nn.Module, device: Optional[torch.device] = None, *, show: bool = True) -> List[ModulePlan]:
    """One :class:`ModulePlan` per module of ``model`` that has a fused path (or
    is an unconverted labml_nn module), for ``device`` (default: where the
    model's parameters are). Prints the table unless ``show`` is False."""
    device = torch.device(device) if device is not None else _device_of(model)
    plans = [plan for path, module in model.named_modules() if (plan := _plan(path, module, device)) is not None]
    if show:
        print(format_plans(plans))
    return plans


def format_plans(plans: List[ModulePlan]) -> str:
    header = ("module", "class", "train", "eval", "why")
    rows = [(p.path, p.cls, p.train_backend, p.eval_backend, p.why) for p in plans]
    if not rows:
        return "no module of this model has a fused path"
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)
