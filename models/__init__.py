"""Reference networks built from sparseconv layers (installed as ``sparseconv.models``).

Models are registered by name: ``create_model(name, **kwargs)``, ``list_models()``.
"""
from .registry import create_model, list_models, model_entrypoint, register_model
from .backbones3d import VoxelBackBone8x, height_compression

__all__ = ["create_model", "list_models", "model_entrypoint", "register_model", "VoxelBackBone8x",
           "height_compression"]
