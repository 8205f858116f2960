"""Reference networks built from sparseconv layers (installed as ``sparseconv.models``)."""
from .backbones3d import VoxelBackBone8x, height_compression

__all__ = ["VoxelBackBone8x", "height_compression"]
