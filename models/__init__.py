"""Reference networks built from sparseconv layers (installed as ``sparseconv.models``).

Models are registered by name: ``create_model(name, **kwargs)``, ``list_models()``.
Detection: ``second``, ``centerpoint``, ``centerpoint_attn`` (see ``docs/detection.md``);
segmentation: ``minkunet``, ``minkunet18``, ``minkunet34``, ``sparse_unet_attn``
(``docs/segmentation.md``); parts: backbones, VFEs, the BEV neck.
"""
from .registry import create_model, list_models, model_entrypoint, register_model
from .backbones3d import SparseBasicBlock, VoxelBackBone8x, VoxelBackBone8xAttn, VoxelResBackBone8x, height_compression
from .backbones2d import BaseBEVBackbone
from .vfe import MeanVFE, PointNetVFE
from .box_coder import ResidualCoder, decode_center_boxes, encode_center_targets
from .nms import batched_circle_nms, batched_rotated_nms, boxes_iou_bev, circle_nms, rotated_nms
from .anchor_head import AnchorHeadSingle
from .center_head import CenterHead, CenterHeadAttn
from .detectors import SECOND, CenterPoint, CenterPointAttn
from .pretrained import list_pretrained, load_pretrained
from .segmentation import (MinkUNet, SparseUNetAttn, lovasz_softmax, segmentation_loss, synthetic_volume,
                           volume_batch, voxel_labels_from_points, voxel_to_point_labels)

__all__ = [
    "create_model", "list_models", "model_entrypoint", "register_model",
    "VoxelBackBone8x", "VoxelResBackBone8x", "VoxelBackBone8xAttn", "SparseBasicBlock", "height_compression",
    "BaseBEVBackbone", "MeanVFE", "PointNetVFE",
    "ResidualCoder", "encode_center_targets", "decode_center_boxes", "boxes_iou_bev", "rotated_nms", "circle_nms",
    "batched_rotated_nms", "batched_circle_nms", "AnchorHeadSingle", "CenterHead", "CenterHeadAttn",
    "SECOND", "CenterPoint", "CenterPointAttn",
    "MinkUNet", "SparseUNetAttn", "segmentation_loss", "lovasz_softmax", "voxel_to_point_labels",
    "voxel_labels_from_points", "synthetic_volume", "volume_batch", "list_pretrained", "load_pretrained",
]
