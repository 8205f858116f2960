"""Training engine: configs, checkpoints, distributed helpers, a resumable trainer, detection glue.

* :mod:`~sparseconv.engine.config`: YAML configs with ``_base_`` inheritance and ``--set`` overrides;
* :mod:`~sparseconv.engine.checkpoint`: atomic checkpoints, the newest ``N`` kept;
* :mod:`~sparseconv.engine.distributed`: ``torchrun`` set-up, resumable distributed sampler,
  synchronised batch norm for sparse and dense layers;
* :mod:`~sparseconv.engine.trainer`: :class:`Trainer` (AdamW + one-cycle, AMP, clipping, DDP, CSV /
  TensorBoard logs, exact resumption);
* :mod:`~sparseconv.engine.det`: 3D detection datasets, models and KITTI evaluation
  (``tools/train_det.py``, ``tools/eval_det.py``);
* :mod:`~sparseconv.engine.seg`: semantic segmentation data, loss and mIoU evaluation
  (``tools/train_seg.py``, ``tools/eval_seg.py``);
* :mod:`~sparseconv.engine.common`: helpers shared by ``det`` and ``seg`` (grid checks, eval loaders,
  timing); :mod:`~sparseconv.engine.cli`: the command-line flags and main loops of the four tools.

See ``docs/training.md``.
"""
from .checkpoint import CheckpointManager, checkpoint_name, load_checkpoint, load_checkpoint_config, save_checkpoint
from .config import (REQUIRED, ConfigError, FreeForm, apply_overrides, dump_config, get_key, load_config,
                     merge_configs, parse_overrides, validate_config)
from .distributed import (DenseSyncBatchNorm, DistEnv, EpochSampler, ShardSampler, backend_for,
                          cleanup_distributed, convert_sync_batchnorm, init_distributed, resolve_device,
                          unwrap_model, wrap_model)
from .trainer import TRAIN_SCHEMA, CSVLogger, Trainer, build_optimizer, build_scheduler, set_seed, to_device

__all__ = [
    "load_config", "merge_configs", "parse_overrides", "apply_overrides", "validate_config", "dump_config",
    "get_key", "REQUIRED", "FreeForm", "ConfigError",
    "save_checkpoint", "load_checkpoint", "load_checkpoint_config", "CheckpointManager", "checkpoint_name",
    "DistEnv", "init_distributed", "cleanup_distributed", "backend_for", "resolve_device", "EpochSampler",
    "ShardSampler", "convert_sync_batchnorm", "DenseSyncBatchNorm", "wrap_model", "unwrap_model",
    "TRAIN_SCHEMA", "Trainer", "CSVLogger", "build_optimizer", "build_scheduler", "set_seed", "to_device",
]
