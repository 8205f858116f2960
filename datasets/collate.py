"""Batching samples into one voxelized :class:`~sparseconv.SparseTensor`: :func:`collate`.

Use it as the ``collate_fn`` of a ``torch.utils.data.DataLoader`` through ``functools.partial``
(picklable, so it works with worker processes):

    >>> from functools import partial
    >>> loader = torch.utils.data.DataLoader(
    ...     ds, batch_size=4, shuffle=True, num_workers=2,
    ...     collate_fn=partial(collate, voxel_size=(0.05, 0.05, 0.1), point_range=(0, -40, -3, 70.4, 40, 1)))
    >>> batch = next(iter(loader))
    >>> batch["voxels"], batch["gt_boxes"].shape

DataLoader workers send the batch back pickled: a :class:`~sparseconv.SparseTensor` pickles its
features, coordinates, grid, stride, batch size and voxel geometry; cached kernel maps are rebuilt.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from sparseconv.voxelize import voxelize

__all__ = ["collate"]


def collate(
    samples: Sequence[Dict[str, object]],
    voxel_size: Sequence[float],
    point_range: Sequence[float],
    reduce: str = "mean",
    max_points_per_voxel: Optional[int] = None,
) -> Dict[str, object]:
    """Concatenates the scans of a batch and voxelizes them into one sparse tensor.

    Args:
        samples: sample dicts (:class:`~sparseconv.datasets.KittiDetection`,
            :class:`~sparseconv.datasets.SemanticKitti`, ...), each with ``points`` ``[N_b, C]``.
        voxel_size, point_range, reduce, max_points_per_voxel: as :func:`sparseconv.voxelize`
            (points outside ``point_range`` get no voxel).

    Returns:
        A dict:

        * ``voxels``: :class:`~sparseconv.SparseTensor`, ``batch_size = B``, the reduced point
          features (``C`` channels), rows sorted by ``(batch, x, y, z)``; carries the voxel geometry;
        * ``point_to_voxel``: int64 ``[N]`` row of each point's voxel, -1 for a dropped point;
        * ``points``: float32 ``[N, C]`` all points; ``batch_index``: int64 ``[N]`` their scan;
        * ``batch_size``: ``B``;
        * ``gt_boxes`` (detection): float32 ``[B, M_max, 8]``, ``x, y, z, dx, dy, dz, yaw, label``
          of the boxes with ``gt_labels >= 1``, zero rows after them (label 0 = padding; boxes of
          other classes are left out);
        * ``labels``, ``instance`` (segmentation): int64 ``[N]``, concatenated like ``points``;
        * every other key present in all samples (``frame_id``, ``gt_names``, ``calib``, ...):
          a list with one entry per sample.

    Raises:
        ValueError: no samples, a sample without ``points``, or samples with different point widths.

    Example:
        >>> batch = collate([ds[0], ds[1]], voxel_size=(0.1, 0.1, 0.2), point_range=(0, -40, -3, 70.4, 40, 1))
        >>> batch["voxels"].batch_size, batch["gt_boxes"].shape      # 2, [2, M_max, 8]
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate needs at least one sample")
    arrays = []
    for b, s in enumerate(samples):
        if "points" not in s:
            raise ValueError(f"sample {b} has no 'points' (keys: {sorted(s)})")
        p = np.asarray(s["points"], np.float32)
        if p.ndim != 2 or p.shape[1] < 3:
            raise ValueError(f"sample {b}: points must be [N, >= 3], got shape {p.shape}")
        arrays.append(p)
    widths = {p.shape[1] for p in arrays}
    if len(widths) > 1:
        raise ValueError(f"samples have points with different column counts {[p.shape[1] for p in arrays]}")
    points = torch.from_numpy(np.concatenate(arrays))
    batch = torch.cat([torch.full((len(p),), b, dtype=torch.int64) for b, p in enumerate(arrays)])
    vox = voxelize(points, voxel_size, point_range, reduce=reduce, max_points_per_voxel=max_points_per_voxel,
                   batch=batch, batch_size=len(samples))
    out: Dict[str, object] = {"voxels": vox.tensor, "point_to_voxel": vox.point_to_voxel, "points": points,
                              "batch_index": batch, "batch_size": len(samples)}
    done = {"points"}
    if any(s.get("gt_boxes") is not None for s in samples):
        rows: List[np.ndarray] = []
        for s in samples:
            boxes = np.asarray(s.get("gt_boxes", np.zeros((0, 7))), np.float32).reshape(-1, 7)
            labels = np.asarray(s.get("gt_labels", np.ones(len(boxes))), np.float32).reshape(-1)
            keep = labels >= 1
            rows.append(np.concatenate([boxes[keep], labels[keep, None]], 1))
        padded = np.zeros((len(samples), max(len(r) for r in rows), 8), np.float32)
        for b, r in enumerate(rows):
            padded[b, :len(r)] = r
        out["gt_boxes"] = torch.from_numpy(padded)
        done.add("gt_boxes")
    for key in ("labels", "instance"):
        if all(s.get(key) is not None for s in samples):
            for b, (s, p) in enumerate(zip(samples, arrays)):
                if len(s[key]) != len(p):
                    raise ValueError(f"sample {b}: {len(s[key])} {key} for {len(p)} points")
            out[key] = torch.from_numpy(np.concatenate([np.asarray(s[key], np.int64) for s in samples]))
            done.add(key)
    for key in samples[0]:
        if key not in done and key not in out and all(key in s for s in samples):
            out[key] = [s[key] for s in samples]
    return out
