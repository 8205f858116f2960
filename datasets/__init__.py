"""Datasets, augmentation and batching for LiDAR training (installed as ``sparseconv.datasets``).

See ``docs/datasets.md``.
"""
from .augment import (Compose, GlobalRotation, GlobalScaling, GlobalTranslation, GTDatabase, GTSampler,
                      RandomFlip, RandomPointDropout, crop_to_range, flip_scene, rotate_scene, scale_scene,
                      translate_scene)
from .boxes import box_corners_bev, boxes_bev_overlap, limit_period, points_in_boxes
from .collate import collate
from .kitti import (KittiDetection, camera_boxes_to_lidar, fov_mask, kitti_difficulty, lidar_boxes_to_camera,
                    read_kitti_calib, read_kitti_labels)
from .semantic_kitti import CLASS_NAMES, LEARNING_MAP, LEARNING_MAP_INV, SemanticKitti, learning_map_lut
from .synthetic import (SENSORS, Scan, Sensor, generate_dataset, generate_scene, kitti_calib, simulate_scan,
                        write_kitti_scene, write_semantickitti_scene)

__all__ = [
    "KittiDetection", "read_kitti_calib", "read_kitti_labels", "camera_boxes_to_lidar", "lidar_boxes_to_camera",
    "kitti_difficulty", "fov_mask",
    "SemanticKitti", "CLASS_NAMES", "LEARNING_MAP", "LEARNING_MAP_INV", "learning_map_lut",
    "Compose", "GlobalRotation", "GlobalScaling", "GlobalTranslation", "RandomFlip", "RandomPointDropout",
    "GTDatabase", "GTSampler", "rotate_scene", "scale_scene", "flip_scene", "translate_scene", "crop_to_range",
    "box_corners_bev", "boxes_bev_overlap", "points_in_boxes", "limit_period",
    "collate",
    "Sensor", "SENSORS", "Scan", "simulate_scan", "generate_scene", "generate_dataset", "write_kitti_scene",
    "write_semantickitti_scene", "kitti_calib",
]
