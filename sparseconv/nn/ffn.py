"""Feed-forward blocks on voxel features: :class:`SparseFFN` (activation-sparse) and :class:`SparseMoEFFN`.

Both act on each voxel's feature row independently and accept a :class:`~sparseconv.SparseTensor`
(returning one on the same sites, via ``replace_feature``) or a plain ``[N, C]`` tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import ops
from ..tensor import SparseTensor
from .base import SparseModule

__all__ = ["SparseFFN", "SparseMoEFFN", "SPARSE_FFN_BREAK_EVEN", "hidden_sparsity"]

# Hidden-activation sparsity (fraction of exact zeros) above which ``SparseFFN(sparse_path="auto")`` runs the
# sparse path.  Measured on one CPU thread (2-core x86_64, torch 2.13), 100k voxels, C = 64, hidden = 256, whole
# FFN forward with ReLU (sparsity forced by a per-unit bias shift), dense path time / sparse path time:
#     50 %: 1.52x, 80 %: 2.01x, 90 %: 2.46x, 95 %: 2.19x; second projection alone 0.96x / 1.67x / 1.87x / 2.81x
# by: python tools/benchmark.py -w sparse-blocks --repeats 5 --threads 1 --no-peak-memory
# The whole-FFN gain at 50 % comes mostly from the chunking (no [N, hidden] tensor); the zero-skipping
# second projection breaks even near 53 %, so "auto" switches at 55 %.
SPARSE_FFN_BREAK_EVEN = 0.55
# Voxels per chunk of the sparse path (a chunk's [rows, hidden] activations: 4 MB at hidden = 256).
SPARSE_FFN_CHUNK = 4096
# Rows sampled (evenly spaced) to estimate the ReLU sparsity for ``sparse_path="auto"``.
_SPARSITY_SAMPLE_ROWS = 2048

Features = Union[SparseTensor, torch.Tensor]


def _features(x: Features, who: str) -> torch.Tensor:
    f = x.features if isinstance(x, SparseTensor) else x
    if not isinstance(f, torch.Tensor) or f.dim() != 2:
        raise ValueError(f"{who} expects a SparseTensor or an [N, C] tensor, got {getattr(f, 'shape', type(f))}")
    return f


def _wrap(x: Features, out: torch.Tensor) -> Features:
    return x.replace_feature(out) if isinstance(x, SparseTensor) else out


def hidden_sparsity(h: torch.Tensor) -> float:
    """Fraction of exact zeros in the hidden activations ``h`` ``[N, H]`` (``0.0`` for an empty ``h``)."""
    return 0.0 if h.numel() == 0 else float((h == 0).sum()) / h.numel()


def _topk_mask(pre: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``pre`` ``[N, H]``: ``(values [N, k], columns [N, k])``, the
    columns in increasing order (ties: ``torch.topk``'s choice)."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    idx, order = idx.sort(dim=1)
    return vals.gather(1, order), idx


class SparseFFN(SparseModule):
    """Position-wise feed-forward block ``Linear -> ReLU | TopK -> Linear`` on voxel features, with a path that
    skips the zero hidden units in the second projection.

    The sparse path runs the second projection through :func:`sparseconv.ops.sparse_rows_mm`: on the CPU in
    float32 a fused kernel finds each voxel's non-zero hidden units with vector compares and accumulates only
    those rows of ``W2``, so it costs about ``nnz x C`` multiply-adds instead of ``N x hidden x C`` (elsewhere
    it is a plain ``mm``).  Both paths give the same results and gradients up to floating-point summation
    order.

    Args:
        channels: input and output channels ``C``.
        hidden: hidden channels ``H``.
        activation: ``"relu"``, or ``"topk"``: keep the ``k`` largest pre-activations of each voxel and zero the
            rest (the gradient reaches the kept entries only).
        k: kept hidden units per voxel with ``activation="topk"`` (``1 <= k <= hidden``).
        sparse_path: ``True`` (always the sparse path), ``False`` (always dense), or ``"auto"``: the sparse path when
            the hidden sparsity exceeds ``threshold``.  ReLU's sparsity is estimated on up to 2048 evenly
            spaced voxels; TopK's is ``1 - k / hidden``.
        threshold: break-even sparsity of ``"auto"`` (default :data:`SPARSE_FFN_BREAK_EVEN`).
        bias: whether the two linear layers have biases.

    Attributes:
        last_sparsity: the hidden sparsity the last forward measured (or estimated), or ``None``.
        last_used_sparse: whether the last forward ran the sparse path.

    Shapes:
        input ``[N, C]`` features (or a SparseTensor with ``C`` channels) -> output ``[N, C]``.

    Example:
        >>> ffn = SparseFFN(64, 256, activation="topk", k=16)
        >>> y = ffn(x)  # x: SparseTensor with 64 channels; y: same sites, 64 channels
        >>> ffn.last_used_sparse  # 1 - 16/256 = 94 % sparse > break-even
        True
    """

    def __init__(self, channels: int, hidden: int, activation: str = "relu", k: Optional[int] = None,
                 sparse_path: Union[str, bool] = "auto", threshold: float = SPARSE_FFN_BREAK_EVEN,
                 bias: bool = True):
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"SparseFFN needs positive channels and hidden, got channels={channels}, hidden={hidden}")
        if activation not in ("relu", "topk"):
            raise ValueError(f"SparseFFN activation must be 'relu' or 'topk', got {activation!r}")
        if activation == "topk":
            if k is None or not 1 <= int(k) <= hidden:
                raise ValueError(f"SparseFFN(activation='topk') needs 1 <= k <= hidden ({hidden}), got k={k!r}")
            k = int(k)
        elif k is not None:
            raise ValueError(f"k={k} is only used with activation='topk', got activation={activation!r}")
        if sparse_path not in ("auto", True, False):
            raise ValueError(f"sparse_path must be 'auto', True or False, got {sparse_path!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a sparsity in [0, 1], got {threshold}")
        self.channels, self.hidden, self.activation, self.k = int(channels), int(hidden), activation, k
        self.sparse_path, self.threshold = sparse_path, float(threshold)
        self.fc1 = torch.nn.Linear(channels, hidden, bias=bias)
        self.fc2 = torch.nn.Linear(hidden, channels, bias=bias)
        self.last_sparsity: Optional[float] = None
        self.last_used_sparse = False

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (f"channels={self.channels}, hidden={self.hidden}, activation={self.activation!r}{k}, "
                f"sparse_path={self.sparse_path!r}, threshold={self.threshold}")

    # ---------------------------------------------------------------- pieces
    def hidden_activations(self, f: torch.Tensor) -> torch.Tensor:
        """The dense hidden activations ``[N, hidden]`` (zeros included) of features ``f`` ``[N, C]``."""
        pre = self.fc1(f)
        if self.activation == "relu":
            return torch.relu(pre)
        vals, idx = _topk_mask(pre, self.k)
        return pre.new_zeros(pre.shape).scatter(1, idx, vals)

    def second_projection(self, h: torch.Tensor, sparse: bool) -> torch.Tensor:
        """``fc2`` on hidden activations ``h`` ``[N, hidden]``, dense or skipping the zeros of ``h``."""
        if not sparse:
            return self.fc2(h)
        out = ops.sparse_rows_mm(h, self.fc2.weight.t())
        return out if self.fc2.bias is None else out + self.fc2.bias

    def _estimated_relu_sparsity(self, f: torch.Tensor) -> float:
        """ReLU sparsity of the hidden layer on up to 2048 evenly spaced voxels of ``f``."""
        n = f.shape[0]
        if n == 0:
            return 0.0
        with torch.no_grad():
            pre = self.fc1(f.detach()[:: max(1, n // _SPARSITY_SAMPLE_ROWS)])
        return float((pre <= 0).sum()) / pre.numel()

    # ---------------------------------------------------------------- forward
    def forward(self, x: Features) -> Features:
        f = _features(x, "SparseFFN")
        if f.shape[1] != self.channels:
            raise ValueError(f"SparseFFN expects {self.channels} input channels, got {f.shape[1]}")
        if self.activation == "topk":
            sparsity = 1.0 - self.k / self.hidden
        else:
            sparsity = self._estimated_relu_sparsity(f)
        sparse = self.sparse_path is True or (self.sparse_path == "auto" and sparsity > self.threshold)
        self.last_sparsity, self.last_used_sparse = sparsity, bool(sparse)
        if not sparse:
            return _wrap(x, self.fc2(self.hidden_activations(f)))
        # Sparse path in chunks of voxels: a chunk's hidden activations stay in cache (and in reused heap
        # memory) instead of one [N, hidden] tensor, and the second projection skips their zeros.
        outs = [self.second_projection(self.hidden_activations(f[i:i + SPARSE_FFN_CHUNK]), True)
                for i in range(0, f.shape[0], SPARSE_FFN_CHUNK)]
        return _wrap(x, torch.cat(outs) if outs else f.new_zeros(0, self.channels))


class SparseMoEFFN(SparseModule):
    """Mixture-of-experts feed-forward block on voxel features (top-k routing, capacity, load balancing).

    A router ``Linear(C, experts)`` gives each voxel a softmax over experts; the voxel goes to its ``k``
    most probable experts with gates renormalised over those ``k`` (``g_i = p_i / sum of the chosen p``), and
    its output is ``sum_i g_i * E_i(x)``, where every expert is ``Linear(C, hidden) -> ReLU -> Linear(hidden, C)``.
    Assignments are sorted by expert id so that each expert runs once, on its own voxels only.

    Capacity: each expert takes at most ``ceil(capacity_factor * N * k / experts)`` assignments.  First
    choices are served before second choices (and so on), then voxels in input order; an assignment beyond
    the capacity is dropped and contributes 0 (its gate is not renormalised away) -- put the block in a
    residual branch so the residual carries the voxel.  ``capacity_factor=None`` disables dropping.

    After each forward:

    * ``aux_loss``: the Switch/Mixtral load-balancing loss ``experts * sum_i f_i * P_i``, where ``f_i`` is the
      fraction of the ``N * k`` routed assignments (before capacity) that chose expert ``i`` and ``P_i`` the
      mean router probability of expert ``i`` over the voxels; 1 when perfectly balanced; differentiable
      through ``P``.  Add ``coefficient * aux_loss`` to the training loss.
    * ``last_load``: int64 ``[experts]`` assignments routed to each expert (before capacity).
    * ``last_dropped``: int64 ``[experts]`` assignments each expert dropped for capacity.

    Args:
        channels: input and output channels ``C``.
        hidden: hidden channels of each expert.
        experts: number of experts.
        k: experts per voxel (``1 <= k <= experts``).
        capacity_factor: capacity multiplier (> 0), or ``None`` for unlimited capacity.

    Shapes:
        input ``[N, C]`` (or a SparseTensor with ``C`` channels) -> output ``[N, C]``.

    Example:
        >>> moe = SparseMoEFFN(64, 256, experts=8, k=2)
        >>> y = x + moe(x)              # residual: dropped assignments leave the voxel as it was
        >>> loss = task_loss + 0.01 * moe.aux_loss
        >>> moe.last_load.sum() == 2 * x.num_voxels
    """

    def __init__(self, channels: int, hidden: int, experts: int = 8, k: int = 2,
                 capacity_factor: Optional[float] = 1.25):
        super().__init__()
        if channels < 1 or hidden < 1 or experts < 1:
            raise ValueError(f"SparseMoEFFN needs positive channels, hidden and experts, got {channels}, {hidden}, "
                             f"{experts}")
        if not 1 <= k <= experts:
            raise ValueError(f"SparseMoEFFN needs 1 <= k <= experts ({experts}), got k={k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for no limit), got {capacity_factor}")
        self.channels, self.hidden, self.experts, self.k = int(channels), int(hidden), int(experts), int(k)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.router = torch.nn.Linear(channels, experts, bias=False)
        b1, b2 = 1.0 / math.sqrt(channels), 1.0 / math.sqrt(hidden)
        self.w1 = torch.nn.Parameter(torch.empty(experts, hidden, channels).uniform_(-b1, b1))
        self.b1 = torch.nn.Parameter(torch.empty(experts, hidden).uniform_(-b1, b1))
        self.w2 = torch.nn.Parameter(torch.empty(experts, channels, hidden).uniform_(-b2, b2))
        self.b2 = torch.nn.Parameter(torch.empty(experts, channels).uniform_(-b2, b2))
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_load: Optional[torch.Tensor] = None
        self.last_dropped: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden={self.hidden}, experts={self.experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}")

    def expert(self, e: int, f: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on features ``f`` ``[M, C]`` -> ``[M, C]``."""
        return F.linear(torch.relu(F.linear(f, self.w1[e], self.b1[e])), self.w2[e], self.b2[e])

    def capacity(self, n: int) -> int:
        """Assignments each expert takes for ``n`` voxels (``n * k`` when unlimited)."""
        if self.capacity_factor is None:
            return n * self.k
        return int(math.ceil(self.capacity_factor * n * self.k / self.experts))

    def forward(self, x: Features) -> Features:
        f = _features(x, "SparseMoEFFN")
        if f.shape[1] != self.channels:
            raise ValueError(f"SparseMoEFFN expects {self.channels} input channels, got {f.shape[1]}")
        n, e = f.shape[0], self.experts
        probs = torch.softmax(self.router(f), dim=1)  # [N, E]
        top_p, top_e = probs.topk(self.k, dim=1)  # [N, k]
        gates = top_p / top_p.sum(1, keepdim=True)
        # Assignment a = slot * N + voxel: first choices first, then voxels in order.
        expert_of = top_e.t().reshape(-1)
        load = torch.bincount(expert_of, minlength=e)
        order = torch.sort(expert_of, stable=True).indices
        starts = torch.cumsum(load, 0) - load
        rank = torch.arange(order.numel(), device=f.device) - starts.repeat_interleave(load)
        cap = self.capacity(n)
        kept = order[rank < cap]
        kept_load = torch.clamp(load, max=cap)
        self.last_load, self.last_dropped = load, load - kept_load
        if n:
            frac = load.to(probs.dtype) / (n * self.k)
            self.aux_loss = e * (frac * probs.mean(0)).sum()
        else:
            self.aux_loss = probs.new_zeros(())
        voxel = kept.remainder(max(n, 1))
        gate = gates.t().reshape(-1).index_select(0, kept)
        out = f.new_zeros(f.shape)
        pos = 0
        for i, count in enumerate(kept_load.tolist()):
            if count:
                idx = voxel[pos:pos + count]
                y = self.expert(i, f.index_select(0, idx)) * gate[pos:pos + count, None]
                out = out.index_add(0, idx, y)
                pos += count
        return _wrap(x, out)
