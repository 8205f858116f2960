"""Normalisation layers on the features of a SparseTensor."""
from __future__ import annotations

import torch

from ..tensor import SparseTensor
from . import functional as F
from .base import SparseModule

__all__ = ["BatchNorm", "SyncBatchNorm", "LayerNorm", "GroupNorm"]


def _features_of(x):
    return x.features if isinstance(x, SparseTensor) else x


def _wrap(x, out):
    return x.replace_feature(out) if isinstance(x, SparseTensor) else out


class BatchNorm(torch.nn.BatchNorm1d, SparseModule):
    """``torch.nn.BatchNorm1d`` over the voxels (all batch elements together), per channel.

    Accepts a SparseTensor or a plain ``[N, C]`` tensor; same parameters and state-dict keys as
    ``BatchNorm1d`` (so spconv checkpoints load).  An empty input passes through unchanged.
    """

    def forward(self, x):
        f = _features_of(x)
        if f.shape[0] == 0:
            return x
        return _wrap(x, super().forward(f))


class SyncBatchNorm(torch.nn.SyncBatchNorm, SparseModule):
    """``torch.nn.SyncBatchNorm`` over voxel features: statistics across all DDP processes.

    Use :meth:`convert_sync_batchnorm` to turn every :class:`BatchNorm` of a model into this
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would produce torch's class, which does not
    take a SparseTensor).  Outside a process group it behaves like :class:`BatchNorm`.
    """

    def forward(self, x):
        f = _features_of(x)
        if f.shape[0] == 0:
            return x
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) and self.training:
            # torch.nn.SyncBatchNorm requires a process group; without one it is plain batch norm.
            out = torch.nn.functional.batch_norm(
                f, self.running_mean, self.running_var, self.weight, self.bias, True,
                0.0 if self.momentum is None else self.momentum, self.eps)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            return _wrap(x, out)
        return _wrap(x, super().forward(f))

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Returns ``module`` with every :class:`BatchNorm` replaced by a :class:`SyncBatchNorm` (state copied)."""
        out = module
        if isinstance(module, BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class LayerNorm(torch.nn.LayerNorm, SparseModule):
    """``torch.nn.LayerNorm`` over the channels of each voxel."""

    def forward(self, x):
        return _wrap(x, super().forward(_features_of(x)))


class GroupNorm(SparseModule):
    """Group normalisation per batch element: ``torch.nn.GroupNorm`` applied to the voxels of each
    sample (statistics over that sample's voxels and the channels of each group).

    Args:
        num_groups: groups the channels are split into.
        num_channels: channels ``C``.
        eps: added to the variance.
        affine: learnable per-channel scale and shift.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = int(num_groups), int(num_channels), float(eps)
        self.weight = torch.nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"
