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


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum all-reduce: forward sums over the ranks of ``group``; so does backward
    (the gradient of every rank's loss flows back to every rank's contribution).

    What ``torch.distributed.nn.functional.all_reduce`` does, without its deprecation warning
    (its suggested replacement is not differentiable); works with any backend and device.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm, SparseModule):
    """Batch norm over voxel features with statistics shared by every process of a process group.

    In training mode, inside an initialised process group of more than one process, the mean and
    (biased) variance per channel are those of all voxels of all ranks together, weighted by each
    rank's voxel count (a rank may hold 0 voxels; it must still call the layer, as every rank must
    for any collective).  Statistics are summed with a differentiable all-reduce in two passes
    (sum and count, then the centred sum of squares), so gradients match single-process batch norm
    over the concatenated inputs; running statistics are updated with the unbiased variance of the
    global batch.  This works on every device and backend (gloo on CPU included); unlike
    ``torch.nn.SyncBatchNorm``, DistributedDataParallel accepts it in CPU models.  In eval mode,
    or without a process group (or with one process), it is exactly :class:`BatchNorm`.

    Accepts a SparseTensor or a plain ``[N, C]`` (or ``[N, C, L]``) tensor; parameters and
    state-dict keys are those of ``torch.nn.BatchNorm1d``.  Use :meth:`convert_sync_batchnorm` to
    turn the batch norms of a model into this.

    Args:
        num_features: channels ``C``.
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm1d``.
        process_group: the group whose ranks share statistics (default: the whole world).

    Example:
        >>> model = SyncBatchNorm.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)  # gloo on CPU, or nccl
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"SyncBatchNorm expects [N, C] or [N, C, L] features, got {input.dim()}-D input")

    def _sync_group(self):
        """The process group to synchronise over, or ``None`` when this forward is local."""
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD if self.process_group is None else self.process_group
        return group if torch.distributed.get_world_size(group) > 1 else None

    def forward(self, x):
        f = _features_of(x)
        group = self._sync_group()
        if group is None:  # exactly BatchNorm
            if f.shape[0] == 0:
                return x
            return _wrap(x, super().forward(f))
        self._check_input_dim(f)
        if f.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm expects {self.num_features} channels, got {f.shape[1]}")
        # Every rank reaches the collectives below, also with no voxels.
        if f.dim() == 3:
            n, c, length = f.shape
            out = self._sync_forward(f.transpose(1, 2).reshape(n * length, c), group)
            return _wrap(x, out.reshape(n, length, c).transpose(1, 2))
        return _wrap(x, self._sync_forward(f, group))

    def _sync_forward(self, f: torch.Tensor, group) -> torch.Tensor:
        c = f.shape[1]
        acc = torch.promote_types(f.dtype, torch.float32)  # statistics in float32 at least
        v = f.to(acc)
        local = torch.cat([v.sum(0), v.new_full((1,), float(v.shape[0]))])
        total = _AllReduceSum.apply(local, group)
        count = total[c].detach()
        denom = count.clamp_min(1.0)
        mean = total[:c] / denom
        centred = v - mean
        sq = _AllReduceSum.apply((centred * centred).sum(0), group)
        var = sq / denom
        out = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.to(acc)
        if self.bias is not None:
            out = out + self.bias.to(acc)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), sq.detach(), count)
        return out.to(f.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, sq: torch.Tensor, count: torch.Tensor) -> None:
        """As ``torch.nn.BatchNorm1d`` with the global batch; a step in which every rank was empty
        leaves every buffer unchanged (as :class:`BatchNorm` does with an empty input)."""
        valid = count > 0
        factor = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(valid.to(self.num_batches_tracked.dtype))
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / self.num_batches_tracked.clamp_min(1).to(mean.dtype)
        if factor is None:
            factor = 0.0  # torch's choice when momentum is None and no batches are tracked
        unbiased = sq / (count - 1).clamp_min(1.0)
        rm, rv = self.running_mean, self.running_var
        new_mean = rm.to(mean.dtype) * (1 - factor) + mean * factor
        new_var = rv.to(mean.dtype) * (1 - factor) + unbiased * factor
        rm.copy_(torch.where(valid, new_mean, rm.to(mean.dtype)))
        rv.copy_(torch.where(valid, new_var, rv.to(mean.dtype)))

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Returns ``module`` with every :class:`BatchNorm` (any ``torch.nn.BatchNorm1d``, as used in
        spconv-style ``SparseSequential`` models) replaced by a :class:`SyncBatchNorm` that shares its
        parameters and buffers; children are converted recursively, in place.  A batch norm passed
        itself is returned converted.
        """
        out = module
        if isinstance(module, torch.nn.BatchNorm1d):
            ref = module.weight if module.weight is not None else module.running_mean
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group,
                      device=None if ref is None else ref.device,
                      dtype=None if ref is None else ref.dtype)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
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
