"""Distributed training helpers: process-group set-up, sampling, synchronised batch norm, reductions.

Launch with ``torchrun --nproc_per_node=N tools/train_det.py --launcher pytorch ...``: torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them, picks the device (``cuda:LOCAL_RANK`` when CUDA is used, else the CPU) and the backend
from that device (:func:`backend_for`: NCCL for CUDA, gloo otherwise).

Example:
    >>> env = init_distributed("pytorch", device="auto")       # or "none": a single process
    >>> model = wrap_model(model.to(env.device), env, sync_bn=True)
    >>> sampler = EpochSampler(len(dataset), shuffle=True, seed=0, rank=env.rank, world_size=env.world_size)
"""
from __future__ import annotations

import dataclasses
import math
import os
from datetime import timedelta
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

from sparseconv.nn import SyncBatchNorm as SparseSyncBatchNorm

__all__ = ["DistEnv", "init_distributed", "cleanup_distributed", "backend_for", "resolve_device", "EpochSampler",
           "ShardSampler", "convert_sync_batchnorm", "DenseSyncBatchNorm", "wrap_model", "unwrap_model",
           "all_reduce_mean", "all_gather_objects", "barrier"]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` / ``world_size`` / ``local_rank`` and its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group was initialised by init_distributed

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and prints."""
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """The collective backend for a device type: ``nccl`` for CUDA, ``gloo`` for everything else."""
    return {"cuda": "nccl"}.get(torch.device(device).type, "gloo")


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA (``cuda:local_rank``) when available, else the CPU; ``"cuda"`` gets the local
    rank's index; anything else is passed to ``torch.device``.

    Raises:
        ValueError: ``"cuda"`` asked for but not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available in this torch build / machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(launcher: str = "none", device: str = "auto", timeout_min: float = 60.0) -> DistEnv:
    """Sets up this process for training.

    Args:
        launcher: ``"none"`` (one process) or ``"pytorch"`` (started by ``torchrun``: reads ``RANK``,
            ``WORLD_SIZE``, ``LOCAL_RANK`` and initialises the default process group with
            ``init_method="env://"``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device string (see :func:`resolve_device`).
        timeout_min: collective timeout in minutes (evaluation on rank 0 may make others wait).

    Returns:
        A :class:`DistEnv`.

    Raises:
        ValueError: an unknown launcher, or ``pytorch`` without the torchrun environment.
    """
    if launcher not in ("none", "pytorch"):
        raise ValueError(f"launcher must be 'none' or 'pytorch', got {launcher!r}")
    if launcher == "none":
        return DistEnv(device=resolve_device(device))
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"launcher 'pytorch' expects to be started by torchrun (environment {missing} not set): "
                         f"torchrun --nproc_per_node=N tools/train_det.py --launcher pytorch ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(dev), init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(minutes=float(timeout_min)))
    return DistEnv(rank, world, local_rank, dev, True)


def cleanup_distributed(env: DistEnv) -> None:
    """Destroys the process group made by :func:`init_distributed` (no-op for a single process)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """``dist.barrier()`` in a process group, nothing otherwise."""
    if _world() > 1:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (the tensor itself without a process group)."""
    if _world() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / _world()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable) in rank order; ``[obj]`` without a process group."""
    if _world() == 1:
        return [obj]
    out: List[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- sampling
class EpochSampler(torch.utils.data.Sampler):
    """Deterministic, resumable and distributed index order over a map-style dataset.

    Epoch ``e`` orders ``range(n)`` by ``torch.randperm(n)`` of a generator seeded with
    ``seed + e`` (or in order when ``shuffle=False``), pads it by repeating its start to a multiple of
    ``world_size`` and gives rank ``r`` every ``world_size``-th index from ``r`` (as
    ``torch.utils.data.DistributedSampler``, so every rank gets ``ceil(n / world_size)`` indices). The
    order depends only on ``(seed, epoch)``; :meth:`set_epoch` with ``start=k`` skips the first ``k``
    indices of this rank (resuming in the middle of an epoch without loading the skipped samples).

    Args:
        n: dataset length.
        shuffle: random order per epoch.
        seed: the shuffling seed.
        rank, world_size: this process among ``world_size``.

    Example:
        >>> s = EpochSampler(10, seed=0, rank=1, world_size=2)
        >>> s.set_epoch(3, start=2)        # epoch 3, the first 2 indices of rank 1 already done
        >>> len(s), list(s) == s.epoch_indices()[2:]
        (3, True)
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got n={n}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        """Indices of one rank per epoch: ``ceil(n / world_size)``."""
        return math.ceil(self.n / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects epoch ``epoch``'s order and skips its first ``start`` indices (of this rank)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}], got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def epoch_indices(self) -> List[int]:
        """This rank's full index list of the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sharding: rank ``r`` gets indices ``r, r + world_size, ...`` (no padding, no
    repetition: every index is seen by exactly one rank)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(int(rank), int(n), int(world_size)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------- batch norm
class DenseSyncBatchNorm(SparseSyncBatchNorm):
    """Synchronised batch norm for dense ``[N, C, *spatial]`` maps (``BatchNorm2d`` / ``3d``) on any
    device and backend (gloo included).

    The spatial positions are flattened to ``[N, C, L]`` and normalised by
    :class:`sparseconv.nn.SyncBatchNorm`: statistics over every position of every sample of every
    rank, exactly ``BatchNorm2d`` in eval mode or without a process group. ``torch.nn.SyncBatchNorm``
    only runs on GPUs; :func:`convert_sync_batchnorm` uses this one elsewhere. State-dict keys are
    those of ``BatchNorm2d``.

    Example:
        >>> bn = DenseSyncBatchNorm(64)
        >>> y = bn(torch.randn(2, 64, 100, 88))      # [N, C, H, W]
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DenseSyncBatchNorm expects [N, C, ...] input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 3:
            return super().forward(x)
        n, c = x.shape[:2]
        return super().forward(x.reshape(n, c, -1)).reshape(x.shape)


def _share_bn(src: torch.nn.modules.batchnorm._BatchNorm, dst: torch.nn.Module) -> torch.nn.Module:
    if src.affine:
        dst.weight, dst.bias = src.weight, src.bias
    dst.running_mean, dst.running_var = src.running_mean, src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    return dst


def convert_sync_batchnorm(module: torch.nn.Module, device: Optional[torch.device] = None,
                           process_group=None) -> torch.nn.Module:
    """Makes every batch norm of a model synchronised across the ranks (sharing its parameters and buffers).

    * ``BatchNorm1d`` (sparseconv's :class:`~sparseconv.nn.BatchNorm` on voxel features included) ->
      :class:`sparseconv.nn.SyncBatchNorm` (any device and backend);
    * ``BatchNorm2d`` / ``BatchNorm3d`` (bird's-eye-view maps) -> ``torch.nn.SyncBatchNorm`` on CUDA,
      :class:`DenseSyncBatchNorm` elsewhere (``torch.nn.SyncBatchNorm`` refuses CPU tensors).

    Args:
        module: the model (converted in place where possible; use the returned module).
        device: where the model runs (default: the device of its first parameter).
        process_group: the group to synchronise over (default: the world).

    Returns:
        The converted module.
    """
    if device is None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    module = SparseSyncBatchNorm.convert_sync_batchnorm(module, process_group)
    use_torch = torch.device(device).type == "cuda"

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            if use_torch:
                return torch.nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group)
            ref = m.weight if m.weight is not None else m.running_mean
            new = DenseSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                     process_group, device=None if ref is None else ref.device,
                                     dtype=None if ref is None else ref.dtype)
            return _share_bn(m, new)
        for name, child in m.named_children():
            m.add_module(name, convert(child))
        return m

    return convert(module)


# ----------------------------------------------------------------------------- model wrapping
def wrap_model(model: torch.nn.Module, env: DistEnv, sync_bn: bool = False,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """Moves the model to ``env.device`` and, in a process group, converts its batch norms (``sync_bn``)
    and wraps it in ``DistributedDataParallel`` (``device_ids`` for CUDA)."""
    model = model.to(env.device)
    if not env.distributed:
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, env.device)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (the model itself otherwise)."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model
