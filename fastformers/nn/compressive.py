"""Compressive Transformer: Transformer-XL whose oldest memories are compressed
by a strided 1-D convolution, plus the attention-reconstruction loss that
trains the compression.

Shape letters: ``L`` segment length, ``M`` memory length, ``N`` compressed
memory length, ``c`` compression rate, ``B`` batch, ``H`` heads, ``d_k``
features per head, ``D`` = ``d_model``.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backend import resolve_backend
from ._utils import clone_module_list
from .attention import FeedForward, PrepareForMultiHeadAttention, RelativeMultiHeadAttention


class Conv1dCompression(nn.Module):
    """Compression ``f_c``: every ``c`` consecutive memories become one, via a
    ``Conv1d`` with kernel size and stride ``c`` (parameters kept as ``conv``,
    ``[D, D, c]`` and ``[D]``, so the ``state_dict`` is labml's).

    ``backend`` (settable; None = automatic) selects the implementation of the
    ``conv_compress`` op; ``last_backend`` records the one the last forward used.
    """

    def __init__(self, compression_rate: int, d_model: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=compression_rate, stride=compression_rate)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def forward(self, mem: torch.Tensor) -> torch.Tensor:
        """``mem`` ``[M, B, D]`` -> ``[M // c, B, D]``; like ``nn.Conv1d``, a last
        incomplete group of fewer than ``c`` memories is left out."""
        backend = self.last_backend = resolve_backend(mem.device, self.backend)
        rate = self.conv.stride[0]
        whole = mem[: mem.shape[0] // rate * rate] if mem.dim() == 3 else mem
        return ops.conv_compress(whole, self.conv.weight, self.conv.bias, backend=backend)


class CompressiveTransformerLayer(nn.Module):
    """One pre-norm layer attending over ``[compressed memory, memory, segment]``."""

    def __init__(self, *,
                 d_model: int,
                 self_attn: RelativeMultiHeadAttention,
                 feed_forward: FeedForward,
                 dropout_prob: float,
                 compress: Conv1dCompression):
        super().__init__()
        self.compress = compress
        self.size = d_model
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        self.norm_self_attn = nn.LayerNorm([d_model])
        self.norm_ff = nn.LayerNorm([d_model])

    def concat_memory(self, z: torch.Tensor, mem: Optional[torch.Tensor],
                      c_mem: Optional[torch.Tensor]) -> torch.Tensor:
        """Keys for the attention: normalised ``[c_mem, mem]`` followed by ``z``.

        ``z`` ``[L, B, D]`` is already normalised; ``mem`` ``[M, B, D]`` and
        ``c_mem`` ``[N, B, D]`` are not. Compressed memory is only used when
        there is memory. Returns ``[N + M + L, B, D]``.
        """
        if mem is None:
            return z
        if c_mem is not None:
            mem = torch.cat((c_mem, mem), dim=0)
        return torch.cat((self.norm_self_attn(mem), z), dim=0)

    def forward(self, *,
                x: torch.Tensor,
                mem: Optional[torch.Tensor],
                c_mem: Optional[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[L, B, D]``, ``mem`` ``[M, B, D]`` or None, ``c_mem`` ``[N, B, D]``
        or None, ``mask`` ``[L, N + M + L, B or 1]``. Returns ``[L, B, D]``."""
        # As concat_memory, with one cat and one LayerNorm over [c_mem; mem; x]
        # (row-wise, so identical) and z a view of its tail.
        if mem is None:
            keys = self.norm_self_attn(x)
        else:
            keys = self.norm_self_attn(torch.cat((mem, x) if c_mem is None else (c_mem, mem, x), dim=0))
        z = keys[keys.shape[0] - x.shape[0]:]
        x = x + self.dropout(self.self_attn(query=z, key=keys, value=keys, mask=mask))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


class CompressiveTransformer(nn.Module):
    """A stack of ``n_layers`` copies of ``layer`` followed by a final LayerNorm."""

    def __init__(self, layer: CompressiveTransformerLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])

    def forward(self, x: torch.Tensor, mem: List[torch.Tensor], c_mem: List[torch.Tensor],
                mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``x`` ``[L, B, D]``; ``mem`` one ``[M, B, D]`` and ``c_mem`` one
        ``[N, B, D]`` per layer (empty lists for none); ``mask`` ``[L, N + M + L, B or 1]``.

        Returns the normalised output ``[L, B, D]`` and the new memory: each
        layer's (detached) input ``[L, B, D]``.
        """
        new_mem = []
        for i, layer in enumerate(self.layers):
            new_mem.append(x.detach())
            x = layer(x=x, mem=mem[i] if mem else None, c_mem=c_mem[i] if c_mem else None, mask=mask)
        return self.norm(x), new_mem


class AttentionReconstructionLoss:
    """Mean squared error between each layer's attention over its memory and over
    the compression of that memory, summed over layers.

    The attention here has no positional terms, and only the compression
    ``layer.compress`` receives gradients: inputs and every other parameter
    (norm, projections) are detached, so the loss can share an optimizer with
    the model. A plain class, not a module, so that holding it adds nothing to
    a model's ``state_dict``.

    ``backend`` (settable; None = automatic) selects the implementation of the
    ``attention_reconstruction_loss`` op (and of each layer's compression, unless
    that layer's ``compress.backend`` is set); ``last_backend`` records the one
    the last call used.
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.loss_func = nn.MSELoss()
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    # labml_nn's building blocks of the loss, kept as public API; calc_loss
    # runs the fused op instead.
    def prepare_for_attn(self, pmha: PrepareForMultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
        """``pmha``'s projection with detached parameters: ``[..., D]`` -> ``[..., H, d_k]``."""
        bias = pmha.linear.bias.detach() if pmha.linear.bias is not None else None
        return F.linear(x, pmha.linear.weight.detach(), bias).view(*x.shape[:-1], pmha.heads, pmha.d_k)

    def attn(self, layer: RelativeMultiHeadAttention, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor) -> torch.Tensor:
        """Plain softmax attention with ``layer``'s detached projections, no output
        projection: ``query`` ``[L, B, D]``, ``key``/``value`` ``[K, B, D]`` -> ``[L, B, H, d_k]``."""
        query = self.prepare_for_attn(layer.query, query)
        key = self.prepare_for_attn(layer.key, key)
        value = self.prepare_for_attn(layer.value, value)
        scores = torch.einsum("ibhd,jbhd->ijbh", query, key) * layer.scale
        return torch.einsum("ijbh,jbhd->ibhd", torch.softmax(scores, dim=1), value)

    def norm(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """``ln`` applied with detached affine parameters."""
        weight = ln.weight.detach() if ln.weight is not None else None
        bias = ln.bias.detach() if ln.bias is not None else None
        return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)

    def calc_loss(self, layer: CompressiveTransformerLayer, h: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """Loss of one layer: ``h`` ``[L, B, D]`` its input, ``mem`` ``[M, B, D]``
        the memory it compresses (``M`` a multiple of ``c``)."""
        backend = self.last_backend = resolve_backend(mem.device, self.backend)
        compress = layer.compress
        if compress.backend is None:
            c_mem = ops.conv_compress(mem.detach(), compress.conv.weight, compress.conv.bias, backend=backend)
            compress.last_backend = backend
        else:
            c_mem = compress(mem.detach())
        norm, attn = layer.norm_self_attn, layer.self_attn
        bias = lambda prepare: prepare.linear.bias  # noqa: E731
        return ops.attention_reconstruction_loss(
            h, mem, c_mem, norm.weight, norm.bias, norm.eps,
            attn.query.linear.weight, bias(attn.query), attn.key.linear.weight, bias(attn.key),
            attn.value.linear.weight, bias(attn.value), attn.heads, attn.scale,
            backend=backend,
        )

    def __call__(self, h: List[torch.Tensor], mem: List[torch.Tensor]) -> torch.Tensor:
        """``h`` and ``mem``: one ``[L, B, D]`` / ``[M, B, D]`` tensor per layer."""
        return sum(self.calc_loss(layer, h[n], mem[n]) for n, layer in enumerate(self.layers))
