"""CUDA-graph replay of the Feedback recurrence's whole token loop.

The forward loop launches a few kernels per token and layer (:mod:`.recurrence`,
``_TritonRows``), none of which waits for the GPU, so the loop is captured once
into a ``torch.cuda.CUDAGraph`` and later calls with the same shapes replay it:
one launch for the whole sequence instead of ``T · (launches per token)``.

A graph bakes in every pointer, shape and Python scalar it was captured with:
the input, the initial cache rows and the weights (the modules stack their K/V
projections anew each call, autocast casts every weight, an optimizer may
replace one) are copied into static buffers before each replay (one
multi-tensor copy), the outputs are copied out after it; one graph is kept per
key (shapes, dtypes, configuration), each with its own copy of the weights.
Dropout would replay its captured (seed, offset), and autograd does not record
graph replays: both keep the eager loop (:func:`graph_blocker`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import torch

from . import recurrence


def graph_blocker(cfg: "recurrence.Config", x_seq: torch.Tensor, needs_grad: bool) -> Optional[str]:
    """Why the token loop of this call cannot be replayed from a CUDA graph (None: it can)."""
    if x_seq.device.type != "cuda":
        return f"CUDA graphs need CUDA tensors, got {x_seq.device.type}"
    if cfg.memory_backend != "triton":
        return f"CUDA graphs replay the triton backend's loop, this call uses {cfg.memory_backend!r}"
    if needs_grad:
        return "CUDA graphs replay no-grad forwards only: run under torch.no_grad() / inference_mode()"
    if cfg.dropout_active():
        return "dropout is active (train mode) and a graph would replay one mask: call eval() for CUDA graphs"
    return None


def capture_cuda(run: Callable[[], Sequence[torch.Tensor]]):
    """``(replay, outputs)``: ``run`` warmed up on a side stream (Triton compiles, cuBLAS
    picks its kernels outside the capture), then captured into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph.replay, outputs


@dataclasses.dataclass
class _Captured:
    replay: Callable[[], None]
    x_seq: torch.Tensor  # static input [T, B, D]
    initial_rows: Optional[torch.Tensor]  # static cache rows [start, B, 2C, H, d]
    weights: list  # static copies of the weights that are not None
    out: torch.Tensor  # static output [T, B, D]
    kv: torch.Tensor  # static cache [start + T, B, 2C, H, d]


class RecurrenceGraphs:
    """Captured no-grad token loops, at most ``max_graphs`` (least recently used dropped).

    ``capture`` turns a function producing the loop's outputs into ``(replay, outputs)``;
    :func:`capture_cuda` on a GPU (tests of this bookkeeping pass a stand-in)."""

    def __init__(self, capture: Callable = capture_cuda, max_graphs: int = 4):
        self.capture = capture
        self.max_graphs = max_graphs
        self.graphs: "collections.OrderedDict[tuple, _Captured]" = collections.OrderedDict()
        self.captures = 0  # how many times a loop was captured (a key not seen before)

    @staticmethod
    def _key(cfg, x_seq, initial_kv, weights) -> tuple:
        config = dataclasses.replace(cfg, seed=0, offset=0)
        initial = None if initial_kv is None else (tuple(initial_kv.shape[1:]), initial_kv.dtype)
        return (config, tuple(x_seq.shape), x_seq.dtype, x_seq.device, initial,
                tuple(None if w is None else (tuple(w.shape), w.dtype) for w in weights))

    def run(self, cfg, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, layers, write_in_place=False):
        """:func:`recurrence.run_recurrence` without autograd (same arguments and
        results), from the graph of this key, captured on first use."""
        weights = [mix_weights, kv_weight, kv_bias,
                   *(getattr(lw, name) for lw in layers for name in recurrence.LayerWeights.FIELDS)]
        key = self._key(cfg, x_seq, initial_kv, weights)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(cfg, x_seq, initial_kv, weights, len(layers))
            self.graphs[key] = captured
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        captured.x_seq.copy_(x_seq)
        if captured.initial_rows is not None:
            captured.initial_rows.copy_(initial_kv[:cfg.start])
        torch._foreach_copy_(captured.weights, [w for w in weights if w is not None])
        captured.replay()
        T = x_seq.shape[0]
        if write_in_place:
            initial_kv[cfg.start:cfg.start + T] = captured.kv[cfg.start:]
            return captured.out.clone(), initial_kv
        return captured.out.clone(), captured.kv.clone()

    def _capture(self, cfg, x_seq, initial_kv, weights, n_layers) -> _Captured:
        static_x = x_seq.clone()
        static_rows = None if cfg.start == 0 else initial_kv[:cfg.start].clone()
        static_weights = [None if w is None else w.detach().clone() for w in weights]
        mix_weights, kv_weight, kv_bias, *flat = static_weights

        def loop():
            with torch.no_grad():
                kv = recurrence._new_cache(cfg, static_x, static_rows)
                layer_outputs = recurrence._forward_buffers(cfg, static_x, flat, mix_weights, kv_weight, kv_bias, kv,
                                                            record=False)[0]
                return layer_outputs[:, n_layers], kv

        replay, (out, kv) = self.capture(loop)
        self.captures += 1
        return _Captured(replay, static_x, static_rows, [w for w in static_weights if w is not None], out, kv)

