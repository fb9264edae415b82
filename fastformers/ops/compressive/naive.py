"""Plain-PyTorch references of the Compressive Transformer ops: the oracle of
tests and the baseline of benchmarks, written the way labml_nn computes them.

Shape letters: ``M`` memory length, ``G = M / c`` compressed length, ``c``
compression rate, ``L`` query (segment) length, ``B`` batch, ``H`` heads,
``d_k`` features per head, ``D = H · d_k``.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def conv_compress(mem: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``Conv1d(D, D, kernel=stride=c)`` over time, as labml_nn runs it (permute,
    ``conv1d``, permute back): ``mem [M, B, D]``, ``weight [D, D, c]``, ``bias [D]``
    -> ``[M / c, B, D]``."""
    stride = weight.shape[2]
    return F.conv1d(mem.permute(1, 2, 0), weight, bias, stride=stride).permute(2, 0, 1)


def conv_compress_backward(grad: torch.Tensor, mem: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """Gradients of :func:`conv_compress` for ``mem``, ``weight`` and ``bias``
    (an empty tensor when there is no bias)."""
    c = weight.shape[2]
    M, B, D = mem.shape
    G = M // c
    # out[g, b, o] = bias[o] + Σ_{k, i} mem[g·c + k, b, i] · weight[o, i, k]
    grouped = mem.reshape(G, c, B, D)
    grad_mem = torch.einsum("gbo,oik->gkbi", grad, weight).reshape(M, B, D)
    grad_weight = torch.einsum("gbo,gkbi->oik", grad, grouped)
    grad_bias = grad.sum((0, 1)) if has_bias else grad.new_empty(0)
    return grad_mem, grad_weight, grad_bias


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads: int) -> torch.Tensor:
    return F.linear(x, weight, bias).view(*x.shape[:-1], heads, -1)


def _attention(query, key, value, scale):
    """Content-only softmax attention: ``[L, B, H, d_k]`` queries over ``[K, B, H, d_k]``."""
    scores = torch.einsum("ibhd,jbhd->ijbh", query, key) * scale
    return torch.einsum("ijbh,jbhd->ibhd", torch.softmax(scores, dim=1), value)


def attention_reconstruction_loss(
    h: torch.Tensor,
    mem: torch.Tensor,
    c_mem: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    query_weight: torch.Tensor,
    query_bias: Optional[torch.Tensor],
    key_weight: torch.Tensor,
    key_bias: Optional[torch.Tensor],
    value_weight: torch.Tensor,
    value_bias: Optional[torch.Tensor],
    heads: int,
    scale: float,
) -> torch.Tensor:
    """``MSE(attn(LN(h), LN(c_mem)), attn(LN(h), LN(mem)))``, labml_nn's formulation.

    ``h [L, B, D]`` (the layer's input), ``mem [M, B, D]`` (the memory being
    compressed), ``c_mem [N, B, D]`` (its compression). The layer norm and the
    query/key/value projections (weights ``[D, D]``, biases ``[D]``) are the
    layer's, detached like ``h`` and ``mem``: only ``c_mem`` gets a gradient.
    Returns a scalar.
    """
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    norm_weight, norm_bias = detach(norm_weight), detach(norm_bias)
    wq, bq, wk, bk, wv, bv = map(detach, (query_weight, query_bias, key_weight, key_bias, value_weight, value_bias))
    h = _layer_norm(h.detach(), norm_weight, norm_bias, eps)
    mem = _layer_norm(mem.detach(), norm_weight, norm_bias, eps)
    c_mem = _layer_norm(c_mem, norm_weight, norm_bias, eps)
    query = _heads(h, wq, bq, heads)
    attn_mem = _attention(query, _heads(mem, wk, bk, heads), _heads(mem, wv, bv, heads), scale)
    attn_c_mem = _attention(query, _heads(c_mem, wk, bk, heads), _heads(c_mem, wv, bv, heads), scale)
    return F.mse_loss(attn_c_mem, attn_mem)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_value(x, norm_weight, norm_bias, eps, key_weight, key_bias, value_weight, value_bias, acc):
    """``key``/``value [R, B, E]`` of the layer-normalised ``x [R, B, D]``, in ``acc``."""
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    normed = _layer_norm(x.to(acc), cast(norm_weight), cast(norm_bias), eps)
    return F.linear(normed, cast(key_weight), cast(key_bias)), F.linear(normed, cast(value_weight), cast(value_bias))


def projections(h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias,
                 value_weight, value_bias, acc):
    """``query [L, B, E]`` of ``h`` and ``key_c``/``value_c [N, B, E]`` of ``c_mem``, in ``acc``."""
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    normed_h = _layer_norm(h.to(acc), cast(norm_weight), cast(norm_bias), eps)
    key_c, value_c = key_value(c_mem, norm_weight, norm_bias, eps, key_weight, key_bias, value_weight, value_bias, acc)
    return F.linear(normed_h, cast(query_weight), cast(query_bias)), key_c, value_c


def attention_reconstruction_loss_forward(
    h, mem, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
    value_bias, heads, scale,
):
    """The loss plus what its backward needs, as the registered op returns them.

    Returns ``loss []`` (``h``'s dtype) and, in float32 (float64 for float64
    inputs): ``diff = attn(h, c_mem) - attn(h, mem)`` as ``[L, B, E]`` and
    ``stats [2, L, B, H]``: the log-sum-exp of the scaled ``h``-vs-``c_mem``
    scores and ``Σ_d diff · attn(h, c_mem)``. The backward recomputes the
    projections of ``h`` and ``c_mem`` rather than keeping them.
    """
    acc = _acc_dtype(h.dtype)
    query, key_c, value_c = projections(h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight,
                                         key_bias, value_weight, value_bias, acc)
    key_m, value_m = key_value(mem, norm_weight, norm_bias, eps, key_weight, key_bias, value_weight, value_bias, acc)
    split = lambda t: t.view(*t.shape[:-1], heads, -1)  # noqa: E731
    attn_mem = _attention(split(query), split(key_m), split(value_m), scale)
    scores_c = torch.einsum("ibhd,jbhd->ijbh", split(query), split(key_c)) * scale
    attn_c_mem = torch.einsum("ijbh,jbhd->ibhd", torch.softmax(scores_c, dim=1), split(value_c))
    diff = attn_c_mem - attn_mem
    stats = torch.stack((torch.logsumexp(scores_c, dim=1), (diff * attn_c_mem).sum(-1)))
    loss = diff.square().mean().to(h.dtype)
    return loss, diff.flatten(2), stats


def attention_reconstruction_loss_backward(
    grad, h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
    value_bias, heads, scale, diff, stats,
):
    """Gradient of the loss for ``c_mem [N, B, D]`` from the inputs and the
    forward's ``diff`` and ``stats``."""
    acc = diff.dtype
    query, key_c, value_c = projections(h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight,
                                         key_bias, value_weight, value_bias, acc)
    split = lambda t: t.view(*t.shape[:-1], heads, -1)  # noqa: E731
    query, key_c, value_c, diff = map(split, (query, key_c, value_c, diff))
    lse, delta = stats
    coef = grad.to(acc) * 2 / diff.numel()
    probs = torch.exp(torch.einsum("ibhd,jbhd->ijbh", query, key_c) * scale - lse[:, None])
    grad_attn = coef * diff
    grad_value = torch.einsum("ijbh,ibhd->jbhd", probs, grad_attn)
    grad_scores = probs * (torch.einsum("ibhd,jbhd->ijbh", grad_attn, value_c) - coef * delta[:, None])
    grad_key = torch.einsum("ijbh,ibhd->jbhd", grad_scores, query) * scale
    return grad_c_mem(grad_key.flatten(2), grad_value.flatten(2), c_mem, norm_weight, eps, key_weight, value_weight)


def grad_c_mem(grad_key, grad_value, c_mem, norm_weight, eps, key_weight, value_weight):
    """Gradient for ``c_mem [N, B, D]`` (in its dtype) of its keys and values
    ``[N, B, E]`` (accumulation dtype), back through the projections and the layer norm."""
    acc = grad_key.dtype
    grad_normed = grad_key @ key_weight.to(acc) + grad_value @ value_weight.to(acc)
    x = c_mem.to(acc)
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    x_hat = (x - mean) * rstd
    g = grad_normed if norm_weight is None else grad_normed * norm_weight.to(acc)
    grad = rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    return grad.to(c_mem.dtype)
