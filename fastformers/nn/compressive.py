"""Compressive Transformer: Transformer-XL whose oldest memories are compressed
by a strided 1-D convolution, plus the attention-reconstruction loss that
trains the compression.

Shape letters: ``L`` segment length, ``M`` memory length, ``N`` compressed
memory length, ``c`` compression rate, ``B`` batch, ``H`` heads, ``d_k``
features per head, ``D`` = ``d_model``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, ops
from ..ops import _autocast
from ..ops.compressive.op import KERNELS as COMPRESSIVE_KERNELS
from ._utils import check_sequence, clone_module_list, init_pre_norm_layer
from .attention import FeedForward, PrepareForMultiHeadAttention, RelativeMultiHeadAttention, resolve_fused_backend


def _compressive_backend(owner, device: torch.device, op: str, dtype: torch.dtype,
                         d_k: int = 0) -> Tuple[str, Optional[str]]:
    """``(backend, reason)`` of ``owner`` (its ``backend`` attribute) running
    ``op`` on ``device`` with inputs of ``dtype`` (after autocast) and heads of
    ``d_k`` features; ``reason`` when that leaves the fused kernels."""
    backend, reason = resolve_fused_backend(owner.backend, torch.device(device), COMPRESSIVE_KERNELS)
    if backend == "triton" and torch.device(device).type == "cuda":
        from ..ops.compressive import triton_kernel

        reason = triton_kernel.gpu_unsupported_reason(op, _autocast.dtype_for("cuda") or dtype, d_k)
        if reason is not None:
            return "reference", reason
    return backend, reason


def _choose(owner, device: torch.device, op: str, dtype: torch.dtype, d_k: int = 0) -> str:
    """:func:`_compressive_backend` for a call: records ``last_backend`` and warns on a fallback."""
    backend, reason = _compressive_backend(owner, device, op, dtype, d_k)
    if reason is not None:
        _backend.warn_fallback(owner, reason)
    owner.last_backend = backend
    return backend
from .xl import attend_over_history


class Conv1dCompression(nn.Module):
    """Compression ``f_c``: every ``c`` consecutive memories become one, via a
    ``Conv1d`` with kernel size and stride ``c`` (parameters kept as ``conv``,
    ``[D, D, c]`` and ``[D]``, so the ``state_dict`` is labml's).

    ``backend`` (settable; None = automatic) selects the implementation of the
    ``conv_compress`` op; ``last_backend`` records the one the last forward used;
    :meth:`fused_backend` says which one a forward takes and why it would leave
    the fused kernels (such a forward warns once with a ``FallbackWarning``).
    """

    def __init__(self, compression_rate: int, d_model: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=compression_rate, stride=compression_rate)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def forward(self, mem: torch.Tensor) -> torch.Tensor:
        """``mem`` ``[M, B, D]`` -> ``[M // c, B, D]``; like ``nn.Conv1d``, a last
        incomplete group of fewer than ``c`` memories is left out."""
        backend = _choose(self, mem.device, "conv_compress", self.conv.weight.dtype)
        rate = self.conv.stride[0]
        whole = mem[: mem.shape[0] // rate * rate] if mem.dim() == 3 else mem
        return ops.conv_compress(whole, self.conv.weight, self.conv.bias, backend=backend)


    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """``(backend, reason)`` a forward on ``device`` takes (the same in train
        and eval mode), without running it; ``reason`` when that is the reference."""
        return _compressive_backend(self, device, "conv_compress", self.conv.weight.dtype)


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
        init_pre_norm_layer(self, d_model, feed_forward, dropout_prob)

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
        or None, ``mask`` ``[L, N + M + L, B or 1]`` (a query that sees no key
        gives NaN, as in labml_nn). Returns ``[L, B, D]``."""
        check_sequence(x, self.size)
        # The keys of concat_memory, built by one cat and one LayerNorm.
        return attend_over_history(self, x, _history(mem, c_mem), mask)


def _history(mem: Optional[torch.Tensor], c_mem: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """What a layer attends to before its segment, oldest first: compressed
    memory only alongside memory, as labml_nn's ``concat_memory`` has it."""
    if mem is None:
        return ()
    return (mem,) if c_mem is None else (c_mem, mem)


class CompressiveTransformer(nn.Module):
    """A stack of ``n_layers`` copies of ``layer`` followed by a final LayerNorm."""

    def __init__(self, layer: CompressiveTransformerLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])

    def forward(self, x: torch.Tensor, mem: List[torch.Tensor], c_mem: List[torch.Tensor],
                mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``x`` ``[L, B, D]``; ``mem`` one ``[M, B, D]`` and ``c_mem`` one
        ``[N, B, D]`` per layer (empty lists for none); ``mask`` ``[L, N + M + L, B or 1]``
        (a query that sees no key gives NaN, as in labml_nn).

        Returns the normalised output ``[L, B, D]`` and the new memory: each
        layer's (detached) input ``[L, B, D]``.
        """
        histories = [_history(mem[i] if mem else None, c_mem[i] if c_mem else None) for i in range(len(self.layers))]
        return self.forward_with_history(x, histories, mask)

    def forward_with_history(self, x: torch.Tensor, histories: Sequence[Tuple[torch.Tensor, ...]],
                             mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """:meth:`forward` with each layer's ``[c_mem; mem]`` given as pieces
        (``histories[i]``, each ``[*, B, D]``, oldest first, e.g.
        :meth:`CompressiveMemory.history`): the one ``cat`` that builds a
        layer's keys assembles them, so ring buffers that wrap cost no extra copy."""
        check_sequence(x, self.layers[0].size)
        new_mem = []
        for layer, history in zip(self.layers, histories):
            new_mem.append(x.detach())
            x = attend_over_history(layer, x, history, mask)
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
    the last call used; :meth:`fused_backend` says which one a call takes and
    why it would leave the fused kernels (such a call warns once with a
    ``FallbackWarning``).
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.loss_func = nn.MSELoss()
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def _choice_args(self) -> tuple:
        attn = self.layers[0].self_attn
        return "attention_reconstruction_loss", attn.output.weight.dtype, attn.d_k

    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """``(backend, reason)`` a call on ``device`` takes (the loss is only
        used in training; ``training`` does not change it), without running
        it; ``reason`` when that is the reference."""
        return _compressive_backend(self, device, *self._choice_args())

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
        check_sequence(h, layer.size, "h")
        backend = _choose(self, mem.device, *self._choice_args())
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


class CompressiveMemory:
    """Per-layer ring buffers of the recent memory (``mem_len`` steps) and the
    compressed memory (``c_mem_len`` steps) of a Compressive Transformer.

    :meth:`append` writes each layer's new segment and compresses exactly the
    groups of ``compression_rate`` steps that fall out of the memory onto the
    compressed memory, evicting its oldest steps: per step it copies the new
    segment and the steps being compressed, never the whole history (where
    ``cat``/``split`` would copy ``mem_len + c_mem_len`` steps per layer).
    The steps kept and compressed are those of labml_nn's
    ``merge_compress_memory``: after appending, the oldest steps beyond
    ``mem_len``, rounded up to a whole number of groups, are compressed.

    Copies the math still forces, per layer and step: the steps that fall out
    are returned as a copy (the reconstruction loss reads them after their
    slots are rewritten), and the attention's keys ``[c_mem; mem; x]`` are
    assembled by one ``cat`` (:meth:`history` hands the ring's pieces to it
    as views). That ``cat`` stays: the keys go through the layer norm and the
    key/value projections, whose weights change every optimizer step, so they
    are recomputed over the whole history anyway, and the fused
    ``rel_attention`` takes its keys as one ``[K, B, H, d]`` tensor. Taking
    the memory pieces without the ``cat`` would mean normalising and
    projecting each piece separately and then concatenating the projected
    keys and values (two copies instead of one), or a list-of-keys
    ``rel_attention`` schema; the ``cat`` moves ``K·B·D`` values, ``1/D`` of
    the projections' work.

    Buffers are ``[n_layers, capacity, B, D]``, allocated on the first append;
    contents are detached (the memory never carries gradient into later steps).
    """

    def __init__(self, n_layers: int, mem_len: int, c_mem_len: int, compression_rate: int):
        if n_layers < 1 or mem_len < 0 or c_mem_len < 0 or compression_rate < 1:
            raise ValueError(
                f"need n_layers >= 1, mem_len >= 0, c_mem_len >= 0 and compression_rate >= 1, got {n_layers}, "
                f"{mem_len}, {c_mem_len}, {compression_rate}"
            )
        self.n_layers, self.mem_len, self.c_mem_len, self.rate = n_layers, mem_len, c_mem_len, compression_rate
        self._mem: Optional[torch.Tensor] = None
        self._c_mem: Optional[torch.Tensor] = None
        # Ring state (shared by all layers): index of the oldest step and steps held.
        self._mem_start = self._mem_size = self._c_start = self._c_size = 0

    @property
    def mem_length(self) -> int:
        """Steps of recent memory held (``M``)."""
        return self._mem_size

    @property
    def c_mem_length(self) -> int:
        """Steps of compressed memory held (``N``)."""
        return self._c_size

    @staticmethod
    def _pieces(buffer: Optional[torch.Tensor], start: int, size: int, layer: int) -> Tuple[torch.Tensor, ...]:
        """Views of the ``size`` steps from slot ``start`` on, oldest first: one, or two when the ring wraps."""
        if buffer is None or size == 0:
            return ()
        capacity = buffer.shape[1]
        if start + size <= capacity:
            return (buffer[layer, start:start + size],)
        return buffer[layer, start:], buffer[layer, :start + size - capacity]

    @classmethod
    def _ordered(cls, buffer: Optional[torch.Tensor], start: int, size: int, layer: int) -> Optional[torch.Tensor]:
        """Steps ``[size, B, D]`` oldest first: a view unless the ring wraps."""
        pieces = cls._pieces(buffer, start, size, layer)
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def mem(self, layer: int) -> Optional[torch.Tensor]:
        """Recent memory of ``layer``, ``[M, B, D]`` oldest first, or None when empty."""
        return self._ordered(self._mem, self._mem_start, self._mem_size, layer)

    def c_mem(self, layer: int) -> Optional[torch.Tensor]:
        """Compressed memory of ``layer``, ``[N, B, D]`` oldest first, or None when empty."""
        return self._ordered(self._c_mem, self._c_start, self._c_size, layer)

    def history(self, layer: int) -> Tuple[torch.Tensor, ...]:
        """``[c_mem; mem]`` of ``layer`` as views ``[*, B, D]``, oldest first (up to
        four pieces; none when empty), for
        :meth:`CompressiveTransformer.forward_with_history`. The views are
        rewritten by the next :meth:`append`."""
        return (self._pieces(self._c_mem, self._c_start, self._c_size, layer)
                + self._pieces(self._mem, self._mem_start, self._mem_size, layer))

    @staticmethod
    def _write(buffer: torch.Tensor, layer: int, start: int, steps: torch.Tensor) -> None:
        """Copies ``steps`` into the ring from slot ``start`` on, wrapping around."""
        capacity = buffer.shape[1]
        first = min(steps.shape[0], capacity - start)
        buffer[layer, start:start + first] = steps[:first]
        if first < steps.shape[0]:
            buffer[layer, :steps.shape[0] - first] = steps[first:]

    def check_segment(self, segment: torch.Tensor) -> None:
        """Raise ValueError unless ``segment`` ``[L, B, D]`` matches the batch,
        width, dtype and device of what the memory holds."""
        if self._mem is None:
            return
        held = (tuple(self._mem.shape[2:]), self._mem.dtype, self._mem.device)
        given = (tuple(segment.shape[1:]), segment.dtype, segment.device)
        if given != held:
            raise ValueError(
                f"the memory holds [*, B, D] = {list(held[0])} {held[1]} on {held[2]}, got a segment of "
                f"{list(given[0])} {given[1]} on {given[2]}; start a new memory for a new batch shape"
            )

    def _allocate(self, like: torch.Tensor) -> None:
        self.check_segment(like)
        if self._mem is None:
            new = lambda length: like.new_empty((self.n_layers, length, *like.shape[1:]))  # noqa: E731
            self._mem, self._c_mem = new(self.mem_len), new(self.c_mem_len)

    def state_dict(self) -> Dict[str, List[torch.Tensor]]:
        """``{"mem": [M, B, D] per layer, "c_mem": [N, B, D] per layer}`` (copies,
        oldest first; empty lists before the first append)."""
        if self._mem is None:
            return {"mem": [], "c_mem": []}
        take = lambda get, size: [  # noqa: E731
            get(i).clone() if size else self._mem.new_empty((0, *self._mem.shape[2:])) for i in range(self.n_layers)
        ]
        return {"mem": take(self.mem, self._mem_size), "c_mem": take(self.c_mem, self._c_size)}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, List[torch.Tensor]]) -> None:
        """Replace the contents with ``state`` (as :meth:`state_dict` returns it, or
        the per-layer lists of labml's ``CompressedMemory``)."""
        mem, c_mem = list(state["mem"]), list(state["c_mem"])
        self._mem = self._c_mem = None
        self._mem_start = self._mem_size = self._c_start = self._c_size = 0
        if not mem and not c_mem:
            return
        for name, tensors, capacity in (("mem", mem, self.mem_len), ("c_mem", c_mem, self.c_mem_len)):
            if tensors and len(tensors) != self.n_layers:
                raise ValueError(f"{name} needs one tensor per layer ({self.n_layers}), got {len(tensors)}")
            if tensors and tensors[0].shape[0] > capacity:
                raise ValueError(f"{name} holds {tensors[0].shape[0]} steps, more than its length {capacity}")
        self._allocate((mem or c_mem)[0])
        for layer in range(self.n_layers):
            if mem:
                self._write(self._mem, layer, 0, mem[layer])
            if c_mem:
                self._write(self._c_mem, layer, 0, c_mem[layer])
        self._mem_size = mem[0].shape[0] if mem else 0
        self._c_size = c_mem[0].shape[0] if c_mem else 0

    @torch.no_grad()
    def append(self, new_mem: List[torch.Tensor], compress: List[nn.Module]) -> List[torch.Tensor]:
        """Appends each layer's segment ``new_mem[i]`` ``[L, B, D]``; ``compress[i]``
        (``[G·c, B, D]`` -> ``[G, B, D]``, e.g. :class:`Conv1dCompression`) compresses
        the steps that fall out. Returns those steps per layer (``[n_old, B, D]``,
        copies, for the reconstruction loss), or ``[]`` when none fell out."""
        if len(new_mem) != self.n_layers or len(compress) != self.n_layers:
            raise ValueError(f"need one segment and one compression per layer ({self.n_layers}), "
                             f"got {len(new_mem)} and {len(compress)}")
        self._allocate(new_mem[0])
        steps = new_mem[0].shape[0]
        total = self._mem_size + steps
        if total <= self.mem_len:
            for layer, segment in enumerate(new_mem):
                self._write(self._mem, layer, (self._mem_start + self._mem_size) % max(self.mem_len, 1), segment)
            self._mem_size = total
            return []
        n_old = min(total, -(-(total - self.mem_len) // self.rate) * self.rate)
        from_ring = min(n_old, self._mem_size)
        old = []
        for layer, segment in enumerate(new_mem):
            oldest = self._ordered(self._mem, self._mem_start, from_ring, layer)
            parts = ([oldest] if from_ring else []) + ([segment[:n_old - from_ring]] if n_old > from_ring else [])
            # A copy: the ring slots the steps came from are rewritten below.
            old.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())
        kept_new = steps - (n_old - from_ring)
        self._mem_start = (self._mem_start + from_ring) % max(self.mem_len, 1)
        self._mem_size -= from_ring
        if kept_new:
            tail = (self._mem_start + self._mem_size) % self.mem_len
            for layer, segment in enumerate(new_mem):
                self._write(self._mem, layer, tail, segment[steps - kept_new:])
        self._mem_size += kept_new
        if self.c_mem_len:
            fresh = [f(o) for f, o in zip(compress, old)]
            groups = fresh[0].shape[0]
            kept = min(groups, self.c_mem_len)
            evicted = max(0, self._c_size + kept - self.c_mem_len)
            self._c_start = (self._c_start + evicted) % self.c_mem_len
            self._c_size -= evicted
            tail = (self._c_start + self._c_size) % self.c_mem_len
            for layer, f in enumerate(fresh):
                self._write(self._c_mem, layer, tail, f[groups - kept:])
            self._c_size += kept
        return old


@torch.no_grad()
def cat_split_merge(mem: List[torch.Tensor], c_mem: List[torch.Tensor], new_mem: List[torch.Tensor],
                    compress: Sequence[nn.Module], mem_len: int, c_mem_len: int,
                    compression_rate: int) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """labml_nn's experiment's ``merge_compress_memory`` (whole-history ``cat`` and
    ``split``), the formulation :class:`CompressiveMemory` reproduces: append
    ``new_mem``, compress the oldest whole groups beyond ``mem_len``, keep the
    last ``c_mem_len`` compressed steps. Lists hold one ``[*, B, D]`` tensor per
    layer (empty lists for none). Returns ``(mem, c_mem, compressed_away)``."""
    mem = [torch.cat((m, n)) for m, n in zip(mem, new_mem)] if mem else list(new_mem)
    if mem[0].shape[0] <= mem_len:
        return mem, c_mem, []
    n_old = (mem[0].shape[0] - mem_len + compression_rate - 1) // compression_rate * compression_rate
    old = [m[:n_old] for m in mem]
    mem = [m[n_old:] for m in mem]
    fresh = [f(o) for f, o in zip(compress, old)]
    c_mem = [torch.cat((c, f)) for c, f in zip(c_mem, fresh)] if c_mem else fresh
    c_mem = [c[-c_mem_len:] for c in c_mem] if c_mem_len else []
    return mem, c_mem, old
