"""Activations that make features sparse on purpose."""
from __future__ import annotations

import torch

from ..tensor import SparseTensor
from .base import SparseModule

__all__ = ["TopK"]


class TopK(SparseModule):
    """Keeps the ``k`` largest values over the channels of each feature vector and zeroes the rest.

    Every voxel (row) of a SparseTensor keeps exactly ``k`` of its ``C`` channels, so the output
    has a zero fraction of at least ``1 - k / C`` whatever the weights. The kept values are passed
    through unchanged (negative ones included: put a ReLU before or after it for non-negative
    outputs). The gradient flows to the kept entries only; the zeroed entries get gradient 0.
    Ties are resolved by :func:`torch.topk`: deterministic for a given input and device, but
    which of several equal values is kept is not specified.

    Args:
        k: how many channels each feature vector keeps (``>= 1``, at most the number of channels).
        dim: the channel dimension of a plain tensor (default ``-1``: ``[N, C]`` features; use
            ``1`` for dense ``[B, C, X, Y, Z]``). A SparseTensor always uses its features' channels.

    Shape:
        SparseTensor with features ``[N, C]`` -> SparseTensor on the same sites, features
        ``[N, C]`` with ``k`` kept entries per row; a plain tensor keeps its shape.

    Raises:
        ValueError: at construction if ``k < 1``; in ``forward`` if ``k`` is larger than the
            number of channels (the message names both).

    Example:
        >>> act = TopK(4)
        >>> y = act(x)                                   # x: SparseTensor with 16 channels
        >>> bool(((y.features != 0).sum(1) <= 4).all())
        True
        >>> TopK(2, dim=1)(torch.randn(2, 8, 5, 5, 5)).shape   # dense [B, C, X, Y, Z]
        torch.Size([2, 8, 5, 5, 5])
    """

    def __init__(self, k: int, dim: int = -1):
        super().__init__()
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"TopK: k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.dim = int(dim)

    def _topk(self, f: torch.Tensor, dim: int) -> torch.Tensor:
        if f.dim() == 0:
            raise ValueError("TopK: expected a tensor with a channel dimension, got a 0-d tensor")
        channels = f.shape[dim]
        if self.k > channels:
            raise ValueError(f"TopK: k={self.k} is larger than the number of channels C={channels} "
                             f"(dimension {dim} of a tensor of shape {tuple(f.shape)})")
        values, index = torch.topk(f, self.k, dim=dim)
        return torch.zeros_like(f).scatter(dim, index, values)

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.replace_feature(self._topk(x.features, -1))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TopK expects a SparseTensor or a torch.Tensor, got {type(x).__name__}")
        return self._topk(x, self.dim)

    def extra_repr(self) -> str:
        return f"k={self.k}" + (f", dim={self.dim}" if self.dim != -1 else "")
