"""Feature-wise layers and containers."""
from __future__ import annotations

import torch

from ..tensor import SparseTensor
from .base import SparseModule

__all__ = ["ReLU", "LeakyReLU", "GELU", "SiLU", "Dropout", "Linear", "SparseSequential", "ToDense"]


class _FeatureWise(SparseModule):
    """Applies ``self.fn`` to the features (or to a plain tensor)."""

    def fn(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.replace_feature(self.fn(x.features))
        return self.fn(x)


class ReLU(_FeatureWise):
    """ReLU on features (always out of place: the input SparseTensor is never modified)."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def fn(self, f):
        return torch.relu(f)


class LeakyReLU(_FeatureWise):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def fn(self, f):
        return torch.nn.functional.leaky_relu(f, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class GELU(_FeatureWise):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def fn(self, f):
        return torch.nn.functional.gelu(f, approximate=self.approximate)


class SiLU(_FeatureWise):
    def __init__(self, inplace: bool = False):
        super().__init__()

    def fn(self, f):
        return torch.nn.functional.silu(f)


class Dropout(_FeatureWise):
    """Dropout of individual feature values."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def fn(self, f):
        return torch.nn.functional.dropout(f, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Linear(torch.nn.Linear, SparseModule):
    """``torch.nn.Linear`` on the features of each voxel (a 1x1x1 convolution without a kernel map)."""

    def forward(self, x):
        if isinstance(x, SparseTensor):
            if x.num_channels != self.in_features:
                raise ValueError(f"Linear expects {self.in_features} input channels, got {x.num_channels}")
            return x.replace_feature(super().forward(x.features))
        return super().forward(x)


class SparseSequential(torch.nn.Sequential, SparseModule):
    """``torch.nn.Sequential`` for sparse networks.

    Sparse layers receive the SparseTensor; any other module (``torch.nn.BatchNorm1d``,
    ``torch.nn.ReLU``, ...) is applied to its features, as in spconv.

    Example:
        >>> net = SparseSequential(SubMConv3d(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
    """

    def forward(self, x):
        for module in self:
            if isinstance(x, SparseTensor) and not isinstance(module, SparseModule):
                x = x.replace_feature(module(x.features))
            else:
                x = module(x)
        return x


class ToDense(SparseModule):
    """SparseTensor -> dense ``[B, C, X, Y, Z]`` (``[B, X, Y, Z, C]`` if not ``channels_first``)."""

    def __init__(self, channels_first: bool = True):
        super().__init__()
        self.channels_first = bool(channels_first)

    def forward(self, x: SparseTensor) -> torch.Tensor:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"ToDense expects a SparseTensor, got {type(x).__name__}")
        return x.dense(self.channels_first)
