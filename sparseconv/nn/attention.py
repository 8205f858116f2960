"""Window self-attention among the active voxels, and a sparse transformer block."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..tensor import SparseTensor
from .base import SparseModule
from .ffn import SparseFFN

__all__ = ["SparseWindowAttention", "SparseTransformerBlock", "window_groups"]

IntOr3 = Union[int, Sequence[int]]


def _triple(value: IntOr3, name: str) -> Tuple[int, int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or 3 ints, got {value!r}")
    out = (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"{name} must be a positive int or 3 positive ints (x, y, z), got {value!r}")
    return out


def _coords_and_features(x, coords, who: str):
    if isinstance(x, SparseTensor):
        if coords is not None:
            raise ValueError(f"{who}: coords come from the SparseTensor; do not pass them too")
        return x.features, x.coords
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{who} expects a SparseTensor or [N, C] features with coords, got "
                         f"{getattr(x, 'shape', type(x))}")
    if coords is None or coords.dim() != 2 or coords.shape != (x.shape[0], 4):
        raise ValueError(f"{who} with plain features needs coords [N, 4] (batch, x, y, z) for {x.shape[0]} rows, "
                         f"got {None if coords is None else tuple(coords.shape)}")
    return x, coords


def window_groups(coords: torch.Tensor, window: Tuple[int, int, int], shift: Tuple[int, int, int],
                  max_group: int):
    """Splits voxels into attention groups: windows of each batch element, cut into chunks of ``max_group``.

    Window of voxel ``(b, x, y, z)``: ``(b, (x + sx) // wx, (y + sy) // wy, (z + sz) // wz)``.  Voxels are
    sorted by ``(batch, window)`` (stably, so input order within a window); each window's voxels are cut
    into consecutive chunks of at most ``max_group``.

    Args:
        coords: int ``[N, 4]`` rows ``(batch, x, y, z)``.
        window, shift: voxels per window and the shift added to coordinates, per axis.
        max_group: most voxels per chunk.

    Returns:
        ``(order, chunk, pos, sizes)``: ``order`` ``[N]`` voxel indices in sorted order; ``chunk`` ``[N]`` and
        ``pos`` ``[N]`` the chunk and slot of ``order[i]``; ``sizes`` ``[num_chunks]`` voxels per chunk.
    """
    n, device = coords.shape[0], coords.device
    order, counts = _window_runs(coords, window, shift)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - starts.repeat_interleave(counts)
    chunks_per_window = (counts + max_group - 1) // max_group
    first_chunk = torch.cumsum(chunks_per_window, 0) - chunks_per_window
    chunk = first_chunk.repeat_interleave(counts) + rank // max_group
    pos = rank % max_group
    sizes = torch.bincount(chunk, minlength=int(chunks_per_window.sum()))
    return order, chunk, pos, sizes


def _window_runs(coords: torch.Tensor, window, shift):
    """``(order, counts)``: voxels sorted stably by ``(batch, window)``, and the voxels of each window in that order."""
    c = coords.long()
    w = torch.tensor(window, device=coords.device)
    s = torch.tensor(shift, device=coords.device)
    wid = (c[:, 1:] + s) // w
    dims = wid.max(0).values + 1
    key = ((c[:, 0] * dims[0] + wid[:, 0]) * dims[1] + wid[:, 1]) * dims[2] + wid[:, 2]
    key_sorted, order = torch.sort(key, stable=True)
    _, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    return order, counts


def _chunk_offsets(counts: torch.Tensor, max_group: int) -> torch.Tensor:
    """Row offsets ``[G + 1]`` of the chunks (at most ``max_group`` rows, consecutive) of windows of ``counts`` rows."""
    chunks_per_window = (counts + max_group - 1) // max_group
    window_start = torch.cumsum(counts, 0) - counts
    first_chunk = torch.cumsum(chunks_per_window, 0) - chunks_per_window
    total = int(chunks_per_window.sum())
    # chunk j of window w starts at window_start[w] + (j - first_chunk[w]) * max_group
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), chunks_per_window,
                                    output_size=total)
    starts = window_start.index_select(0, owner) + (torch.arange(total, device=counts.device)
                                                    - first_chunk.index_select(0, owner)) * max_group
    return torch.cat([starts, counts.sum().reshape(1)])


class SparseWindowAttention(SparseModule):
    """Multi-head self-attention among the active voxels of each local 3D window.

    Voxels are grouped by ``(batch element, window)``; a window holding more than ``max_group`` active voxels
    is cut into chunks of at most ``max_group`` (consecutive in input order), and attention is *within each
    chunk* (a voxel never attends outside its chunk), so the cost is ``O(N * max_group)``, never ``O(N^2)``.
    One sort orders the voxels by chunk, and :func:`sparseconv.ops.window_attention` does the rest: on the
    CPU a fused kernel that, chunk by chunk, projects the chunk's voxels to q, k, v, attends (scores,
    softmax and the weighted sum, vectorized, no padding) and applies the output projection -- no
    ``[N, 3C]`` tensor; the backward recomputes the softmax from the saved log-sum-exp.  On CUDA: batched
    products over chunks padded to powers of two with a key mask.  With ``topk`` the scores are computed
    explicitly over padded chunks (the ``topk`` largest per query are kept).

    Args:
        channels: channels ``C`` (input and output).
        heads: attention heads (must divide ``C``).
        window: window size in voxels (int or ``(x, y, z)``).
        shift: shift windows by half a window (``window // 2`` per axis, Swin-style) -- use in alternate blocks.
        topk: keep only the ``topk`` largest scores of each query (the others are set to ``-inf`` before the
            softmax; ties with the ``topk``-th score are kept too); scores are then computed explicitly.
        max_group: most voxels per attention chunk (>= 1).
        bias: biases of the qkv and output projections.

    Shapes:
        ``forward(x)`` with a SparseTensor of ``C`` channels -> SparseTensor on the same sites; or
        ``forward(features [N, C], coords [N, 4])`` -> ``[N, C]``.  ``N = 0`` gives an empty output.

    Example:
        >>> attn = SparseWindowAttention(64, heads=4, window=8)
        >>> y = attn(x)                  # x: SparseTensor, 64 channels
        >>> y2 = SparseWindowAttention(64, 4, 8, shift=True)(y)
    """

    def __init__(self, channels: int, heads: int, window: IntOr3, shift: bool = False, topk: Optional[int] = None,
                 max_group: int = 64, bias: bool = True):
        super().__init__()
        if channels < 1 or heads < 1 or channels % heads:
            raise ValueError(f"heads ({heads}) must be positive and divide channels ({channels})")
        if topk is not None and int(topk) < 1:
            raise ValueError(f"topk must be a positive int or None, got {topk}")
        if int(max_group) < 1:
            raise ValueError(f"max_group must be >= 1, got {max_group}")
        self.channels, self.heads = int(channels), int(heads)
        self.window = _triple(window, "window")
        self.shift = bool(shift)
        self.topk = None if topk is None else int(topk)
        self.max_group = int(max_group)
        self.qkv = torch.nn.Linear(channels, 3 * channels, bias=bias)
        self.proj = torch.nn.Linear(channels, channels, bias=bias)

    @property
    def shift_amount(self) -> Tuple[int, int, int]:
        """Voxels added to each coordinate before taking its window (``window // 2`` when shifted)."""
        return tuple(w // 2 for w in self.window) if self.shift else (0, 0, 0)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.heads}, window={self.window}, shift={self.shift}, "
                f"topk={self.topk}, max_group={self.max_group}")

    def forward(self, x, coords: Optional[torch.Tensor] = None):
        f, c = _coords_and_features(x, coords, "SparseWindowAttention")
        if f.shape[1] != self.channels:
            raise ValueError(f"SparseWindowAttention expects {self.channels} channels, got {f.shape[1]}")
        n, ch = f.shape[0], self.channels
        if n == 0:
            out = self.proj(self.qkv(f)[:, :ch])
            return x.replace_feature(out) if isinstance(x, SparseTensor) else out
        # chunks are contiguous in sorted order
        order, counts = _window_runs(c, self.window, self.shift_amount)
        offsets = _chunk_offsets(counts, self.max_group)
        scale = 1.0 / math.sqrt(ch // self.heads)
        if self.topk is None:  # the op projects and reads the rows through `order` itself
            out = ops.window_attention(f, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, offsets,
                                       self.heads, scale, order)
        else:  # explicit scores over padded chunks, the topk largest per query kept
            attended_sorted, _ = ops._padded_attention(self.qkv(f).index_select(0, order), offsets, self.heads, scale,
                                                       topk=self.topk)
            out = self.proj(torch.empty_like(attended_sorted).index_copy(0, order, attended_sorted))
        return x.replace_feature(out) if isinstance(x, SparseTensor) else out


class SparseTransformerBlock(SparseModule):
    """Pre-norm transformer block on voxels: window attention and a :class:`SparseFFN`, each with a residual.

    ``y = x + pe``; ``y = y + attn(LayerNorm(y))``; ``y = y + ffn(LayerNorm(y))``, where the positional
    encoding ``pe`` is a small MLP (``Linear(3, C) -> ReLU -> Linear(C, C)``) on the voxel's position relative
    to its (shifted) window origin, scaled to ``[-0.5, 0.5)`` per axis: ``((coord + shift) mod window) / window
    - 0.5``.  It is relative, so it is the same for every window and translation-invariant at window scale.

    Args:
        channels: channels ``C``.
        heads: attention heads (divide ``C``).
        window: window size in voxels (int or ``(x, y, z)``).
        hidden: hidden channels of the FFN.
        shift: shifted windows (use ``shift=True`` in every second block).
        ffn_activation: ``"relu"`` or ``"topk"`` (then ``ffn_k`` hidden units are kept per voxel).
        ffn_k: ``k`` of the TopK activation.
        topk: passed to :class:`SparseWindowAttention`.
        max_group: passed to :class:`SparseWindowAttention`.
        sparse_path: passed to :class:`SparseFFN`.

    Shapes:
        SparseTensor with ``C`` channels -> SparseTensor on the same sites; or ``(features [N, C], coords
        [N, 4])`` -> ``[N, C]``.

    Example:
        >>> blocks = [SparseTransformerBlock(64, 4, 8, 256, shift=i % 2 == 1) for i in range(4)]
        >>> for b in blocks:
        ...     x = b(x)
    """

    def __init__(self, channels: int, heads: int, window: IntOr3, hidden: int, shift: bool = False,
                 ffn_activation: str = "relu", ffn_k: Optional[int] = None, topk: Optional[int] = None,
                 max_group: int = 64, sparse_path: Union[str, bool] = "auto"):
        super().__init__()
        self.attn = SparseWindowAttention(channels, heads, window, shift=shift, topk=topk, max_group=max_group)
        self.norm1 = torch.nn.LayerNorm(channels)
        self.norm2 = torch.nn.LayerNorm(channels)
        self.ffn = SparseFFN(channels, hidden, activation=ffn_activation, k=ffn_k, sparse_path=sparse_path)
        self.pos = torch.nn.Sequential(torch.nn.Linear(3, channels), torch.nn.ReLU(), torch.nn.Linear(channels, channels))

    def positional_encoding(self, coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[N, C]`` encoding of int ``coords`` ``[N, 4]`` (position within the window, see the class)."""
        w = torch.tensor(self.attn.window, device=coords.device)
        s = torch.tensor(self.attn.shift_amount, device=coords.device)
        rel = ((coords[:, 1:].long() + s) % w).to(dtype) / w.to(dtype) - 0.5
        return self.pos(rel)

    def forward(self, x, coords: Optional[torch.Tensor] = None):
        f, c = _coords_and_features(x, coords, "SparseTransformerBlock")
        y = f + self.positional_encoding(c, f.dtype)
        y = y + self.attn(self.norm1(y), c)
        y = y + self.ffn(self.norm2(y))
        return x.replace_feature(y) if isinstance(x, SparseTensor) else y
