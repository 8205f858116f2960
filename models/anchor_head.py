"""SECOND's anchor-based detection head (OpenPCDet ``AnchorHeadSingle``): :class:`AnchorHeadSingle`.

Per BEV cell and class, anchors of fixed sizes and rotations; 1x1 convs predict, per anchor, the
class logits, the box residuals (:class:`~.box_coder.ResidualCoder`) and a direction bin. Training
assigns anchors to ground-truth boxes of their class by rotated BEV IoU (OpenPCDet
``AxisAlignedTargetAssigner``: positive at ``IoU >= matched``, negative below ``unmatched``, ignored
between, and every box also gets its best anchors); inference decodes the boxes, fixes the heading
with the direction bin and runs rotated NMS.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .box_coder import ResidualCoder, limit_period
from .nms import batched_rotated_nms, boxes_iou_bev, rotated_nms

__all__ = ["AnchorHeadSingle", "DEFAULT_ANCHOR_CONFIG", "sigmoid_focal_loss", "smooth_l1"]

#: OpenPCDet's KITTI anchors (``second.yaml``): ``sizes`` (dx, dy, dz), ``rotations``, ``bottom_heights``
#: (the anchor's bottom z; its centre is ``bottom + dz / 2``) and the IoU thresholds per class.
DEFAULT_ANCHOR_CONFIG: Dict[str, Dict[str, object]] = {
    "Car": {"sizes": ((3.9, 1.6, 1.56),), "rotations": (0.0, math.pi / 2), "bottom_heights": (-1.78,),
            "matched_threshold": 0.6, "unmatched_threshold": 0.45},
    "Pedestrian": {"sizes": ((0.8, 0.6, 1.73),), "rotations": (0.0, math.pi / 2), "bottom_heights": (-0.6,),
                   "matched_threshold": 0.5, "unmatched_threshold": 0.35},
    "Cyclist": {"sizes": ((1.76, 0.6, 1.73),), "rotations": (0.0, math.pi / 2), "bottom_heights": (-0.6,),
                "matched_threshold": 0.5, "unmatched_threshold": 0.35},
}


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise sigmoid focal loss (OpenPCDet ``SigmoidFocalClassificationLoss``, unreduced).

    ``alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)`` with ``alpha_t = alpha`` for a target 1,
    ``1 - alpha`` for 0.

    Example:
        >>> round(sigmoid_focal_loss(torch.zeros(1), torch.ones(1)).item(), 6)   # 0.25 * 0.5**2 * log 2
        0.043322
    """
    p = torch.sigmoid(logits)
    alpha_w = targets * alpha + (1 - targets) * (1 - alpha)
    pt = targets * (1 - p) + (1 - targets) * p
    bce = logits.clamp_min(0) - logits * targets + torch.log1p(torch.exp(-logits.abs()))
    return alpha_w * pt.pow(gamma) * bce


def smooth_l1(diff: torch.Tensor, beta: float = 1.0 / 9.0) -> torch.Tensor:
    """Element-wise smooth L1 of ``diff`` (OpenPCDet ``WeightedSmoothL1Loss``): ``0.5 d^2 / beta`` below
    ``beta``, ``|d| - 0.5 beta`` above."""
    n = diff.abs()
    if beta < 1e-5:
        return n
    return torch.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta)


def _floats(value, n: Optional[int], name: str) -> Tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if n is not None and len(out) != n:
        raise ValueError(f"{name} must be {n} numbers, got {value!r}")
    return out


def _pos_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _opt_pos_int(value, name: str) -> Optional[int]:
    return None if value is None else _pos_int(value, name + " (or None)")


def _check_geometry(point_range, voxel_size) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    pr = _floats(point_range, 6, "point_range")
    vs = _floats(voxel_size, 3, "voxel_size")
    if min(vs) <= 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size!r}")
    if not all(pr[i + 3] > pr[i] for i in range(3)):
        raise ValueError(f"point_range must be (x0, y0, z0, x1, y1, z1) with x1 > x0 etc., got {point_range!r}")
    return pr, vs


def _check_class_names(class_names) -> Tuple[str, ...]:
    if isinstance(class_names, str) or not hasattr(class_names, "__len__") or len(class_names) == 0 \
            or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"class_names must be a non-empty sequence of str, got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be distinct, got {class_names!r}")
    return tuple(class_names)


def _map_size(feature_map_size, name: str = "feature_map_size") -> Tuple[int, int]:
    try:
        x, y = (int(v) for v in feature_map_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 2 positive ints (X, Y), got {feature_map_size!r}") from None
    if x < 1 or y < 1:
        raise ValueError(f"{name} must be 2 positive ints (X, Y), got {feature_map_size!r}")
    return x, y


def _check_bev(x: torch.Tensor, channels: int, map_size: Tuple[int, int], who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{who} expects a BEV map [B, C, Y, X], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != channels:
        raise ValueError(f"{who} expects {channels} channels, got a map of shape {tuple(x.shape)}")
    if (x.shape[3], x.shape[2]) != map_size:
        raise ValueError(f"{who} was built for a BEV map of X x Y = {map_size[0]} x {map_size[1]} cells "
                         f"(feature_map_size from point_range / voxel_size / stride) but got [B, C, Y, X] = "
                         f"{tuple(x.shape)}; check the backbone strides against the grid")


def _gt_check(gt_boxes: torch.Tensor, batch_size: Optional[int] = None) -> None:
    if not isinstance(gt_boxes, torch.Tensor) or gt_boxes.dim() != 3 or gt_boxes.shape[2] != 8 \
            or (batch_size is not None and gt_boxes.shape[0] != batch_size):
        raise ValueError(f"gt_boxes must be [B = {batch_size or 'B'}, M, 8] (x, y, z, dx, dy, dz, yaw, label), got "
                         f"{tuple(gt_boxes.shape) if isinstance(gt_boxes, torch.Tensor) else type(gt_boxes).__name__}")


class AnchorHeadSingle(torch.nn.Module):
    """SECOND's single-level anchor head (OpenPCDet ``AnchorHeadSingle`` with ``AxisAlignedTargetAssigner``).

    Anchors: for every BEV cell ``(i, j)`` and class, every (bottom height, size, rotation) of the class's
    config, centred at ``x0 + offset + i * step`` with ``step = (x1 - x0) / (X - 1)`` (OpenPCDet's
    ``align_center=False``) or ``(x1 - x0) / X`` and ``offset = step / 2`` (``align_center=True``); the
    anchor ``z`` is ``bottom + dz / 2``. Anchor index ``((j * X + i) * A + a)``, the ``A`` anchors of a cell
    class-major.

    Targets (per sample and class, against that class's boxes): rotated BEV IoU; an anchor with IoU
    ``>= matched_threshold`` with some box is positive for its best box, below ``unmatched_threshold``
    with all boxes negative, otherwise ignored; every box with a non-zero overlap also makes its best
    anchors (ties included) positive. Losses (OpenPCDet): sigmoid focal loss on the class logits
    (one-hot, weights ``1 / max(#positives, 1)`` on positives and negatives), smooth L1 (beta 1/9) on
    the residuals of positives with the sin-difference trick on the yaw (``sin(a - b)``), cross entropy
    of the direction bin of positives; each summed and divided by the batch size, weighted by
    ``cls_weight``, ``loc_weight``, ``dir_weight``.

    Inference: sigmoid scores, decoded boxes, the heading put into the predicted direction bin
    (``yaw = limit_period(yaw - dir_offset, dir_limit_offset, 2 pi / bins) + dir_offset + bin * 2 pi / bins``,
    then wrapped to ``[-pi, pi)``), scores ``>= score_threshold``, rotated NMS (class-agnostic over the
    best class per anchor, or per class with ``multi_class_nms``).

    Args:
        in_channels: channels of the BEV feature map.
        class_names: class names; labels are 1-based into it.
        point_range: ``(x0, y0, z0, x1, y1, z1)``, the anchor range.
        voxel_size: ``(vx, vy, vz)`` (kept for reference; the anchors use ``feature_map_size``).
        feature_map_size: BEV map size ``(X, Y)`` in cells the head is applied to.
        anchor_config: per class name a dict overriding :data:`DEFAULT_ANCHOR_CONFIG` entries
            (``sizes``, ``rotations``, ``bottom_heights``, ``matched_threshold``, ``unmatched_threshold``);
            required in full for a class without a default.
        align_center: anchors at cell centres (see above).
        use_direction_classifier, dir_offset, dir_limit_offset, num_dir_bins: OpenPCDet's direction bin.
        encode_angle_by_sincos: :class:`ResidualCoder` option.
        cls_weight, loc_weight, dir_weight: loss weights; code_weights: per residual code (default 1).
        focal_alpha, focal_gamma: focal loss parameters.
        score_threshold, nms_threshold, nms_pre_max, nms_post_max, multi_class_nms: post-processing.

    Shape:
        ``forward(x [B, C, Y, X])`` -> dict ``cls_preds [B, N, num_classes]``, ``box_preds [B, N, code_size]``,
        ``dir_preds [B, N, num_dir_bins]`` with ``N = Y * X * A``.

    Example:
        >>> head = AnchorHeadSingle(64, ("Car", "Pedestrian", "Cyclist"), (0, -20, -3, 32, 20, 1),
        ...                         (0.2, 0.2, 0.1), feature_map_size=(20, 25))
        >>> preds = head(torch.randn(2, 64, 25, 20))
        >>> loss, terms = head.loss(preds, gt_boxes)             # gt_boxes [2, M, 8]
        >>> dets = head.predict(preds)                           # list of 2 dicts
    """

    def __init__(self, in_channels: int, class_names: Sequence[str], point_range: Sequence[float],
                 voxel_size: Sequence[float], feature_map_size: Sequence[int],
                 anchor_config: Optional[Mapping[str, Mapping[str, object]]] = None, align_center: bool = False,
                 use_direction_classifier: bool = True, dir_offset: float = 0.78539, dir_limit_offset: float = 0.0,
                 num_dir_bins: int = 2, encode_angle_by_sincos: bool = False, cls_weight: float = 1.0,
                 loc_weight: float = 2.0, dir_weight: float = 0.2, code_weights: Optional[Sequence[float]] = None,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, score_threshold: float = 0.1,
                 nms_threshold: float = 0.01, nms_pre_max: Optional[int] = 4096, nms_post_max: Optional[int] = 500,
                 multi_class_nms: bool = False):
        super().__init__()
        in_channels = _pos_int(in_channels, "in_channels")
        self.class_names = _check_class_names(class_names)
        self.point_range, self.voxel_size = _check_geometry(point_range, voxel_size)
        self.feature_map_size = _map_size(feature_map_size)
        self.num_classes = len(self.class_names)
        self.coder = ResidualCoder(encode_angle_by_sincos)
        self.code_size = self.coder.code_size
        self.use_direction_classifier = bool(use_direction_classifier)
        self.num_dir_bins = _pos_int(num_dir_bins, "num_dir_bins")
        self.dir_offset, self.dir_limit_offset = float(dir_offset), float(dir_limit_offset)
        self.cls_weight, self.loc_weight, self.dir_weight = float(cls_weight), float(loc_weight), float(dir_weight)
        cw = (1.0,) * self.code_size if code_weights is None else _floats(code_weights, self.code_size, "code_weights")
        self.register_buffer("code_weights", torch.tensor(cw), persistent=False)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
        if not 0.0 <= float(nms_threshold) <= 1.0:
            raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold!r}")
        self.score_threshold, self.nms_threshold = float(score_threshold), float(nms_threshold)
        self.nms_pre_max = _opt_pos_int(nms_pre_max, "nms_pre_max")
        self.nms_post_max = _opt_pos_int(nms_post_max, "nms_post_max")
        self.multi_class_nms = bool(multi_class_nms)

        cfg = self._anchor_config(anchor_config)
        self.matched_thresholds = tuple(float(cfg[c]["matched_threshold"]) for c in self.class_names)
        self.unmatched_thresholds = tuple(float(cfg[c]["unmatched_threshold"]) for c in self.class_names)
        anchors, slices = self._generate_anchors(cfg, bool(align_center))
        self.class_slices = tuple(slices)  # [a0, a1) of each class among the A anchors of a cell
        self.num_anchors_per_location = anchors.shape[2]
        self.register_buffer("anchors", anchors.reshape(-1, 7), persistent=False)  # [Y * X * A, 7]
        a = self.num_anchors_per_location
        self.conv_cls = torch.nn.Conv2d(in_channels, a * self.num_classes, 1)
        self.conv_box = torch.nn.Conv2d(in_channels, a * self.code_size, 1)
        self.conv_dir_cls = torch.nn.Conv2d(in_channels, a * self.num_dir_bins, 1) \
            if self.use_direction_classifier else None
        self.in_channels = int(in_channels)
        pi = 0.01
        torch.nn.init.constant_(self.conv_cls.bias, -math.log((1 - pi) / pi))
        torch.nn.init.normal_(self.conv_box.weight, mean=0, std=0.001)

    # ------------------------------------------------------------------ anchors
    def _anchor_config(self, anchor_config) -> Dict[str, Dict[str, object]]:
        anchor_config = {} if anchor_config is None else dict(anchor_config)
        unknown = set(anchor_config) - set(self.class_names)
        if unknown:
            raise ValueError(f"anchor_config has classes {sorted(unknown)} not in class_names {self.class_names}")
        keys = ("sizes", "rotations", "bottom_heights", "matched_threshold", "unmatched_threshold")
        out = {}
        for c in self.class_names:
            entry = dict(DEFAULT_ANCHOR_CONFIG.get(c, {}))
            extra = set(anchor_config.get(c, {})) - set(keys)
            if extra:
                raise ValueError(f"anchor_config[{c!r}] has unknown keys {sorted(extra)}; allowed: {keys}")
            entry.update(anchor_config.get(c, {}))
            missing = [k for k in keys if k not in entry]
            if missing:
                raise ValueError(f"anchor_config[{c!r}] needs {missing} (no default anchors for class {c!r})")
            sizes = [_floats(s, 3, f"anchor_config[{c!r}]['sizes'] entries") for s in entry["sizes"]]
            if not sizes or min(min(s) for s in sizes) <= 0:
                raise ValueError(f"anchor_config[{c!r}]['sizes'] must be positive (dx, dy, dz) triples, "
                                 f"got {entry['sizes']!r}")
            rots = _floats(entry["rotations"], None, f"anchor_config[{c!r}]['rotations']")
            heights = _floats(entry["bottom_heights"], None, f"anchor_config[{c!r}]['bottom_heights']")
            if not rots or not heights:
                raise ValueError(f"anchor_config[{c!r}]: rotations and bottom_heights must be non-empty")
            m, u = float(entry["matched_threshold"]), float(entry["unmatched_threshold"])
            if not 0 <= u <= m <= 1:
                raise ValueError(f"anchor_config[{c!r}]: need 0 <= unmatched_threshold <= matched_threshold <= 1, "
                                 f"got {u} and {m}")
            out[c] = {"sizes": sizes, "rotations": rots, "bottom_heights": heights, "matched_threshold": m,
                      "unmatched_threshold": u}
        return out

    def _generate_anchors(self, cfg, align_center: bool) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        nx, ny = self.feature_map_size
        pr = self.point_range

        def shifts(lo, hi, n):
            if align_center or n == 1:
                step = (hi - lo) / n
                return lo + step / 2 + step * torch.arange(n, dtype=torch.float64)
            return lo + (hi - lo) / (n - 1) * torch.arange(n, dtype=torch.float64)

        xs, ys = shifts(pr[0], pr[3], nx), shifts(pr[1], pr[4], ny)
        per_cell, slices = [], []
        for c in self.class_names:
            start = len(per_cell)
            for h in cfg[c]["bottom_heights"]:
                for (dx, dy, dz) in cfg[c]["sizes"]:
                    for r in cfg[c]["rotations"]:
                        per_cell.append((h + dz / 2, dx, dy, dz, r))
            slices.append((start, len(per_cell)))
        cell = torch.tensor(per_cell, dtype=torch.float64)  # [A, 5]
        a = cell.shape[0]
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [Y, X]
        anchors = torch.cat([xx[:, :, None, None].expand(ny, nx, a, 1), yy[:, :, None, None].expand(ny, nx, a, 1),
                             cell[None, None].expand(ny, nx, a, 5)], -1)
        return anchors.float(), slices

    # ------------------------------------------------------------------ network
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Raw predictions on a BEV map ``x`` ``[B, C, Y, X]`` (see the class docstring)."""
        _check_bev(x, self.in_channels, self.feature_map_size, type(self).__name__)
        b = x.shape[0]

        def flat(t, k):
            return t.permute(0, 2, 3, 1).reshape(b, -1, k)

        out = {"cls_preds": flat(self.conv_cls(x), self.num_classes),
               "box_preds": flat(self.conv_box(x), self.code_size)}
        if self.conv_dir_cls is not None:
            out["dir_preds"] = flat(self.conv_dir_cls(x), self.num_dir_bins)
        return out

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def assign_targets(self, gt_boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Anchor targets for ``gt_boxes`` ``[B, M, 8]`` (label column 1-based, 0 = padding).

        Returns:
            dict: ``labels`` int64 ``[B, N]`` (-1 ignored, 0 background, ``c`` class ``c``),
            ``reg_targets`` ``[B, N, code_size]`` (0 off the positives), ``gt_index`` int64 ``[B, N]``
            (the matched box, -1 for none), ``gt_yaw`` ``[B, N]`` (its yaw, 0 for none).

        Example:
            >>> t = head.assign_targets(batch["gt_boxes"])
            >>> (t["labels"] > 0).sum()                             # positive anchors
        """
        _gt_check(gt_boxes)
        bsz, n = gt_boxes.shape[0], self.anchors.shape[0]
        anchors = self.anchors.to(gt_boxes.dtype)
        a_all = self.num_anchors_per_location
        labels = torch.full((bsz, n), -1, dtype=torch.long, device=gt_boxes.device)
        gt_index = torch.full((bsz, n), -1, dtype=torch.long, device=gt_boxes.device)
        reg = gt_boxes.new_zeros(bsz, n, self.code_size)
        gt_yaw = gt_boxes.new_zeros(bsz, n)
        cells = torch.arange(n // a_all, device=gt_boxes.device)
        for b in range(bsz):
            gt = gt_boxes[b]
            gl = gt[:, 7].round().long()
            for ci, (a0, a1) in enumerate(self.class_slices):
                idx = (cells[:, None] * a_all + torch.arange(a0, a1, device=gt.device)[None]).reshape(-1)
                sel = (gl == ci + 1).nonzero()[:, 0]
                if sel.numel() == 0:
                    labels[b, idx] = 0
                    continue
                iou = boxes_iou_bev(anchors[idx], gt[sel, :7])  # [Na, Mc]
                a2g_max, a2g_arg = iou.max(1)
                g2a_max = iou.max(0).values
                g2a_max = torch.where(g2a_max == 0, torch.full_like(g2a_max, -1.0), g2a_max)
                forced = (iou == g2a_max[None]).any(1)
                pos = (a2g_max >= self.matched_thresholds[ci]) | forced
                neg = (a2g_max < self.unmatched_thresholds[ci]) & ~forced
                lab = torch.full_like(a2g_arg, -1)
                lab[neg] = 0
                lab[pos] = ci + 1
                labels[b, idx] = lab
                pidx = idx[pos]
                matched = sel[a2g_arg[pos]]
                gt_index[b, pidx] = matched
                gt_yaw[b, pidx] = gt[matched, 6]
                reg[b, pidx] = self.coder.encode(gt[matched, :7], anchors[pidx])
        return {"labels": labels, "reg_targets": reg, "gt_index": gt_index, "gt_yaw": gt_yaw}

    def direction_targets(self, gt_yaw: torch.Tensor) -> torch.Tensor:
        """Direction bin ``floor(limit_period(yaw - dir_offset, 0, 2 pi) / (2 pi / bins))`` of yaws."""
        period = 2 * math.pi / self.num_dir_bins
        rot = limit_period(gt_yaw - self.dir_offset, 0.0, 2 * math.pi)
        return torch.floor(rot / period).long().clamp(0, self.num_dir_bins - 1)

    # ------------------------------------------------------------------ loss
    def loss(self, preds: Dict[str, torch.Tensor],
             gt_boxes: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Training loss of raw ``preds`` (from :meth:`forward`) against ``gt_boxes`` ``[B, M, 8]``.

        Returns:
            ``(loss, terms)``: the weighted sum (scalar) and the detached terms ``loss_cls``,
            ``loss_box``, ``loss_dir``.
        """
        cls_preds, box_preds = preds["cls_preds"], preds["box_preds"]
        bsz = cls_preds.shape[0]
        _gt_check(gt_boxes, bsz)
        t = self.assign_targets(gt_boxes.to(box_preds.device, torch.float32))
        labels = t["labels"]
        positives, negatives = labels > 0, labels == 0
        pos_norm = positives.sum(1, keepdim=True).float().clamp_min(1.0)
        cls_w = (positives | negatives).float() / pos_norm
        onehot = F.one_hot(labels.clamp_min(0), self.num_classes + 1)[..., 1:].to(cls_preds.dtype)
        loss_cls = (sigmoid_focal_loss(cls_preds, onehot, self.focal_alpha, self.focal_gamma)
                    * cls_w[..., None]).sum() / bsz * self.cls_weight

        reg_w = positives.float() / pos_norm
        target = t["reg_targets"].to(box_preds.dtype)
        pred = box_preds
        if not self.coder.encode_angle_by_sincos:  # sin(a - b) = sin a cos b - cos a sin b
            p6, t6 = pred[..., 6:7], target[..., 6:7]
            pred = torch.cat([pred[..., :6], torch.sin(p6) * torch.cos(t6)], -1)
            target = torch.cat([target[..., :6], torch.cos(p6) * torch.sin(t6)], -1)
        diff = torch.where(positives[..., None], pred - target, torch.zeros_like(pred))
        loss_box = (smooth_l1(diff) * self.code_weights * reg_w[..., None]).sum() / bsz * self.loc_weight
        terms = {"loss_cls": loss_cls, "loss_box": loss_box}
        total = loss_cls + loss_box
        if self.conv_dir_cls is not None:
            dir_t = self.direction_targets(t["gt_yaw"])
            ce = F.cross_entropy(preds["dir_preds"].reshape(-1, self.num_dir_bins), dir_t.reshape(-1),
                                 reduction="none").reshape(bsz, -1)
            loss_dir = (ce * reg_w).sum() / bsz * self.dir_weight
            terms["loss_dir"] = loss_dir
            total = total + loss_dir
        return total, {k: v.detach() for k, v in terms.items()}

    # ------------------------------------------------------------------ inference
    def decode(self, preds: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B, N, num_classes]`` (sigmoid) and boxes ``[B, N, 7]`` (heading from the direction bin,
        wrapped to ``[-pi, pi)``) of raw ``preds``."""
        boxes = self.coder.decode(preds["box_preds"], self.anchors.to(preds["box_preds"].dtype)[None])
        if "dir_preds" in preds:
            period = 2 * math.pi / self.num_dir_bins
            dir_labels = preds["dir_preds"].argmax(-1)
            rot = limit_period(boxes[..., 6] - self.dir_offset, self.dir_limit_offset, period)
            yaw = rot + self.dir_offset + period * dir_labels.to(boxes.dtype)
            boxes = torch.cat([boxes[..., :6], limit_period(yaw)[..., None]], -1)
        else:
            boxes = torch.cat([boxes[..., :6], limit_period(boxes[..., 6:7])], -1)
        return torch.sigmoid(preds["cls_preds"]), boxes

    @torch.no_grad()
    def predict(self, preds: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Detections per sample: dicts with ``boxes`` float32 ``[K, 7]``, ``scores`` float32 ``[K]``,
        ``labels`` int64 ``[K]`` (1-based), sorted by descending score."""
        scores, boxes = self.decode(preds)
        out = []
        for s, bx in zip(scores, boxes):
            if self.multi_class_nms:
                a_idx, c_idx = (s >= self.score_threshold).nonzero(as_tuple=True)
                sc, lab, bb = s[a_idx, c_idx], c_idx + 1, bx[a_idx]
                keep = batched_rotated_nms(bb, sc, lab, self.nms_threshold, self.nms_pre_max, self.nms_post_max)
                keep = keep[: self.nms_post_max] if self.nms_post_max else keep
            else:
                sc, lab = s.max(-1)
                m = sc >= self.score_threshold
                sc, lab, bb = sc[m], lab[m] + 1, bx[m]
                keep = rotated_nms(bb, sc, self.nms_threshold, self.nms_pre_max, self.nms_post_max)
            out.append({"boxes": bb[keep].float(), "scores": sc[keep].float(), "labels": lab[keep].long()})
        return out
