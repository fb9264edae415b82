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

On the cpp backend in float32/float64 the loops run in C++
(``feedback_recurrence_forward`` / ``feedback_recurrence_backward``); the
Python loops below write the same buffers, serve every other backend and dtype,
and are those ops' registered reference.

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

from ..._library import lib, qualname
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


# Layouts of the buffers one forward records and its backward fills; the C++
# loop (csrc/feedback_recurrence.cpp) writes the same ones. Rows of the token
# without memory (step 0) stay zero in the attention slots, so every sum over
# tokens can run over all of them.
ACTIVATIONS = ("norm_attn", "query", "attention", "mid", "norm_ff")  # activations [N, 5, T, B, D]
STATS = ("mean_attn", "rstd_attn", "mean_ff", "rstd_ff")  # stats [N, 4, T, B]
# row_grads [N, 5, T, B, D]: gradients of each layer's output, of both norm
# outputs, of the attention-branch output (the residual stream after
# attention, zero at step 0) and of the query.
ROW_GRADS = ("layer_out", "norm_ff", "attn_out", "query", "norm_attn")
_NORM_ATTN, _QUERY, _ATTENTION, _MID, _NORM_FF = range(5)
_MEAN_ATTN, _RSTD_ATTN, _MEAN_FF, _RSTD_FF = range(4)
_G_LAYER_OUT, _G_NORM_FF, _G_ATTN_OUT, _G_QUERY, _G_NORM_ATTN = range(5)

_CACHE_ARGS = "Tensor kv, int start, Tensor mix_weights, Tensor kv_weight"
_LAYER_ARGS = "Tensor?[] layer_params, float[] norm_eps, int heads, float scale, bool shared_kv"
lib.define(
    f"feedback_recurrence_forward(Tensor x_seq, Tensor(a!) kv, int start, Tensor mix_weights, Tensor kv_weight, "
    f"Tensor? kv_bias, {_LAYER_ARGS}, bool record) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
lib.define(
    f"feedback_recurrence_backward(Tensor grad_out, Tensor layer_outputs, Tensor activations, Tensor hidden, "
    f"Tensor stats, {_CACHE_ARGS}, {_LAYER_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _cache_views(kv: torch.Tensor, layer: int, shared: bool):
    """Key and value caches ``[T_max, B, H, d]`` of ``layer`` inside ``kv [T_max, B, 2C, H, d]``."""
    c = 0 if shared else layer
    return kv[:, :, 2 * c], kv[:, :, 2 * c + 1]


def _run(cfg: Config, x_seq: torch.Tensor, layers: Sequence[LayerWeights], mix_weights: torch.Tensor,
         kv_weight: torch.Tensor, kv_bias: Optional[torch.Tensor], kv: torch.Tensor, record: bool):
    """Forward over ``x_seq [T, B, D]`` writing keys/values of steps ``start .. start+T-1``
    into ``kv``, one ATen call at a time. Returns ``(layer_outputs [T, N+1, B, D],
    memories [T', B, D], activations [N, 5, T', B, D], hidden [N, T', B, F],
    stats [N, 4, T', B])`` with ``T' = T`` if ``record`` else 1 (one reused slot)."""
    T, B, D = x_seq.shape
    H, d = cfg.heads, cfg.d_k
    N = cfg.n_layers
    F = layers[0].ff1_weight.shape[0]
    slots = T if record else 1
    kv_weight_t = kv_weight.t()
    prepared = [
        (lw, lw.query_weight.t(), lw.output_weight.t(), lw.ff1_weight.t(), lw.ff2_weight.t(),
         *_cache_views(kv, l, cfg.shared_kv))
        for l, lw in enumerate(layers)
    ]
    layer_outputs = x_seq.new_empty((T, N + 1, B, D))
    layer_outputs[:, 0] = x_seq
    memories = x_seq.new_empty((slots, B, D))
    activations = x_seq.new_zeros((N, len(ACTIVATIONS), slots, B, D))
    hidden = x_seq.new_empty((N, slots, B, F))
    stats = x_seq.new_zeros((N, len(STATS), slots, B))
    attend = cfg.forward_kernel
    for i in range(T):
        t = cfg.start + i
        s = i if record else 0
        x = layer_outputs[i, 0]
        for l, (lw, wq_t, wo_t, w1_t, w2_t, key_cache, value_cache) in enumerate(prepared):
            eps_attn, eps_ff = cfg.norm_eps[l]
            act, st = activations[l, :, s], stats[l, :, s]
            xm = act[_MID]
            if t > 0:
                z, mean, rstd = torch.native_layer_norm(x, (D,), lw.norm_attn_weight, lw.norm_attn_bias, eps_attn)
                act[_NORM_ATTN] = z
                st[_MEAN_ATTN], st[_RSTD_ATTN] = mean.view(B), rstd.view(B)
                q = torch.mm(z, wq_t, out=act[_QUERY]).view(B, H, d)
                act[_ATTENTION] = attend(q, key_cache, value_cache, t, lw.key_pos_embeddings, lw.key_pos_bias,
                                         lw.query_pos_bias, cfg.scale).view(B, D)
                torch.addmm(x, act[_ATTENTION], wo_t, out=xm)
                if lw.output_bias is not None:
                    xm += lw.output_bias
            else:
                xm.copy_(x)
            z2, mean, rstd = torch.native_layer_norm(xm, (D,), lw.norm_ff_weight, lw.norm_ff_bias, eps_ff)
            act[_NORM_FF] = z2
            st[_MEAN_FF], st[_RSTD_FF] = mean.view(B), rstd.view(B)
            h = hidden[l, s]
            if lw.ff1_bias is None:
                torch.mm(z2, w1_t, out=h)
            else:
                torch.addmm(lw.ff1_bias, z2, w1_t, out=h)
            h.relu_()
            x = layer_outputs[i, l + 1]
            torch.addmm(xm, h, w2_t, out=x)
            if lw.ff2_bias is not None:
                x += lw.ff2_bias
        memory = memories[s]
        memory.copy_(_feedback_memory_functional(layer_outputs[i], mix_weights, backend=cfg.memory_backend))
        kv_row = kv[t].view(B, -1)
        if kv_bias is None:
            torch.mm(memory, kv_weight_t, out=kv_row)
        else:
            torch.addmm(kv_bias, memory, kv_weight_t, out=kv_row)
    return layer_outputs, memories, activations, hidden, stats


def _layer_norm_input_grad(grad, x, mean, rstd, weight):
    return torch.ops.aten.native_layer_norm_backward(grad, x, (x.shape[-1],), mean, rstd, weight, None,
                                                     (True, False, False))[0]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the buffers every step adds into: for bfloat16/half they are float32,
    or the sums over a sequence would keep only ~3 significant digits."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _backward_loop(cfg: Config, grad_out, layer_outputs, activations, hidden, stats, kv, mix_weights, kv_weight,
                   layers):
    """The sequential part of backpropagation through time, one ATen call at a time.
    Returns ``(grad_x [T, B, D], grad_memories [T, B, D], row_grads [N, 5, T, B, D],
    grad_hidden [N, T, B, F], grad_kv (like kv), grad_key_pos_embeddings [N, P, H, d],
    grad_key_pos_bias [N, P, H], grad_query_pos_bias [N, H, d])``."""
    T, N1, B, D = layer_outputs.shape
    N = cfg.n_layers
    H, d = cfg.heads, cfg.d_k
    grad_out = grad_out.contiguous()
    probs = torch.softmax(mix_weights.double(), 0).tolist()
    wide = _accumulate_dtype(kv.dtype)
    grad_kv = torch.zeros(kv.shape, dtype=wide, device=kv.device)
    kv_weight_wide = kv_weight.to(wide)
    grad_x = torch.empty_like(grad_out)
    grad_memories = torch.empty_like(grad_out)
    row_grads = grad_out.new_zeros((N, len(ROW_GRADS), T, B, D))
    grad_hidden = torch.empty_like(hidden)
    P = layers[0].key_pos_embeddings.shape[0]
    grad_pos_emb = grad_out.new_zeros((N, P, H, d), dtype=wide)
    grad_pos_bias = grad_out.new_zeros((N, P, H), dtype=wide)
    grad_query_pos_bias = grad_out.new_zeros((N, H, d), dtype=wide)
    views = [(_cache_views(kv, l, cfg.shared_kv), _cache_views(grad_kv, l, cfg.shared_kv)) for l in range(N)]
    accumulate = cfg.backward_kernel
    for i in range(T - 1, -1, -1):
        t = cfg.start + i
        gm = grad_memories[i]
        gm.copy_(torch.mm(grad_kv[t].view(B, -1), kv_weight_wide))
        g = torch.add(grad_out[i], gm, alpha=probs[N])
        for l in range(N - 1, -1, -1):
            lw, act, st, r = layers[l], activations[l, :, i], stats[l, :, i], row_grads[l, :, i]
            r[_G_LAYER_OUT] = g
            dh1 = grad_hidden[l, i]
            dh1.copy_(torch.ops.aten.threshold_backward(torch.mm(g, lw.ff2_weight), hidden[l, i], 0))
            torch.mm(dh1, lw.ff1_weight, out=r[_G_NORM_FF])
            gxm = _layer_norm_input_grad(r[_G_NORM_FF], act[_MID], st[_MEAN_FF].view(B, 1), st[_RSTD_FF].view(B, 1),
                                         lw.norm_ff_weight)
            gxm += g
            if t > 0:
                r[_G_ATTN_OUT] = gxm
                ga = torch.mm(gxm, lw.output_weight).view(B, H, d)
                (key_cache, value_cache), (grad_key, grad_value) = views[l]
                r[_G_QUERY] = accumulate(ga, act[_QUERY].view(B, H, d), key_cache, value_cache, t,
                                         lw.key_pos_embeddings, lw.key_pos_bias, lw.query_pos_bias, cfg.scale,
                                         grad_key, grad_value, grad_pos_emb[l], grad_pos_bias[l],
                                         grad_query_pos_bias[l]).view(B, D)
                torch.mm(r[_G_QUERY], lw.query_weight, out=r[_G_NORM_ATTN])
                g = _layer_norm_input_grad(r[_G_NORM_ATTN], layer_outputs[i, l], st[_MEAN_ATTN].view(B, 1),
                                           st[_RSTD_ATTN].view(B, 1), lw.norm_attn_weight)
                g += gxm
            else:
                g = gxm
            g.add_(gm, alpha=probs[l])
        grad_x[i] = g
    return grad_x, grad_memories, row_grads, grad_hidden, grad_kv, grad_pos_emb, grad_pos_bias, grad_query_pos_bias


def _op_config(start, layer_params, norm_eps, heads, scale, shared_kv, x) -> Config:
    """The reference kernels' configuration for the registered ops' arguments."""
    n_layers = len(layer_params) // len(LayerWeights.FIELDS)
    eps = tuple(zip(norm_eps[0::2], norm_eps[1::2]))
    return make_config(n_layers=n_layers, heads=heads, d_k=x.shape[-1] // heads, shared_kv=shared_kv, norm_eps=eps,
                       scale=scale, start=start, backend="reference", device=x.device)


def _forward_reference(x_seq, kv, start, mix_weights, kv_weight, kv_bias, layer_params, norm_eps, heads, scale,
                       shared_kv, record):
    cfg = _op_config(start, layer_params, norm_eps, heads, scale, shared_kv, x_seq)
    return _run(cfg, x_seq, _unflatten(layer_params, cfg.n_layers), mix_weights, kv_weight, kv_bias, kv, record)


def _backward_reference(grad_out, layer_outputs, activations, hidden, stats, kv, start, mix_weights, kv_weight,
                        layer_params, norm_eps, heads, scale, shared_kv):
    cfg = _op_config(start, layer_params, norm_eps, heads, scale, shared_kv, grad_out)
    return _backward_loop(cfg, grad_out, layer_outputs, activations, hidden, stats, kv, mix_weights, kv_weight,
                          _unflatten(layer_params, cfg.n_layers))


lib.impl("feedback_recurrence_forward", _forward_reference, "CompositeExplicitAutograd")
lib.impl("feedback_recurrence_backward", _backward_reference, "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("feedback_recurrence_forward"))
def _forward_fake(x_seq, kv, start, mix_weights, kv_weight, kv_bias, layer_params, norm_eps, heads, scale, shared_kv,
                  record):
    T, B, D = x_seq.shape
    N = len(layer_params) // len(LayerWeights.FIELDS)
    F = layer_params[LayerWeights.FIELDS.index("ff1_weight")].shape[0]
    slots = T if record else 1
    new = x_seq.new_empty
    return (new((T, N + 1, B, D)), new((slots, B, D)), new((N, len(ACTIVATIONS), slots, B, D)), new((N, slots, B, F)),
            new((N, len(STATS), slots, B)))


@torch.library.register_fake(qualname("feedback_recurrence_backward"))
def _backward_fake(grad_out, layer_outputs, activations, hidden, stats, kv, start, mix_weights, kv_weight,
                   layer_params, norm_eps, heads, scale, shared_kv):
    T, B, D = grad_out.shape
    N = len(layer_params) // len(LayerWeights.FIELDS)
    P, H, d = layer_params[LayerWeights.FIELDS.index("key_pos_embeddings")].shape
    wide = _accumulate_dtype(kv.dtype)
    new = grad_out.new_empty
    return (new((T, B, D)), new((T, B, D)), new((N, len(ROW_GRADS), T, B, D)), torch.empty_like(hidden),
            kv.new_empty(kv.shape, dtype=wide), new((N, P, H, d), dtype=wide), new((N, P, H), dtype=wide),
            new((N, H, d), dtype=wide))


def _uses_cpp_loop(cfg: Config, x: torch.Tensor) -> bool:
    """The C++ loop serves the cpp backend in float32/float64 (its GEMMs are BLAS
    sgemm/dgemm); other dtypes and backends run :func:`_run` / :func:`_backward_loop`."""
    return cfg.memory_backend == "cpp" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _op_layer_args(cfg: Config, flat_layers):
    return (list(flat_layers), [eps for pair in cfg.norm_eps for eps in pair], cfg.heads, cfg.scale, cfg.shared_kv)


def _forward_buffers(cfg: Config, x_seq, flat_layers, mix_weights, kv_weight, kv_bias, kv, record):
    if _uses_cpp_loop(cfg, x_seq):
        return torch.ops.fastformers.feedback_recurrence_forward(
            x_seq, kv, cfg.start, mix_weights, kv_weight, kv_bias, *_op_layer_args(cfg, flat_layers), record)
    return _run(cfg, x_seq, _unflatten(flat_layers, cfg.n_layers), mix_weights, kv_weight, kv_bias, kv, record)


class FeedbackRecurrence(torch.autograd.Function):
    """``apply(cfg, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, *layer_params)``
    -> ``(outputs [T, B, D], kv [start + T, B, 2C, H, d])``; the cache output is not differentiable."""

    @staticmethod
    def forward(ctx, cfg: Config, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, *flat_layers):
        kv = _new_cache(cfg, x_seq, initial_kv)
        with torch.no_grad():
            layer_outputs, memories, activations, hidden, stats = _forward_buffers(
                cfg, x_seq, flat_layers, mix_weights, kv_weight, kv_bias, kv, record=True)
        ctx.cfg = cfg
        ctx.kv_bias_is_none = kv_bias is None
        ctx.save_for_backward(layer_outputs, memories, activations, hidden, stats, kv, mix_weights, kv_weight,
                              *flat_layers)
        ctx.mark_non_differentiable(kv)
        return layer_outputs[:, cfg.n_layers].clone(), kv

    @staticmethod
    def backward(ctx, grad_out, _grad_kv):
        cfg: Config = ctx.cfg
        layer_outputs, memories, activations, hidden, stats, kv, mix_weights, kv_weight, *flat_layers = \
            ctx.saved_tensors
        with torch.no_grad():
            if _uses_cpp_loop(cfg, grad_out):
                rows = torch.ops.fastformers.feedback_recurrence_backward(
                    grad_out.contiguous(), layer_outputs, activations, hidden, stats, kv, cfg.start, mix_weights,
                    kv_weight, *_op_layer_args(cfg, flat_layers))
            else:
                rows = _backward_loop(cfg, grad_out, layer_outputs, activations, hidden, stats, kv, mix_weights,
                                      kv_weight, _unflatten(flat_layers, cfg.n_layers))
            grads = _gradients(cfg, rows, layer_outputs, memories, activations, hidden, stats, mix_weights, kv_weight,
                               _unflatten(flat_layers, cfg.n_layers), ctx.kv_bias_is_none)
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


def _gradients(cfg: Config, rows, layer_outputs, memories, activations, hidden, stats, mix_weights, kv_weight, layers,
               kv_bias_is_none):
    """Every input gradient from the recorded row gradients: each weight gradient is
    one GEMM (or reduction) over all ``T · B`` rows."""
    grad_x, grad_memories, row_grads, grad_hidden, grad_kv, grad_pos_emb, grad_pos_bias, grad_query_pos_bias = rows
    T, _, B, D = layer_outputs.shape

    def matrix(t):
        return t.reshape(-1, t.shape[-1])

    def weight_grad(grads, inputs):
        return torch.mm(matrix(grads).t(), matrix(inputs))

    def norm_grads(grad, x, mean, rstd):
        return (grad * ((x - mean[..., None]) * rstd[..., None])).sum((0, 1)), grad.sum((0, 1))

    attended = cfg.start + T > 1  # some token of this call had memory to attend to
    layer_grads = []
    for l, lw in enumerate(layers):
        act, st, r = activations[l], stats[l], row_grads[l]
        grad_norm_ff = norm_grads(r[_G_NORM_FF], act[_MID], st[_MEAN_FF], st[_RSTD_FF])
        if attended:
            grad_norm_attn = norm_grads(r[_G_NORM_ATTN], layer_outputs[:, l], st[_MEAN_ATTN], st[_RSTD_ATTN])
            grad_output_b = None if lw.output_bias is None else r[_G_ATTN_OUT].sum((0, 1))
            attention_grads = [*grad_norm_attn, weight_grad(r[_G_QUERY], act[_NORM_ATTN]),
                               grad_pos_emb[l].to(lw.key_pos_embeddings.dtype),
                               grad_pos_bias[l].to(lw.key_pos_bias.dtype),
                               grad_query_pos_bias[l].to(lw.query_pos_bias.dtype),
                               weight_grad(r[_G_ATTN_OUT], act[_ATTENTION]), grad_output_b]
        else:
            # No token attended: like autograd, report these parameters as unused.
            attention_grads = [None] * 8
        layer_grads += [
            *attention_grads,
            *grad_norm_ff, weight_grad(grad_hidden[l], act[_NORM_FF]),
            None if lw.ff1_bias is None else grad_hidden[l].sum((0, 1)),
            weight_grad(r[_G_LAYER_OUT], hidden[l]),
            None if lw.ff2_bias is None else r[_G_LAYER_OUT].sum((0, 1)),
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
        layer_outputs = _forward_buffers(cfg, x_seq, flat, mix_weights, kv_weight, kv_bias, kv, record=False)[0]
    return layer_outputs[:, cfg.n_layers], kv


def make_config(*, n_layers, heads, d_k, shared_kv, norm_eps, scale, start, backend, device) -> Config:
    forward_kernel, backward_kernel = step_op.step_kernels(backend, device)
    return Config(n_layers, heads, d_k, shared_kv, tuple(norm_eps), float(scale), start, forward_kernel,
                  backward_kernel, backend)


__all__ = ["Config", "LayerWeights", "FeedbackRecurrence", "make_config", "run_recurrence"]
