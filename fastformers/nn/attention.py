"""Multi-head attention, Transformer-XL relative attention and the position-wise
feed-forward network, laid out sequence-first like labml_nn 0.5.1.

Shape letters: ``L`` query length, ``K`` key length, ``B`` batch, ``H`` heads,
``d_k`` features per head, ``D`` = ``d_model``.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _backend, ops
from ..ops import _autocast
from ..ops.xl import naive as xl_naive
from ..ops.xl import op as xl_op


def resolve_fused_backend(requested: Optional[str], device: torch.device,
                          implemented: Sequence[str] = _backend.BACKENDS) -> Tuple[str, Optional[str]]:
    """``(backend, reason)`` for a module whose ``backend`` attribute is
    ``requested``: :func:`fastformers.resolve_backend`, and, when that leaves
    the fused kernels without anyone asking for the reference, why and what
    to change."""
    backend = _backend.resolve_backend(device, requested, implemented)
    wanted = requested if requested is not None else _backend.forced_backend()
    if backend != "reference" or wanted == "reference":
        return backend, None
    if device.type == "cpu":
        return backend, ("the C++ extension fastformers._C is not built: reinstall with "
                         "`pip install --no-build-isolation .`")
    return backend, f"no fused kernel runs on {device.type} tensors: use CPU, or CUDA with triton installed"


def check_positions(n_positions: int) -> int:
    """``n_positions`` (the ``P`` of a relative-position table) if it is a positive int, else ValueError/TypeError."""
    if isinstance(n_positions, bool) or not isinstance(n_positions, int):
        raise TypeError(f"n_positions must be an int, got {type(n_positions).__name__}")
    if n_positions < 1:
        raise ValueError(f"n_positions must be at least 1, got {n_positions}")
    return n_positions


class PrepareForMultiHeadAttention(nn.Module):
    """Linear projection ``[..., D] -> [..., H, d_k]`` split into heads.

    Used for the query, key and value projections.
    """

    def __init__(self, d_model: int, heads: int, d_k: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_model, heads * d_k, bias=bias)
        self.heads = heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., D]`` (e.g. ``[L, B, D]``) -> ``[..., H, d_k]``."""
        return self.linear(x).view(*x.shape[:-1], self.heads, self.d_k)


class MultiHeadAttention(nn.Module):
    r"""Scaled dot-product attention over ``H`` heads.

    ``out = W_o · concat_h softmax_j(Q_i · K_j / sqrt(d_k)) V_j``, the softmax
    running over keys. ``bias`` applies to the query and key projections only;
    the value projection always has a bias. After each forward ``self.attn``
    holds the detached attention weights ``[L, K, B, H]`` (after dropout).
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, bias: bool = True):
        super().__init__()
        self.d_k = d_model // heads
        self.heads = heads
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=bias)
        self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=bias)
        self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=True)
        # Scores are [L, K, B, H]: normalise over the key axis.
        self.softmax = nn.Softmax(dim=1)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(self.d_k)
        self.attn: Optional[torch.Tensor] = None

    def get_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Unscaled scores ``[L, K, B, H]`` from ``query`` ``[L, B, H, d_k]`` and
        ``key`` ``[K, B, H, d_k]``; subclasses override this for other score terms."""
        return torch.einsum("ibhd,jbhd->ijbh", query, key)

    def prepare_mask(self, mask: torch.Tensor, query_shape: Sequence[int], key_shape: Sequence[int]) -> torch.Tensor:
        """Check ``mask`` ``[L or 1, K, B or 1]`` and add a head axis: ``[L or 1, K, B or 1, 1]``."""
        if mask.dim() != 3:
            raise ValueError(f"mask must be [seq_len_q, seq_len_k, batch], got shape {tuple(mask.shape)}")
        if mask.shape[0] not in (1, query_shape[0]):
            raise ValueError(f"mask.shape[0] must be 1 or the query length {query_shape[0]}, got {mask.shape[0]}")
        if mask.shape[1] != key_shape[0]:
            raise ValueError(f"mask.shape[1] must be the key length {key_shape[0]}, got {mask.shape[1]}")
        if mask.shape[2] not in (1, query_shape[1]):
            raise ValueError(f"mask.shape[2] must be 1 or the batch size {query_shape[1]}, got {mask.shape[2]}")
        return mask.unsqueeze(-1)

    def forward(self, *,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query`` ``[L, B, D]``, ``key`` and ``value`` ``[K, B, D]``; ``mask``
        ``[L or 1, K, B or 1]``, nonzero where query ``i`` may attend key ``j``.
        Returns ``[L, B, D]``; a query with no visible key gives NaN (softmax over nothing)."""
        seq_len, batch_size, _ = query.shape
        if mask is not None:
            mask = self.prepare_mask(mask, query.shape, key.shape)
        query = self.query(query)
        key = self.key(key)
        value = self.value(value)
        scores = self.get_scores(query, key) * self.scale
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        attn = self.dropout(self.softmax(scores))
        x = torch.einsum("ijbh,jbhd->ibhd", attn, value)
        self.attn = attn.detach()
        return self.output(x.reshape(seq_len, batch_size, -1))


class RelativeMultiHeadAttention(MultiHeadAttention):
    r"""Transformer-XL attention with relative positions.

    For query ``i`` and key ``j`` (keys are memory followed by the current
    segment, so key ``j`` sits at position ``j - (K - L)`` relative to query 0)
    the score is

    ``(Q_i + u) · K_j + Q_i · R_{p} + S_{p}``, with ``p = P + (j - (K - L)) - i``

    where ``u = query_pos_bias`` ``[H, d_k]``, ``R = key_pos_embeddings``
    ``[2P, H, d_k]`` and ``S = key_pos_bias`` ``[2P, H]``; row ``P`` is distance
    zero. Query and key projections have no bias. Supports ``L <= P`` and
    ``K <= P``, ``P = n_positions`` (labml's ``2**12`` by default, which keeps
    labml_nn's ``state_dict`` shapes; a model trained on short segments and
    memories needs far fewer rows, and its tables are most of its parameters).

    ``backend`` (settable; None = automatic) selects the implementation and
    ``last_backend`` records the one the last forward used. The fused backends
    run :func:`fastformers.ops.rel_attention`, which never materialises the
    ``[L, K, B, H]`` scores: there ``self.attn`` is set to None (use
    ``backend = "reference"`` to inspect the attention weights). A mask equal
    to the causal-with-memory mask (``[L, M + L, B or 1]``, what labml's
    experiments build) runs as ``causal=True``, any other mask as an explicit
    mask. In training the attention dropout (``dropout.p``) runs inside the
    fused kernels; the draws differ from ``nn.Dropout``'s (Philox bits, see
    :func:`fastformers.ops.rel_attention`). :meth:`fused_backend` says which
    backend a forward takes and why it would leave the fused kernels (an
    explicit non-causal mask on ``triton``; on a GPU a dtype or head size the
    Triton kernels do not take; no kernel for the device): such a forward
    warns once with a :class:`fastformers._backend.FallbackWarning`.

    A query whose every key is masked gets NaN (softmax over no key, as in
    labml_nn) on every backend, and NaN gradients through it.

    Gradient of the positional tables: the op differentiates only the window of
    ``K + L - 1`` rows it reads, but autograd hands a dense Parameter a gradient
    of the Parameter's full shape, so the slice's backward still writes one
    zero-filled ``[2P, H, d_k]`` buffer per call (AccumulateGrad adds it into
    ``.grad``, or adopts it when ``.grad`` is None). Avoiding that would take a
    sparse gradient (which ``torch.optim.Adam`` rejects) or writing into
    ``.grad`` behind autograd's back (breaking ``autograd.grad``, hooks and
    ``torch.compile``); neither is worth one memset of ``2P·H·d_k`` values.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, *, n_positions: int = 2 ** 12):
        super().__init__(heads, d_model, dropout_prob, bias=False)
        self.P = check_positions(n_positions)
        self.key_pos_embeddings = nn.Parameter(torch.zeros((self.P * 2, heads, self.d_k)), requires_grad=True)
        self.key_pos_bias = nn.Parameter(torch.zeros((self.P * 2, heads)), requires_grad=True)
        self.query_pos_bias = nn.Parameter(torch.zeros((heads, self.d_k)), requires_grad=True)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def _check_lengths(self, q_len: int, k_len: int) -> None:
        if q_len > self.P or k_len > self.P:
            raise ValueError(
                f"RelativeMultiHeadAttention supports at most P={self.P} queries and P keys "
                f"(positional table of 2P rows), got {q_len} queries and {k_len} keys"
            )

    def get_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``query`` ``[L, B, H, d_k]``, ``key`` ``[K, B, H, d_k]`` -> ``[L, K, B, H]``."""
        q_len, k_len = query.shape[0], key.shape[0]
        self._check_lengths(q_len, k_len)
        # Distances p - P run from -(K-1) (last query, first key) to L-1 (first
        # query, last key): table rows P-K+1 .. P+L-1, i.e. K+L-1 rows.
        first = self.P - k_len + 1
        rows = slice(first, self.P + q_len)
        ac = torch.einsum("ibhd,jbhd->ijbh", query + self.query_pos_bias[None, None], key)
        # Score every query against every distance once ([L, K+L-1, B, H]), then
        # pick for each (i, j) the column of its distance: L-1-i+j.
        bd_all = torch.einsum("ibhd,jhd->ijbh", query, self.key_pos_embeddings[rows])
        bd_all = bd_all + self.key_pos_bias[rows][None, :, None, :]
        i = torch.arange(q_len, device=query.device)[:, None]
        j = torch.arange(k_len, device=query.device)[None, :]
        bd = bd_all[i, q_len - 1 - i + j]
        return ac + bd

    def _backend_choice(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """``(backend, reason)`` of a forward on ``device`` in train (``training``)
        or eval mode (any mask: the kernels read explicit masks); ``reason``
        (what to change) only when that is the reference while a fused one was
        wanted or automatic."""
        backend, reason = resolve_fused_backend(self.backend, device)
        if backend == "triton" and device.type == "cuda":
            dtype = _autocast.dtype_for(device.type) or self.output.weight.dtype
            dropout = training and self.dropout.p > 0
            reason = xl_op.gpu_unsupported_reason(dtype, self.d_k, dropout, device)
            if reason is not None:
                return "reference", reason
        return backend, reason

    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """The backend a forward on ``device`` in train (``training``) or eval mode
        takes, without running it, and why when that is ``"reference"`` (None
        otherwise). Masks never change the choice; on GPUs, ``training`` with
        dropout can (dropout's kernels need more registers: some dtype and head
        dim combinations fit an arch's tiles only without it)."""
        return self._backend_choice(torch.device(device), training)

    def _op_mask(self, mask: Optional[torch.Tensor], query_shape, key_shape) -> tuple:
        """``(causal, explicit bool mask or None)`` for the op from a labml mask ``[L or 1, K, B or 1]``."""
        if mask is None:
            return False, None
        self.prepare_mask(mask, query_shape, key_shape)
        visible = mask != 0
        q_len, k_len = query_shape[0], key_shape[0]
        if visible.shape[0] == q_len and k_len >= q_len:
            causal = xl_naive.causal_mask(q_len, k_len, mask.device)[:, :, None]
            if torch.equal(visible, causal.expand_as(visible)):
                return True, None
        return False, visible

    def forward(self, *,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query`` ``[L, B, D]``, ``key`` and ``value`` ``[K, B, D]``; ``mask``
        ``[L or 1, K, B or 1]``, nonzero where query ``i`` may attend key ``j``.
        Returns ``[L, B, D]``; a query with no visible key gives NaN (softmax
        over nothing, labml_nn's behaviour) on every backend."""
        q_len, batch_size, _ = query.shape
        k_len = key.shape[0]
        self._check_lengths(q_len, k_len)
        causal, explicit = self._op_mask(mask, query.shape, key.shape)
        backend, reason = self._backend_choice(query.device, self.training)
        self.last_backend = backend
        if reason is not None:
            _backend.warn_fallback(self, reason)
        if backend == "reference":
            return super().forward(query=query, key=key, value=value, mask=mask)
        rows = slice(self.P - k_len + 1, self.P + q_len)
        out = ops.rel_attention(
            self.query(query), self.key(key), self.value(value),
            self.key_pos_embeddings[rows], self.key_pos_bias[rows], self.query_pos_bias, self.scale,
            mask=explicit, causal=causal, dropout_p=self.dropout.p if self.training else 0.0, backend=backend,
        )
        self.attn = None
        return self.output(out.reshape(q_len, batch_size, -1))


class FeedForward(nn.Module):
    r"""Position-wise feed-forward network.

    ``FFN(x) = W_2 dropout(act(W_1 x + b_1)) + b_2``; with ``is_gated`` the
    hidden activation is multiplied by a gate ``V x + b_v`` (GLU variants).
    """

    def __init__(self, d_model: int, d_ff: int,
                 dropout: float = 0.1,
                 activation=nn.ReLU(),
                 is_gated: bool = False,
                 bias1: bool = True,
                 bias2: bool = True,
                 bias_gate: bool = True):
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff, bias=bias1)
        self.layer2 = nn.Linear(d_ff, d_model, bias=bias2)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation
        self.is_gated = is_gated
        if is_gated:
            self.linear_v = nn.Linear(d_model, d_ff, bias=bias_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., D]`` -> ``[..., D]``."""
        hidden = self.activation(self.layer1(x))
        if self.is_gated:
            hidden = hidden * self.linear_v(x)
        return self.layer2(self.dropout(hidden))


__all__ = ["PrepareForMultiHeadAttention", "MultiHeadAttention", "RelativeMultiHeadAttention", "FeedForward"]
