"""The whole Feedback Transformer recurrence as one autograd function.

Per token the model runs every layer (pre-norm attention over the memory, then
a ReLU feed-forward), mixes the embedding and layer outputs into one memory
vector ``m_t = Σ_l softmax(w)_l x_l`` and projects it to keys and values that
are written in place into a preallocated cache ``[T_max, B, C, H, d]``
(``C = 2`` caches for the shared-KV model, ``2 · n_layers`` for the original
one). Autograd through that per-token loop is what makes the module slow
(thousands of tiny nodes, a zero-filled ``[P, H, d]`` gradient per layer per
step, growing stacks), so this function runs the loop without autograd,
records what backward needs, and implements backpropagation through time:

* reverse over tokens: only the data gradients (``[B, ·]`` matrix products,
  the attention-step backward, layer-norm input gradients) are sequential;
* the attention-step backward adds into ONE cache-gradient buffer and ONE
  positional-gradient buffer per layer for the whole sequence
  (``feedback_attention_step_backward_accumulate_``);
* every weight gradient is one large GEMM over all ``T · B`` rows at the end.

Keys and values live in buffers owned by each call, so several forwards may
share one backward. Dropout is not part of the fused recurrence: the modules
use it only when every dropout is inactive (p = 0 or eval mode).

Shape letters: ``T`` tokens in this call, ``B`` batch, ``D`` = d_model,
``H`` heads, ``d`` = d_k, ``F`` = d_ff, ``P`` rows of the positional tables.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from . import step_op
from .op import feedback_memory as _feedback_memory_functional


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer's parameters (biases may be None)."""

    norm_attn_weight: torch.Tensor  # [D]
    norm_attn_bias: torch.Tensor  # [D]
    query_weight: torch.Tensor  # [D, D]
    key_pos_embeddings: torch.Tensor  # [P, H, d]
    key_pos_bias: torch.Tensor  # [P, H]
    query_pos_bias: torch.Tensor  # [H, d]
    output_weight: torch.Tensor  # [D, D]
    output_bias: Optional[torch.Tensor]  # [D]
    norm_ff_weight: torch.Tensor  # [D]
    norm_ff_bias: torch.Tensor  # [D]
    ff1_weight: torch.Tensor  # [F, D]
    ff1_bias: Optional[torch.Tensor]  # [F]
    ff2_weight: torch.Tensor  # [D, F]
    ff2_bias: Optional[torch.Tensor]  # [D]

    FIELDS = (
        "norm_attn_weight", "norm_attn_bias", "query_weight", "key_pos_embeddings", "key_pos_bias",
        "query_pos_bias", "output_weight", "output_bias", "norm_ff_weight", "norm_ff_bias", "ff1_weight",
        "ff1_bias", "ff2_weight", "ff2_bias",
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Non-tensor description of one call."""

    n_layers: int
    heads: int
    d_k: int
    shared_kv: bool  # one K/V cache for all layers (FeedbackTransformerKV) or one per layer
    norm_eps: tuple  # (attn eps, ff eps) per layer
    scale: float
    start: int  # memory steps already in the initial cache
    forward_kernel: Callable
    backward_kernel: Callable
    memory_backend: str

    @property
    def n_caches(self) -> int:
        return 1 if self.shared_kv else self.n_layers


def _cache_views(kv: torch.Tensor, layer: int, shared: bool):
    """Key and value caches ``[T_max, B, H, d]`` of ``layer`` inside ``kv [T_max, B, 2C, H, d]``."""
    c = 0 if shared else layer
    return kv[:, :, 2 * c], kv[:, :, 2 * c + 1]


def _run(cfg: Config, x_seq: torch.Tensor, layers: Sequence[LayerWeights], mix_weights: torch.Tensor,
         kv_weight: torch.Tensor, kv_bias: Optional[torch.Tensor], kv: torch.Tensor, record: bool):
    """Forward over ``x_seq [T, B, D]`` writing keys/values of steps ``start .. start+T-1``
    into ``kv``. Returns the last-layer outputs ``[T, B, D]`` and, if ``record``,
    the activations backward needs."""
    T, B, D = x_seq.shape
    H, d = cfg.heads, cfg.d_k
    N = cfg.n_layers
    kv_weight_t = kv_weight.t()
    prepared = [
        (lw, lw.query_weight.t(), lw.output_weight.t(), lw.ff1_weight.t(), lw.ff2_weight.t(),
         *_cache_views(kv, l, cfg.shared_kv))
        for l, lw in enumerate(layers)
    ]
    # All layer outputs of every token: the memory mix reads them, backward reuses them.
    layer_outputs = x_seq.new_empty((T, N + 1, B, D))
    layer_outputs[:, 0] = x_seq
    memories = x_seq.new_empty((T, B, D)) if record else None
    saved = [dict(z=[], mean_a=[], rstd_a=[], q=[], a=[], xm=[], z2=[], mean_f=[], rstd_f=[], h=[]) for _ in range(N)]
    attend = cfg.forward_kernel
    for i in range(T):
        t = cfg.start + i
        x = layer_outputs[i, 0]
        for l, (lw, wq_t, wo_t, w1_t, w2_t, key_cache, value_cache) in enumerate(prepared):
            eps_attn, eps_ff = cfg.norm_eps[l]
            s = saved[l]
            if t > 0:
                z, mean_a, rstd_a = torch.native_layer_norm(x, (D,), lw.norm_attn_weight, lw.norm_attn_bias, eps_attn)
                q = torch.mm(z, wq_t).view(B, H, d)
                a = attend(q, key_cache, value_cache, t, lw.key_pos_embeddings, lw.key_pos_bias, lw.query_pos_bias,
                           cfg.scale).view(B, D)
                xm = torch.addmm(x, a, wo_t)
                if lw.output_bias is not None:
                    xm += lw.output_bias
                if record:
                    s["z"].append(z), s["mean_a"].append(mean_a), s["rstd_a"].append(rstd_a)
                    s["q"].append(q), s["a"].append(a)
            else:
                xm = x
            z2, mean_f, rstd_f = torch.native_layer_norm(xm, (D,), lw.norm_ff_weight, lw.norm_ff_bias, eps_ff)
            h = torch.mm(z2, w1_t) if lw.ff1_bias is None else torch.addmm(lw.ff1_bias, z2, w1_t)
            h = h.relu_()
            x = layer_outputs[i, l + 1]
            torch.addmm(xm, h, w2_t, out=x)
            if lw.ff2_bias is not None:
                x += lw.ff2_bias
            if record:
                s["xm"].append(xm), s["z2"].append(z2), s["mean_f"].append(mean_f), s["rstd_f"].append(rstd_f)
                s["h"].append(h)
        memory = _feedback_memory_functional(layer_outputs[i], mix_weights, backend=cfg.memory_backend)
        if record:
            memories[i] = memory
        kv_row = kv[t].view(B, -1)
        if kv_bias is None:
            torch.mm(memory, kv_weight_t, out=kv_row)
        else:
            torch.addmm(kv_bias, memory, kv_weight_t, out=kv_row)
    return layer_outputs[:, N], (layer_outputs, memories, saved)


def _layer_norm_input_grad(grad, x, mean, rstd, weight):
    return torch.ops.aten.native_layer_norm_backward(grad, x, (x.shape[-1],), mean, rstd, weight, None,
                                                     (True, False, False))[0]


def _layer_norm_param_grads(grads, inputs, means, rstds):
    """``(grad weight, grad bias)`` of a layer norm from its stacked per-step
    output gradients, inputs and statistics (one pass over all tokens)."""
    normalized = (torch.stack(inputs) - torch.stack(means)) * torch.stack(rstds)
    grads = torch.stack(grads)
    return (grads * normalized).sum((0, 1)), grads.sum((0, 1))


def _weight_grad(grads, inputs):
    """``Σ_t grads[t]ᵀ inputs[t]`` as one GEMM over the stacked ``[T·B, ·]`` rows."""
    g = torch.stack(grads).flatten(0, -2)
    x = torch.stack(inputs).flatten(0, -2)
    return torch.mm(g.t(), x)


class FeedbackRecurrence(torch.autograd.Function):
    """``apply(cfg, n_params_per_layer, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, *layer_params)``
    -> ``(outputs [T, B, D], kv [start + T, B, 2C, H, d])``; the cache output is not differentiable."""

    @staticmethod
    def forward(ctx, cfg: Config, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, *flat_layers):
        layers = _unflatten(flat_layers, cfg.n_layers)
        kv = _new_cache(cfg, x_seq, initial_kv)
        with torch.no_grad():
            out, (layer_outputs, memories, saved) = _run(cfg, x_seq, layers, mix_weights, kv_weight, kv_bias, kv,
                                                         record=True)
        ctx.cfg = cfg
        ctx.saved = saved
        ctx.kv_bias_is_none = kv_bias is None
        ctx.save_for_backward(layer_outputs, memories, kv, mix_weights, kv_weight, *flat_layers)
        ctx.mark_non_differentiable(kv)
        return out.clone(), kv

    @staticmethod
    def backward(ctx, grad_out, _grad_kv):
        cfg: Config = ctx.cfg
        layer_outputs, memories, kv, mix_weights, kv_weight, *flat_layers = ctx.saved_tensors
        layers = _unflatten(flat_layers, cfg.n_layers)
        with torch.no_grad():
            grads = _backward(cfg, grad_out, layer_outputs, memories, kv, mix_weights, kv_weight, layers, ctx.saved,
                              ctx.kv_bias_is_none)
        ctx.saved = None
        return (None, *grads)


def _unflatten(flat, n_layers):
    per = len(LayerWeights.FIELDS)
    return [LayerWeights(*flat[l * per:(l + 1) * per]) for l in range(n_layers)]


def _new_cache(cfg: Config, x_seq, initial_kv):
    T, B, _ = x_seq.shape
    shape = (cfg.start + T, B, 2 * cfg.n_caches, cfg.heads, cfg.d_k)
    kv = x_seq.new_empty(shape)
    if cfg.start:
        kv[:cfg.start] = initial_kv[:cfg.start]
    return kv


def _backward(cfg: Config, grad_out, layer_outputs, memories, kv, mix_weights, kv_weight, layers, saved,
              kv_bias_is_none):
    T, N1, B, D = layer_outputs.shape
    N = cfg.n_layers
    H, d = cfg.heads, cfg.d_k
    grad_out = grad_out.contiguous()
    probs = torch.softmax(mix_weights.double(), 0).tolist()
    # Every step adds into these buffers: for bfloat16/half they are float32, or
    # the sums over a sequence would keep only ~3 significant digits.
    accumulate_dtype = torch.float32 if kv.dtype in (torch.bfloat16, torch.float16) else kv.dtype
    grad_kv = torch.zeros(kv.shape, dtype=accumulate_dtype, device=kv.device)
    kv_weight_wide = kv_weight.to(accumulate_dtype)
    grad_x = torch.empty_like(grad_out)
    grad_memories = torch.empty_like(memories)
    pos = [{name: torch.zeros(table.shape, dtype=accumulate_dtype, device=table.device)
            for name, table in (("R", lw.key_pos_embeddings), ("S", lw.key_pos_bias), ("u", lw.query_pos_bias))}
           for lw in layers]
    rec = [dict(gf=[], dh1=[], gz2=[], go=[], gq=[], gz=[]) for _ in range(N)]
    views = [(_cache_views(kv, l, cfg.shared_kv), _cache_views(grad_kv, l, cfg.shared_kv)) for l in range(N)]
    accumulate = cfg.backward_kernel
    first_attn = 1 if cfg.start == 0 else 0  # index of the first token that attends
    for i in range(T - 1, -1, -1):
        t = cfg.start + i
        gm = torch.mm(grad_kv[t].view(B, -1), kv_weight_wide).to(memories.dtype)
        grad_memories[i] = gm
        g = torch.add(grad_out[i], gm, alpha=probs[N])
        for l in range(N - 1, -1, -1):
            lw, s, r = layers[l], saved[l], rec[l]
            r["gf"].append(g)
            dh = torch.mm(g, lw.ff2_weight)
            dh1 = torch.ops.aten.threshold_backward(dh, s["h"][i], 0)
            r["dh1"].append(dh1)
            gz2 = torch.mm(dh1, lw.ff1_weight)
            r["gz2"].append(gz2)
            gxm = _layer_norm_input_grad(gz2, s["xm"][i], s["mean_f"][i], s["rstd_f"][i], lw.norm_ff_weight)
            gxm += g
            if t > 0:
                ia = i - first_attn
                r["go"].append(gxm)
                ga = torch.mm(gxm, lw.output_weight).view(B, H, d)
                (key_cache, value_cache), (grad_key, grad_value) = views[l]
                gq = accumulate(ga, s["q"][ia], key_cache, value_cache, t, lw.key_pos_embeddings, lw.key_pos_bias,
                                lw.query_pos_bias, cfg.scale, grad_key, grad_value, pos[l]["R"], pos[l]["S"],
                                pos[l]["u"]).view(B, D)
                r["gq"].append(gq)
                gz = torch.mm(gq, lw.query_weight)
                r["gz"].append(gz)
                g = _layer_norm_input_grad(gz, layer_outputs[i, l], s["mean_a"][ia], s["rstd_a"][ia],
                                           lw.norm_attn_weight)
                g += gxm
            else:
                g = gxm
            g.add_(gm, alpha=probs[l])
        grad_x[i] = g

    layer_grads = []
    for l in range(N):
        lw, s, r = layers[l], saved[l], rec[l]
        for key in r:
            r[key].reverse()
        grad_norm_ff_w, grad_norm_ff_b = _layer_norm_param_grads(r["gz2"], s["xm"], s["mean_f"], s["rstd_f"])
        grad_ff1_w = _weight_grad(r["dh1"], s["z2"])
        grad_ff2_w = _weight_grad(r["gf"], s["h"])
        if r["go"]:
            grad_norm_attn_w, grad_norm_attn_b = _layer_norm_param_grads(
                r["gz"], [layer_outputs[i, l] for i in range(first_attn, T)], s["mean_a"], s["rstd_a"])
            grad_query_w = _weight_grad(r["gq"], s["z"])
            grad_output_w = _weight_grad(r["go"], s["a"])
            grad_output_b = torch.stack(r["go"]).sum((0, 1))
            pos_grads = [pos[l]["R"].to(lw.key_pos_embeddings.dtype), pos[l]["S"].to(lw.key_pos_bias.dtype),
                         pos[l]["u"].to(lw.query_pos_bias.dtype)]
            attention_grads = [grad_norm_attn_w, grad_norm_attn_b, grad_query_w, *pos_grads, grad_output_w,
                               None if lw.output_bias is None else grad_output_b]
        else:
            # No token attended: like autograd, report these parameters as unused.
            attention_grads = [None] * 8
        layer_grads += [
            *attention_grads,
            grad_norm_ff_w, grad_norm_ff_b, grad_ff1_w,
            None if lw.ff1_bias is None else torch.stack(r["dh1"]).sum((0, 1)),
            grad_ff2_w,
            None if lw.ff2_bias is None else torch.stack(r["gf"]).sum((0, 1)),
        ]

    if T == 1:
        # The memory of this call's only token is never attended to (unused, as autograd reports it).
        return (grad_x, None, None, None, None, *layer_grads)
    grad_kv_rows = grad_kv[cfg.start:].reshape(T * B, -1)
    grad_kv_weight = torch.mm(grad_kv_rows.t(), memories.view(T * B, D).to(grad_kv.dtype)).to(kv_weight.dtype)
    grad_kv_bias = None if kv_bias_is_none else grad_kv_rows.sum(0).to(kv_weight.dtype)
    # d loss / d softmax(w)_l = Σ grad(m) · x_l, then the softmax backward.
    grad_probs = torch.einsum("tbd,tlbd->l", grad_memories, layer_outputs)
    p = torch.softmax(mix_weights, 0)
    grad_mix = p * (grad_probs - (p * grad_probs).sum())
    return (grad_x, None, grad_mix, grad_kv_weight, grad_kv_bias, *layer_grads)


def run_recurrence(cfg: Config, x_seq: torch.Tensor, initial_kv: Optional[torch.Tensor], mix_weights: torch.Tensor,
                   kv_weight: torch.Tensor, kv_bias: Optional[torch.Tensor], layers: Sequence[LayerWeights],
                   write_in_place: bool = False):
    """Outputs ``[T, B, D]`` of the last layer (before the final norm) and the
    cache ``[>= start + T, B, 2C, H, d]``; differentiable w.r.t. inputs and
    weights (not the initial cache).

    ``write_in_place`` (no-grad calls only): write the new keys/values into
    ``initial_kv`` itself, which must hold ``start + T`` rows; generation then
    costs one step per token instead of a cache copy per token."""
    flat = [getattr(lw, name) for lw in layers for name in LayerWeights.FIELDS]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_seq, mix_weights, kv_weight, kv_bias, *flat)
    )
    if needs_grad:
        return FeedbackRecurrence.apply(cfg, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, *flat)
    with torch.no_grad():
        kv = initial_kv if write_in_place else _new_cache(cfg, x_seq, initial_kv)
        out, _ = _run(cfg, x_seq, layers, mix_weights, kv_weight, kv_bias, kv, record=False)
    return out, kv


def make_config(*, n_layers, heads, d_k, shared_kv, norm_eps, scale, start, backend, device) -> Config:
    forward_kernel, backward_kernel = step_op.step_kernels(backend, device)
    return Config(n_layers, heads, d_k, shared_kv, tuple(norm_eps), float(scale), start, forward_kernel,
                  backward_kernel, backend)


__all__ = ["Config", "LayerWeights", "FeedbackRecurrence", "make_config", "run_recurrence"]
