"""The whole Feedback Transformer recurrence as one autograd function.

Per token the model runs every layer (pre-norm attention over the memory, then
a feed-forward: ReLU, GELU, SiLU, sigmoid or identity, optionally gated),
mixes the embedding and layer outputs into one memory vector
``m_t = Σ_l softmax(w)_l x_l`` and projects it to keys and values that
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
share one backward.

Dropout (labml's three sites per layer: the attention probabilities, the
residual branches ``x + dropout(attn)`` / ``x + dropout(ff)``, the
feed-forward hidden ``layer2(dropout(act(layer1 x)))``) comes from ONE Philox
stream ``(seed, offset)`` per call (:mod:`fastformers.ops.dropout`); masks are
regenerated in backward, never stored. With ``S = max(start + T - 1, 0)`` (the
most memory steps a token of the call attends to) the per-token sizes of the
sites are (:data:`DROPOUT_SITES` order) attention ``B·H·S``, attention residual
``B·D``, hidden ``B·F``, feed-forward residual ``B·D``; ``W`` is their sum.
Element ``n`` of token ``i``, layer ``l``, site ``k`` is stream element
``offset + T·(l·W + Σ_{k'<k} size_k') + i·size_k + n``: each (layer, site) owns
a contiguous ``[T, size_k]`` range (what ``dropout.record()`` reports), each
token a fixed stride inside it. Token ``i`` attends ``t = start + i`` steps and
uses the first ``B·H·t`` elements of its attention range as the step op's
``[B, H, t]`` mask; the others use the row-major ``[B, D]`` / ``[B, F]`` layouts.

Shape letters: ``T`` tokens in this call, ``B`` batch, ``D`` = d_model,
``H`` heads, ``d`` = d_k, ``F`` = d_ff, ``P`` rows of the positional tables.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from ..._library import lib, qualname
from .. import dropout
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
    query_bias: Optional[torch.Tensor] = None  # [D]
    gate_weight: Optional[torch.Tensor] = None  # [F, D]: the gated feed-forward's linear_v
    gate_bias: Optional[torch.Tensor] = None  # [F]

    FIELDS = (
        "norm_attn_weight", "norm_attn_bias", "query_weight", "key_pos_embeddings", "key_pos_bias",
        "query_pos_bias", "output_weight", "output_bias", "norm_ff_weight", "norm_ff_bias", "ff1_weight",
        "ff1_bias", "ff2_weight", "ff2_bias", "query_bias", "gate_weight", "gate_bias",
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
    activation: str = "relu"  # one of ACTIVATIONS_FUNCTIONS
    dropout_p: tuple = ()  # per layer (attention, residual, hidden) probabilities; () = no dropout
    seed: int = 0
    offset: int = 0

    @property
    def n_caches(self) -> int:
        return 1 if self.shared_kv else self.n_layers

    def p(self, layer: int, site: int) -> float:
        return self.dropout_p[3 * layer + _P_INDEX[site]] if self.dropout_p else 0.0

    def dropout_active(self) -> bool:
        return any(p > 0 for p in self.dropout_p)


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
# hidden [N, 2 or 3, T, B, F]: the second linear's input (after activation,
# gate and dropout), the first linear's output, the gate's output (gated only).
HIDDEN = ("ff2_input", "ff1_output", "gate")
# grad_hidden [N, 1 or 2, T, B, F]: gradients of the first linear's and the gate's outputs.
GRAD_HIDDEN = ("ff1_output", "gate")
_NORM_ATTN, _QUERY, _ATTENTION, _MID, _NORM_FF = range(5)
_MEAN_ATTN, _RSTD_ATTN, _MEAN_FF, _RSTD_FF = range(4)
_G_FF_OUT, _G_NORM_FF, _G_ATTN_OUT, _G_QUERY, _G_NORM_ATTN = range(5)
_FF2_INPUT, _FF1_OUTPUT, _GATE = range(3)

# Feed-forward activations the loops implement (the C++ loop's Activation enum).
ACTIVATION_FUNCTIONS = ("relu", "gelu", "silu", "sigmoid", "identity")
# Dropout sites of a layer in stream order, and which of the layer's three
# probabilities (attention, residual, hidden) each uses.
DROPOUT_SITES = ("attention", "attention_residual", "hidden", "ff_residual")
_SITE_ATTENTION, _SITE_ATTN_RESIDUAL, _SITE_HIDDEN, _SITE_FF_RESIDUAL = range(4)
_P_INDEX = (0, 1, 2, 1)


def dropout_site_sizes(T: int, B: int, D: int, F: int, heads: int, start: int):
    """Per-token element counts of the four dropout sites of one layer (module docstring)."""
    steps = max(start + T - 1, 0)
    return (B * heads * steps, B * D, B * F, B * D)


def dropout_site_offset(cfg: "Config", sizes, T: int, token: int, layer: int, site: int) -> int:
    """Stream element of ``(token, layer, site)``'s first mask element (module docstring)."""
    return cfg.offset + T * (layer * sum(sizes) + sum(sizes[:site])) + token * sizes[site]

_CACHE_ARGS = "Tensor kv, int start, Tensor mix_weights, Tensor kv_weight"
_LAYER_ARGS = ("Tensor?[] layer_params, float[] norm_eps, int heads, float scale, bool shared_kv, str activation, "
               "float[] dropout_p, int seed, int offset")
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


def _activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return x


def _activation_backward(name: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad · act'(x)``."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(grad, x, 0)
    if name == "gelu":
        return aten.gelu_backward(grad, x)
    if name == "silu":
        return aten.silu_backward(grad, x)
    if name == "sigmoid":
        return aten.sigmoid_backward(grad, torch.sigmoid(x))
    return grad


class _Masks:
    """Dropout multipliers (``1/(1-p)`` kept, 0 dropped) of one call's sites, from the
    device's keep-mask kernel at the stream elements of the module docstring."""

    def __init__(self, cfg: "Config", T: int, B: int, D: int, F: int):
        self.cfg, self.T = cfg, T
        self.sizes = dropout_site_sizes(T, B, D, F, cfg.heads, cfg.start)

    def offset(self, token: int, layer: int, site: int) -> int:
        return dropout_site_offset(self.cfg, self.sizes, self.T, token, layer, site)

    def site(self, token: int, layer: int, site: int):
        """``(p, seed, offset)`` of a site's mask for this token (p = 0: none)."""
        return self.cfg.p(layer, site), self.cfg.seed, self.offset(token, layer, site)

    def multipliers(self, token: int, layer: int, site: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Multipliers shaped like ``like``; None when the site's p is 0."""
        return _keep_scale(self.site(token, layer, site), like)


def _keep_scale(site, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Multipliers shaped like ``like`` of a site ``(p, seed, offset)``; None when p is 0."""
    p, seed, offset = site
    if p == 0:
        return None
    keep = torch.ops.fastformers.dropout_keep_mask(like, seed, offset, p)
    return keep.to(like.dtype) * (1.0 / (1.0 - p))


class _AtenRows:
    """The loops' work around their GEMMs, one ATen call at a time: the
    reference, and every backend without fused row kernels. ``site`` arguments
    are ``(p, seed, offset)`` of a dropout site, ``norm`` ones
    ``(weight, bias, eps, z, mean, rstd)`` with the outputs of a layer norm."""

    def __init__(self, cfg: "Config"):
        self.cfg = cfg

    def norm(self, x, weight, bias, eps, z, mean, rstd):
        normed, m, r = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        z.copy_(normed)
        mean.copy_(m.view(mean.shape))
        rstd.copy_(r.view(rstd.shape))

    def attend(self, query, key_cache, value_cache, steps, layer: "LayerWeights", site, out):
        p, seed, offset = site
        out.copy_(self.cfg.forward_kernel(query, key_cache, value_cache, steps, layer.key_pos_embeddings,
                                          layer.key_pos_bias, layer.query_pos_bias, self.cfg.scale, p, seed,
                                          offset).view(out.shape))

    def residual(self, x, branch_input, weight_t, bias, site, out, norm=None):
        """``out = x + dropout(branch_input @ weight_t + bias)``, then the layer norm of ``out``."""
        _residual_add(x, branch_input, weight_t, bias, _keep_scale(site, x), out=out)
        if norm is not None:
            self.norm(out, *norm)

    def hidden(self, ff1_output, gate, site, out):
        """``out = dropout(act(ff1_output) [· gate])``."""
        value = _activate(self.cfg.activation, ff1_output)
        if gate is not None:
            value = value * gate
        keep = _keep_scale(site, out)
        out.copy_(value if keep is None else value * keep)

    def memory(self, layer_outputs, mix_weights, out):
        out.copy_(_feedback_memory_functional(layer_outputs, mix_weights, backend=self.cfg.memory_backend))

    # Backward.

    def mix_probabilities(self, mix_weights):
        """``softmax(mix_weights)`` as :meth:`norm_backward`'s ``memory`` takes it."""
        return torch.softmax(mix_weights.double(), 0).tolist()

    def mask(self, grad, site, out):
        """``out = grad · dropout multipliers of site``."""
        out.copy_(_masked(grad, _keep_scale(site, grad)))

    def hidden_backward(self, grad, ff1_output, gate, site, grad_ff1_output, grad_gate):
        """Gradients of the first linear's and the gate's outputs from the gradient of :meth:`hidden`'s output."""
        grad = _masked(grad, _keep_scale(site, ff1_output))
        if gate is not None:
            grad_gate.copy_(grad * _activate(self.cfg.activation, ff1_output))
            grad = grad * gate
        grad_ff1_output.copy_(_activation_backward(self.cfg.activation, grad, ff1_output))

    def norm_backward(self, grad_z, x, mean, rstd, weight, residual, memory=None, masked=None):
        """The layer norm's input gradient + ``residual`` (+ ``probabilities[layer] · grad_memory``
        for ``memory = (grad_memory, probabilities, layer)``); with ``masked = (site, out)`` also
        ``out`` = that times the site's dropout multipliers."""
        B = x.shape[0]
        g = _layer_norm_input_grad(grad_z, x, mean.view(B, 1), rstd.view(B, 1), weight)
        g += residual
        if memory is not None:
            grad_memory, probabilities, layer = memory
            g.add_(grad_memory, alpha=probabilities[layer])
        if masked is not None:
            self.mask(g, *masked)
        return g


class _TritonRows(_AtenRows):
    """The same work in fused Triton kernels (:mod:`.triton_kernel`). Forward: the
    layer norms write their record slots themselves, bias, dropout and residual
    add are one epilogue after the branch GEMM, fused with the next layer norm;
    the attention step and the memory write their record slots. Backward: the
    hidden dropout, gate and activation slope are one kernel; a layer norm's input
    gradient, the residual gradient, the memory's share and the next residual
    dropout mask are another. No launch depends on a device value, so the loops
    never wait for the GPU (and the forward can be captured in a CUDA graph)."""

    def __init__(self, cfg: "Config", like: torch.Tensor):
        from . import triton_kernel

        super().__init__(cfg)
        self.kernels = triton_kernel
        self.no_bias = like.new_zeros(like.shape[-1])  # layers without a branch bias add these

    def norm(self, x, weight, bias, eps, z, mean, rstd):
        self.kernels.residual_norm(x, None, self.no_bias, 0.0, 0, 0, out=x, norm=(weight, bias, eps, z, mean, rstd))

    def attend(self, query, key_cache, value_cache, steps, layer, site, out):
        self.kernels.attention_step_forward(query, key_cache, value_cache, steps, layer.key_pos_embeddings,
                                            layer.key_pos_bias, layer.query_pos_bias, self.cfg.scale, *site,
                                            out=out.view(query.shape))

    def residual(self, x, branch_input, weight_t, bias, site, out, norm=None):
        branch = torch.mm(branch_input, weight_t)
        self.kernels.residual_norm(x, branch, self.no_bias if bias is None else bias, *site, out=out, norm=norm)

    def hidden(self, ff1_output, gate, site, out):
        self.kernels.ffn_hidden(ff1_output, gate, self.cfg.activation, *site, out=out)

    def memory(self, layer_outputs, mix_weights, out):
        self.kernels.feedback_memory_forward(layer_outputs, mix_weights, out=out)

    def mix_probabilities(self, mix_weights):
        # A device tensor the kernels read: no host value (and float64 exact for float64 models).
        return torch.softmax(mix_weights.to(self.kernels._acc_dtype(mix_weights.dtype)[1]), 0)

    def hidden_backward(self, grad, ff1_output, gate, site, grad_ff1_output, grad_gate):
        self.kernels.ffn_hidden_backward(grad, ff1_output, gate, self.cfg.activation, *site, grad_ff1_output,
                                         grad_gate)

    def norm_backward(self, grad_z, x, mean, rstd, weight, residual, memory=None, masked=None):
        return self.kernels.norm_backward(grad_z, x, mean, rstd, weight, residual, torch.empty_like(residual),
                                          memory, masked)


def _row_ops(cfg: "Config", x: torch.Tensor) -> _AtenRows:
    """Fused row kernels for the triton backend in the dtypes they take, ATen calls otherwise."""
    from . import triton_kernel

    fused = (cfg.memory_backend == "triton" and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
             and x.shape[-1] <= triton_kernel.max_row_block(x.element_size()))
    return _TritonRows(cfg, x) if fused else _AtenRows(cfg)


def _run(cfg: Config, x_seq: torch.Tensor, layers: Sequence[LayerWeights], mix_weights: torch.Tensor,
         kv_weight: torch.Tensor, kv_bias: Optional[torch.Tensor], kv: torch.Tensor, record: bool):
    """Forward over ``x_seq [T, B, D]`` writing keys/values of steps ``start .. start+T-1``
    into ``kv``. Returns ``(layer_outputs [T, N+1, B, D], memories [T', B, D],
    activations [N, 5, T', B, D], hidden [N, 2|3, T', B, F], stats [N, 4, T', B])``
    with ``T' = T`` if ``record`` else 1 (one reused slot)."""
    T, B, D = x_seq.shape
    H, d = cfg.heads, cfg.d_k
    N = cfg.n_layers
    F = layers[0].ff1_weight.shape[0]
    gated = layers[0].gate_weight is not None
    slots = T if record else 1
    masks = _Masks(cfg, T, B, D, F)
    rows = _row_ops(cfg, x_seq)
    kv_weight_t = kv_weight.t()
    prepared = [
        (lw, lw.query_weight.t(), lw.output_weight.t(), lw.ff1_weight.t(), lw.ff2_weight.t(),
         None if lw.gate_weight is None else lw.gate_weight.t(), *_cache_views(kv, l, cfg.shared_kv))
        for l, lw in enumerate(layers)
    ]
    layer_outputs = x_seq.new_empty((T, N + 1, B, D))
    layer_outputs[:, 0] = x_seq
    memories = x_seq.new_empty((slots, B, D))
    activations = x_seq.new_zeros((N, len(ACTIVATIONS), slots, B, D))
    hidden = x_seq.new_empty((N, 3 if gated else 2, slots, B, F))
    stats = x_seq.new_zeros((N, len(STATS), slots, B))
    for i in range(T):
        t = cfg.start + i
        s = i if record else 0
        x = layer_outputs[i, 0]
        for l, (lw, wq_t, wo_t, w1_t, w2_t, wg_t, key_cache, value_cache) in enumerate(prepared):
            eps_attn, eps_ff = cfg.norm_eps[l]
            act, st = activations[l, :, s], stats[l, :, s]
            xm = act[_MID]
            norm_ff = (lw.norm_ff_weight, lw.norm_ff_bias, eps_ff, act[_NORM_FF], st[_MEAN_FF], st[_RSTD_FF])
            if t > 0:
                rows.norm(x, lw.norm_attn_weight, lw.norm_attn_bias, eps_attn, act[_NORM_ATTN], st[_MEAN_ATTN],
                          st[_RSTD_ATTN])
                _linear(act[_NORM_ATTN], wq_t, lw.query_bias, out=act[_QUERY])
                rows.attend(act[_QUERY].view(B, H, d), key_cache, value_cache, t, lw,
                            masks.site(i, l, _SITE_ATTENTION), out=act[_ATTENTION])
                rows.residual(x, act[_ATTENTION], wo_t, lw.output_bias, masks.site(i, l, _SITE_ATTN_RESIDUAL),
                              out=xm, norm=norm_ff)
            else:
                xm.copy_(x)
                rows.norm(xm, *norm_ff)
            h = hidden[l, :, s]
            _linear(act[_NORM_FF], w1_t, lw.ff1_bias, out=h[_FF1_OUTPUT])
            if gated:
                _linear(act[_NORM_FF], wg_t, lw.gate_bias, out=h[_GATE])
            rows.hidden(h[_FF1_OUTPUT], h[_GATE] if gated else None, masks.site(i, l, _SITE_HIDDEN),
                        out=h[_FF2_INPUT])
            x = layer_outputs[i, l + 1]
            rows.residual(xm, h[_FF2_INPUT], w2_t, lw.ff2_bias, masks.site(i, l, _SITE_FF_RESIDUAL), out=x)
        rows.memory(layer_outputs[i], mix_weights, out=memories[s])
        _linear(memories[s], kv_weight_t, kv_bias, out=kv[t].view(B, -1))
    return layer_outputs, memories, activations, hidden, stats


def _linear(x, weight_t, bias, *, out):
    if bias is None:
        return torch.mm(x, weight_t, out=out)
    return torch.addmm(bias, x, weight_t, out=out)


def _residual_add(x, branch_input, weight_t, bias, keep_scale, *, out):
    """``out = x + dropout(branch_input @ weight_t + bias)`` (``keep_scale`` None: no dropout)."""
    if keep_scale is None:
        torch.addmm(x, branch_input, weight_t, out=out)
        if bias is not None:
            out += bias
        return
    torch.add(x, _linear(branch_input, weight_t, bias, out=torch.empty_like(out)) * keep_scale, out=out)


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
    grad_hidden [N, 1|2, T, B, F], grad_kv (like kv), grad_key_pos_embeddings [N, P, H, d],
    grad_key_pos_bias [N, P, H], grad_query_pos_bias [N, H, d])``."""
    T, N1, B, D = layer_outputs.shape
    N = cfg.n_layers
    H, d = cfg.heads, cfg.d_k
    F = hidden.shape[-1]
    gated = hidden.shape[1] == 3
    masks = _Masks(cfg, T, B, D, F)
    grad_out = grad_out.contiguous()
    probs = torch.softmax(mix_weights.double(), 0).tolist()
    wide = _accumulate_dtype(kv.dtype)
    grad_kv = torch.zeros(kv.shape, dtype=wide, device=kv.device)
    kv_weight_wide = kv_weight.to(wide)
    grad_x = torch.empty_like(grad_out)
    grad_memories = torch.empty_like(grad_out)
    row_grads = grad_out.new_zeros((N, len(ROW_GRADS), T, B, D))
    grad_hidden = hidden.new_empty((N, 2 if gated else 1, T, B, F))
    P = layers[0].key_pos_embeddings.shape[0]
    grad_pos_emb = grad_out.new_zeros((N, P, H, d), dtype=wide)
    grad_pos_bias = grad_out.new_zeros((N, P, H), dtype=wide)
    grad_query_pos_bias = grad_out.new_zeros((N, H, d), dtype=wide)
    views = [(_cache_views(kv, l, cfg.shared_kv), _cache_views(grad_kv, l, cfg.shared_kv)) for l in range(N)]
    accumulate = cfg.backward_kernel
    rows = _row_ops(cfg, grad_out)
    mix = rows.mix_probabilities(mix_weights)
    for i in range(T - 1, -1, -1):
        t = cfg.start + i
        gm = grad_memories[i]
        gm.copy_(torch.mm(grad_kv[t].view(B, -1), kv_weight_wide))
        g = torch.add(grad_out[i], gm, alpha=probs[N])
        rows.mask(g, masks.site(i, N - 1, _SITE_FF_RESIDUAL), out=row_grads[N - 1, _G_FF_OUT, i])
        for l in range(N - 1, -1, -1):
            lw, act, st, r = layers[l], activations[l, :, i], stats[l, :, i], row_grads[l, :, i]
            h, gh = hidden[l, :, i], grad_hidden[l, :, i]
            # r[_G_FF_OUT]: g through this layer's feed-forward residual dropout (written by the step above).
            rows.hidden_backward(torch.mm(r[_G_FF_OUT], lw.ff2_weight), h[_FF1_OUTPUT], h[_GATE] if gated else None,
                                 masks.site(i, l, _SITE_HIDDEN), gh[0], gh[1] if gated else None)
            torch.mm(gh[0], lw.ff1_weight, out=r[_G_NORM_FF])
            if gated:
                r[_G_NORM_FF] += torch.mm(gh[1], lw.gate_weight)
            norm_ff = (r[_G_NORM_FF], act[_MID], st[_MEAN_FF], st[_RSTD_FF], lw.norm_ff_weight)
            # The layer input's gradient is the layer below's output gradient: masked for its residual dropout.
            below = (masks.site(i, l - 1, _SITE_FF_RESIDUAL), row_grads[l - 1, _G_FF_OUT, i]) if l > 0 else None
            if t > 0:
                gxm = rows.norm_backward(*norm_ff, g, masked=(masks.site(i, l, _SITE_ATTN_RESIDUAL), r[_G_ATTN_OUT]))
                ga = torch.mm(r[_G_ATTN_OUT], lw.output_weight).view(B, H, d)
                (key_cache, value_cache), (grad_key, grad_value) = views[l]
                r[_G_QUERY] = accumulate(ga, act[_QUERY].view(B, H, d), key_cache, value_cache, t,
                                         lw.key_pos_embeddings, lw.key_pos_bias, lw.query_pos_bias, cfg.scale,
                                         cfg.p(l, _SITE_ATTENTION), cfg.seed, masks.offset(i, l, _SITE_ATTENTION),
                                         grad_key, grad_value, grad_pos_emb[l], grad_pos_bias[l],
                                         grad_query_pos_bias[l]).view(B, D)
                torch.mm(r[_G_QUERY], lw.query_weight, out=r[_G_NORM_ATTN])
                g = rows.norm_backward(r[_G_NORM_ATTN], layer_outputs[i, l], st[_MEAN_ATTN], st[_RSTD_ATTN],
                                       lw.norm_attn_weight, gxm, memory=(gm, mix, l), masked=below)
            else:
                g = rows.norm_backward(*norm_ff, g, memory=(gm, mix, l), masked=below)
        grad_x[i] = g
    return grad_x, grad_memories, row_grads, grad_hidden, grad_kv, grad_pos_emb, grad_pos_bias, grad_query_pos_bias


def _masked(x: torch.Tensor, keep_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return x if keep_scale is None else x * keep_scale


def _op_config(start, layer_params, norm_eps, heads, scale, shared_kv, activation, dropout_p, seed, offset,
               x) -> Config:
    """The reference kernels' configuration for the registered ops' arguments."""
    n_layers = len(layer_params) // len(LayerWeights.FIELDS)
    eps = tuple(zip(norm_eps[0::2], norm_eps[1::2]))
    return make_config(n_layers=n_layers, heads=heads, d_k=x.shape[-1] // heads, shared_kv=shared_kv, norm_eps=eps,
                       scale=scale, start=start, backend="reference", device=x.device, activation=activation,
                       dropout_p=dropout_p, seed=seed, offset=offset)


def _forward_reference(x_seq, kv, start, mix_weights, kv_weight, kv_bias, layer_params, norm_eps, heads, scale,
                       shared_kv, activation, dropout_p, seed, offset, record):
    cfg = _op_config(start, layer_params, norm_eps, heads, scale, shared_kv, activation, dropout_p, seed, offset,
                     x_seq)
    return _run(cfg, x_seq, _unflatten(layer_params, cfg.n_layers), mix_weights, kv_weight, kv_bias, kv, record)


def _backward_reference(grad_out, layer_outputs, activations, hidden, stats, kv, start, mix_weights, kv_weight,
                        layer_params, norm_eps, heads, scale, shared_kv, activation, dropout_p, seed, offset):
    cfg = _op_config(start, layer_params, norm_eps, heads, scale, shared_kv, activation, dropout_p, seed, offset,
                     grad_out)
    return _backward_loop(cfg, grad_out, layer_outputs, activations, hidden, stats, kv, mix_weights, kv_weight,
                          _unflatten(layer_params, cfg.n_layers))


lib.impl("feedback_recurrence_forward", _forward_reference, "CompositeExplicitAutograd")
lib.impl("feedback_recurrence_backward", _backward_reference, "CompositeExplicitAutograd")


def _hidden_slots(layer_params) -> int:
    return 2 if layer_params[LayerWeights.FIELDS.index("gate_weight")] is None else 3


@torch.library.register_fake(qualname("feedback_recurrence_forward"))
def _forward_fake(x_seq, kv, start, mix_weights, kv_weight, kv_bias, layer_params, norm_eps, heads, scale, shared_kv,
                  activation, dropout_p, seed, offset, record):
    T, B, D = x_seq.shape
    N = len(layer_params) // len(LayerWeights.FIELDS)
    F = layer_params[LayerWeights.FIELDS.index("ff1_weight")].shape[0]
    slots = T if record else 1
    new = x_seq.new_empty
    return (new((T, N + 1, B, D)), new((slots, B, D)), new((N, len(ACTIVATIONS), slots, B, D)),
            new((N, _hidden_slots(layer_params), slots, B, F)), new((N, len(STATS), slots, B)))


@torch.library.register_fake(qualname("feedback_recurrence_backward"))
def _backward_fake(grad_out, layer_outputs, activations, hidden, stats, kv, start, mix_weights, kv_weight,
                   layer_params, norm_eps, heads, scale, shared_kv, activation, dropout_p, seed, offset):
    T, B, D = grad_out.shape
    N = len(layer_params) // len(LayerWeights.FIELDS)
    P, H, d = layer_params[LayerWeights.FIELDS.index("key_pos_embeddings")].shape
    wide = _accumulate_dtype(kv.dtype)
    new = grad_out.new_empty
    grad_hidden_shape = (N, _hidden_slots(layer_params) - 1, *hidden.shape[2:])
    return (new((T, B, D)), new((T, B, D)), new((N, len(ROW_GRADS), T, B, D)), hidden.new_empty(grad_hidden_shape),
            kv.new_empty(kv.shape, dtype=wide), new((N, P, H, d), dtype=wide), new((N, P, H), dtype=wide),
            new((N, H, d), dtype=wide))


def _uses_cpp_loop(cfg: Config, x: torch.Tensor) -> bool:
    """The C++ loop serves the cpp backend in float32/float64 (its GEMMs are BLAS
    sgemm/dgemm); other dtypes and backends run :func:`_run` / :func:`_backward_loop`."""
    return cfg.memory_backend == "cpp" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _op_layer_args(cfg: Config, flat_layers):
    return (list(flat_layers), [eps for pair in cfg.norm_eps for eps in pair], cfg.heads, cfg.scale, cfg.shared_kv,
            cfg.activation, list(cfg.dropout_p), cfg.seed, cfg.offset)


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

    def bias_grad(bias, grads):
        return None if bias is None else grads.sum((0, 1))

    attended = cfg.start + T > 1  # some token of this call had memory to attend to
    layer_grads = []
    for l, lw in enumerate(layers):
        act, st, r, h, gh = activations[l], stats[l], row_grads[l], hidden[l], grad_hidden[l]
        grad_norm_ff = norm_grads(r[_G_NORM_FF], act[_MID], st[_MEAN_FF], st[_RSTD_FF])
        if attended:
            grad_norm_attn = norm_grads(r[_G_NORM_ATTN], layer_outputs[:, l], st[_MEAN_ATTN], st[_RSTD_ATTN])
            attention_grads = [*grad_norm_attn, weight_grad(r[_G_QUERY], act[_NORM_ATTN]),
                               grad_pos_emb[l].to(lw.key_pos_embeddings.dtype),
                               grad_pos_bias[l].to(lw.key_pos_bias.dtype),
                               grad_query_pos_bias[l].to(lw.query_pos_bias.dtype),
                               weight_grad(r[_G_ATTN_OUT], act[_ATTENTION]), bias_grad(lw.output_bias, r[_G_ATTN_OUT])]
            query_bias_grad = bias_grad(lw.query_bias, r[_G_QUERY])
        else:
            # No token attended: like autograd, report these parameters as unused.
            attention_grads, query_bias_grad = [None] * 8, None
        gated = lw.gate_weight is not None
        layer_grads += [
            *attention_grads,
            *grad_norm_ff, weight_grad(gh[0], act[_NORM_FF]), bias_grad(lw.ff1_bias, gh[0]),
            weight_grad(r[_G_FF_OUT], h[_FF2_INPUT]), bias_grad(lw.ff2_bias, r[_G_FF_OUT]),
            query_bias_grad,
            weight_grad(gh[1], act[_NORM_FF]) if gated else None, bias_grad(lw.gate_bias, gh[1]) if gated else None,
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
                   write_in_place: bool = False, graphs=None):
    """Outputs ``[T, B, D]`` of the last layer (before the final norm) and the
    cache ``[>= start + T, B, 2C, H, d]``; differentiable w.r.t. inputs and
    weights (not the initial cache).

    ``write_in_place`` (no-grad calls only): write the new keys/values into
    ``initial_kv`` itself, which must hold ``start + T`` rows; generation then
    costs one step per token instead of a cache copy per token.

    ``graphs`` (a :class:`.cuda_graph.RecurrenceGraphs`; no-grad calls that
    :func:`.cuda_graph.graph_blocker` accepts): replay the token loop from a
    CUDA graph captured for these shapes."""
    flat = [getattr(lw, name) for lw in layers for name in LayerWeights.FIELDS]
    cfg = _draw_dropout(cfg, x_seq, layers)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_seq, mix_weights, kv_weight, kv_bias, *flat)
    )
    if graphs is not None:
        if needs_grad:
            raise ValueError("graphs replay no-grad calls only: run under torch.no_grad()")
        return graphs.run(cfg, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, layers, write_in_place)
    if needs_grad:
        return FeedbackRecurrence.apply(cfg, x_seq, initial_kv, mix_weights, kv_weight, kv_bias, *flat)
    with torch.no_grad():
        kv = initial_kv if write_in_place else _new_cache(cfg, x_seq, initial_kv)
        layer_outputs = _forward_buffers(cfg, x_seq, flat, mix_weights, kv_weight, kv_bias, kv, record=False)[0]
    return layer_outputs[:, cfg.n_layers], kv


def _draw_dropout(cfg: Config, x_seq: torch.Tensor, layers: Sequence[LayerWeights]) -> Config:
    """``cfg`` with this call's ``(seed, offset)`` (torch's default generator) when
    some dropout is active; each active (layer, site) is reported to ``dropout.record()``
    as ``feedback_recurrence[layer l].site`` with mask shape ``[T, per-token size]``."""
    if not cfg.dropout_active():
        return cfg
    T, B, D = x_seq.shape
    sizes = dropout_site_sizes(T, B, D, layers[0].ff1_weight.shape[0], cfg.heads, cfg.start)
    seed, offset = dropout.next_seed_offset(x_seq.device, cfg.n_layers * T * sum(sizes))
    cfg = dataclasses.replace(cfg, seed=seed, offset=offset)
    for layer in range(cfg.n_layers):
        for site, name in enumerate(DROPOUT_SITES):
            p = cfg.p(layer, site)
            if p > 0 and sizes[site] > 0:
                dropout.draw(f"feedback_recurrence[layer {layer}].{name}", p, (T, sizes[site]), x_seq.device,
                             seed=seed, offset=dropout_site_offset(cfg, sizes, T, 0, layer, site))
    return cfg


def make_config(*, n_layers, heads, d_k, shared_kv, norm_eps, scale, start, backend, device, activation="relu",
                dropout_p=(), seed=0, offset=0) -> Config:
    """``dropout_p``: per layer (attention, residual, hidden) probabilities, or () for none;
    ``seed``/``offset`` are drawn by :func:`run_recurrence` when some p > 0."""
    if activation not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"activation must be one of {ACTIVATION_FUNCTIONS}, got {activation!r}")
    dropout_p = tuple(dropout.check_p(p, "dropout_p") for p in dropout_p)
    if dropout_p and len(dropout_p) != 3 * n_layers:
        raise ValueError(f"dropout_p must hold 3 probabilities per layer ({3 * n_layers}), got {len(dropout_p)}")
    if not any(dropout_p):
        dropout_p = ()
    forward_kernel, backward_kernel = step_op.step_kernels(backend, device)
    return Config(n_layers, heads, d_k, shared_kv, tuple(norm_eps), float(scale), start, forward_kernel,
                  backward_kernel, backend, activation, dropout_p, int(seed), int(offset))


__all__ = ["Config", "LayerWeights", "FeedbackRecurrence", "make_config", "run_recurrence", "DROPOUT_SITES",
           "dropout_site_sizes"]
