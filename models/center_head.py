"""CenterPoint's detection head (OpenPCDet ``CenterHead``) and an attention-refined variant.

* :class:`CenterHead`: class heatmaps with Gaussian targets at the box centres (Gaussian focal loss) and
  regression maps (centre offset in the cell, z, log size, cos / sin yaw; L1 at the centre cells);
  inference takes the top-K heatmap peaks (after a 3x3 max-pool NMS) and runs rotated or circle NMS.
* :class:`CenterHeadAttn`: the same, then the top-K candidates attend to each other and to the BEV
  features around them and predict a score refinement and a box residual.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .anchor_head import (_check_bev, _check_class_names, _check_geometry, _floats, _gt_check, _map_size,
                          _opt_pos_int, _pos_int, smooth_l1)
from .box_coder import ResidualCoder, center_cell, decode_center_boxes, encode_center_targets
from .nms import batched_circle_nms, batched_rotated_nms, circle_nms, pairwise_distance, rotated_nms

__all__ = ["CenterHead", "CenterHeadAttn", "gaussian_radius", "draw_heatmaps", "gaussian_focal_loss"]


def gaussian_radius(dx: torch.Tensor, dy: torch.Tensor, min_overlap: float = 0.5) -> torch.Tensor:
    """CenterNet / CenterPoint ``gaussian_radius``: the smallest of the three radii at which a corner
    shift keeps an IoU of ``min_overlap`` with a ``dx`` x ``dy`` box (sizes in cells).

    Example:
        >>> round(gaussian_radius(torch.tensor([10.0]), torch.tensor([10.0]), 0.1).item(), 3)
        4.325
    """
    h, w = dx, dy
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def draw_heatmaps(cells: torch.Tensor, radius: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  map_size: Tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CenterPoint's Gaussian heatmap ``[num_classes, Y, X]``: per box ``exp(-(di^2 + dj^2) / (2 sigma^2))``
    on the ``(2 r + 1)^2`` window around its cell, ``sigma = (2 r + 1) / 6``, the max where boxes overlap
    (``draw_umich_gaussian``).

    Args:
        cells: int ``[M, 2]`` centre cells ``(i, j)`` along x and y.
        radius: int ``[M]`` radii in cells (``>= 0``).
        labels: int ``[M]`` 0-based class of each box.
        num_classes: ``C``.
        map_size: ``(X, Y)``.

    Example:
        >>> hm = draw_heatmaps(torch.tensor([[2, 1]]), torch.tensor([2]), torch.tensor([0]), 1, (5, 4))
        >>> hm[0, 1, 2].item(), hm.shape
        (1.0, torch.Size([1, 4, 5]))
    """
    nx, ny = map_size
    device = cells.device
    hm = torch.zeros(num_classes, ny, nx, dtype=dtype, device=device)
    if cells.shape[0] == 0:
        return hm
    ii = torch.arange(nx, device=device, dtype=dtype)
    jj = torch.arange(ny, device=device, dtype=dtype)
    di = ii[None, :] - cells[:, 0:1].to(dtype)  # [M, X]
    dj = jj[None, :] - cells[:, 1:2].to(dtype)  # [M, Y]
    r = radius.to(dtype)[:, None]
    sigma = (2 * r + 1) / 6
    gx = torch.where(di.abs() <= r, torch.exp(-di * di / (2 * sigma * sigma)), torch.zeros_like(di))
    gy = torch.where(dj.abs() <= r, torch.exp(-dj * dj / (2 * sigma * sigma)), torch.zeros_like(dj))
    g = gy[:, :, None] * gx[:, None, :]  # [M, Y, X]
    for c in labels.unique().tolist():
        hm[c] = g[labels == c].amax(0)
    return hm


def gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's focal loss on heatmaps (OpenPCDet ``FocalLossCenterNet``), a scalar.

    With ``p = clamp(sigmoid(logits), 1e-4, 1 - 1e-4)``: ``-(sum_{t=1} log p (1-p)^2 + sum_{t<1} log(1-p) p^2
    (1-t)^4) / max(#{t = 1}, 1)`` (not divided when there is no peak, as OpenPCDet).

    Example:
        >>> round(gaussian_focal_loss(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)).item(), 6)  # -log(.5) / 4
        0.173287
    """
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).to(p.dtype)
    neg = 1 - pos
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * (1 - target).pow(4) * neg).sum()
    num_pos = pos.sum()
    return -(pos_loss + neg_loss) / num_pos.clamp_min(1)


def _conv_bn(cin: int, cout: int) -> List[torch.nn.Module]:
    return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]


class _SeparateHead(torch.nn.Module):
    """OpenPCDet ``SeparateHead``: per output, ``num_conv - 1`` conv-BN-ReLU then a 3x3 conv."""

    def __init__(self, channels: int, outputs: Mapping[str, int], num_conv: int):
        super().__init__()
        self.names = tuple(outputs)
        for name, out in outputs.items():
            layers = []
            for _ in range(num_conv - 1):
                layers += _conv_bn(channels, channels)
            layers.append(torch.nn.Conv2d(channels, out, 3, padding=1, bias=True))
            seq = torch.nn.Sequential(*layers)
            if name == "hm":
                torch.nn.init.constant_(seq[-1].bias, -2.19)
            else:
                for m in seq.modules():
                    if isinstance(m, torch.nn.Conv2d):
                        torch.nn.init.kaiming_normal_(m.weight)
                        if m.bias is not None:
                            torch.nn.init.zeros_(m.bias)
            self.add_module(name, seq)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name in self.names}


class CenterHead(torch.nn.Module):
    """CenterPoint's head with one heatmap per class (OpenPCDet ``CenterHead``, one head for all classes).

    Network: a shared ``3x3 conv - BN - ReLU`` (``shared_channels``), then per output (``hm``: one channel
    per class, ``center`` 2, ``center_z`` 1, ``dim`` 3, ``rot`` 2) ``num_head_convs - 1`` conv-BN-ReLU layers
    and a 3x3 conv (``hm`` bias -2.19).

    Targets (OpenPCDet ``assign_target_of_single_head``): a box whose centre lies in the x-y range is put in
    the cell of its centre (:func:`~.box_coder.center_cell`); its Gaussian (:func:`draw_heatmaps`) has the
    radius ``max(int(gaussian_radius(dx / cell_x, dy / cell_y, gaussian_overlap)), min_radius)`` and peak 1
    at that cell; the regression targets are :func:`~.box_coder.encode_center_targets` (offset, z, log size,
    cos, sin). Losses: :func:`gaussian_focal_loss` times ``cls_weight``; L1 at the centre cells, per code
    summed over the boxes and divided by their number, times ``code_weights``, summed, times ``loc_weight``.

    Inference: sigmoid heatmap, 3x3 max-pool NMS (non-peaks zeroed), the ``top_k`` best (class, cell) pairs
    per sample, boxes :func:`~.box_coder.decode_center_boxes`, scores ``> score_threshold``, centres within
    ``post_center_range``, then ``nms_type``: ``"rotated"`` (IoU ``> nms_threshold``), ``"circle"`` (centres
    within ``circle_radius`` metres, a float or a ``{label: radius}`` map) or ``"none"``; class-agnostic or
    per class (``class_agnostic_nms``); at most ``max_detections``.

    Args:
        in_channels: channels of the BEV map.
        class_names: class names (labels 1-based into it).
        point_range, voxel_size: the voxel grid's geometry.
        feature_map_size: BEV map size ``(X, Y)`` in cells.
        feature_map_stride: BEV cell size in voxels (8 after SECOND's backbone).
        shared_channels, num_head_convs: widths and depth of the network.
        gaussian_overlap, min_radius: heatmap target parameters.
        max_objs: most boxes per sample used as targets.
        cls_weight, loc_weight, code_weights: loss weights.
        top_k, score_threshold, post_center_range, nms_type, nms_threshold, nms_pre_max, nms_post_max,
        circle_radius, class_agnostic_nms, max_detections: post-processing.

    Shape:
        ``forward(x [B, C, Y, X])`` -> dict of maps ``hm [B, num_classes, Y, X]``, ``center [B, 2, Y, X]``,
        ``center_z [B, 1, Y, X]``, ``dim [B, 3, Y, X]``, ``rot [B, 2, Y, X]``, ``features`` (the shared conv's
        output).

    Example:
        >>> head = CenterHead(64, ("Car", "Pedestrian"), (0, -20, -3, 32, 20, 1), (0.2, 0.2, 0.1), (20, 25))
        >>> preds = head(torch.randn(2, 64, 25, 20))
        >>> loss, terms = head.loss(preds, gt_boxes)        # gt_boxes [2, M, 8]
        >>> dets = head.predict(preds)
    """

    def __init__(self, in_channels: int, class_names: Sequence[str], point_range: Sequence[float],
                 voxel_size: Sequence[float], feature_map_size: Sequence[int], feature_map_stride: int = 8,
                 shared_channels: int = 64, num_head_convs: int = 2, gaussian_overlap: float = 0.1,
                 min_radius: int = 2, max_objs: int = 500, cls_weight: float = 1.0, loc_weight: float = 2.0,
                 code_weights: Optional[Sequence[float]] = None, top_k: int = 500, score_threshold: float = 0.1,
                 post_center_range: Optional[Sequence[float]] = None, nms_type: str = "rotated",
                 nms_threshold: float = 0.01, nms_pre_max: Optional[int] = 4096, nms_post_max: Optional[int] = 500,
                 circle_radius: Union[float, Mapping[int, float], None] = None, class_agnostic_nms: bool = True,
                 max_detections: Optional[int] = 500):
        super().__init__()
        self.in_channels = _pos_int(in_channels, "in_channels")
        self.class_names = _check_class_names(class_names)
        self.num_classes = len(self.class_names)
        self.point_range, self.voxel_size = _check_geometry(point_range, voxel_size)
        self.feature_map_size = _map_size(feature_map_size)
        self.feature_map_stride = _pos_int(feature_map_stride, "feature_map_stride")
        self.shared_channels = _pos_int(shared_channels, "shared_channels")
        num_head_convs = _pos_int(num_head_convs, "num_head_convs")
        if not 0 < float(gaussian_overlap) < 1:
            raise ValueError(f"gaussian_overlap must be in (0, 1), got {gaussian_overlap!r}")
        self.gaussian_overlap = float(gaussian_overlap)
        self.min_radius = _pos_int(min_radius, "min_radius", 0)
        self.max_objs = _pos_int(max_objs, "max_objs")
        self.cls_weight, self.loc_weight = float(cls_weight), float(loc_weight)
        cw = (1.0,) * 8 if code_weights is None else _floats(code_weights, 8, "code_weights")
        self.register_buffer("code_weights", torch.tensor(cw), persistent=False)
        self.top_k = _pos_int(top_k, "top_k")
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
        self.score_threshold = float(score_threshold)
        self.post_center_range = None if post_center_range is None else \
            _floats(post_center_range, 6, "post_center_range")
        if nms_type not in ("rotated", "circle", "none"):
            raise ValueError(f"nms_type must be 'rotated', 'circle' or 'none', got {nms_type!r}")
        if not 0.0 <= float(nms_threshold) <= 1.0:
            raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold!r}")
        if nms_type == "circle":
            if circle_radius is None:
                raise ValueError("circle_radius is required with nms_type='circle'")
            if isinstance(circle_radius, Mapping) and class_agnostic_nms:
                raise ValueError("a per-label circle_radius needs class_agnostic_nms=False")
        self.nms_type, self.nms_threshold = nms_type, float(nms_threshold)
        self.nms_pre_max, self.nms_post_max = _opt_pos_int(nms_pre_max, "nms_pre_max"), \
            _opt_pos_int(nms_post_max, "nms_post_max")
        self.circle_radius = circle_radius
        self.class_agnostic_nms = bool(class_agnostic_nms)
        self.max_detections = _opt_pos_int(max_detections, "max_detections")

        self.shared_conv = torch.nn.Sequential(
            torch.nn.Conv2d(self.in_channels, self.shared_channels, 3, padding=1, bias=True),
            torch.nn.BatchNorm2d(self.shared_channels), torch.nn.ReLU())
        self.heads = _SeparateHead(self.shared_channels, {"hm": self.num_classes, "center": 2, "center_z": 1,
                                                          "dim": 3, "rot": 2}, num_head_convs)

    # ------------------------------------------------------------------ network
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Raw prediction maps of a BEV map ``x`` ``[B, C, Y, X]``."""
        _check_bev(x, self.in_channels, self.feature_map_size, type(self).__name__)
        feats = self.shared_conv(x)
        out = self.heads(feats)
        out["features"] = feats
        return out

    @staticmethod
    def box_codes(preds: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The regression maps stacked as ``[B, 8, Y, X]`` codes (offset, z, log size, cos, sin)."""
        return torch.cat([preds["center"], preds["center_z"], preds["dim"], preds["rot"]], 1)

    # ------------------------------------------------------------------ targets
    def _geometry(self):
        return self.point_range, self.voxel_size, self.feature_map_stride

    @torch.no_grad()
    def assign_targets(self, gt_boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Heatmap and regression targets of ``gt_boxes`` ``[B, M, 8]`` (label 1-based, 0 = padding).

        Returns:
            dict: ``heatmap`` ``[B, C, Y, X]``, ``index`` int64 ``[B, M']`` (flat cell ``j * X + i``),
            ``mask`` bool ``[B, M']`` (a real target), ``target`` ``[B, M', 8]`` with ``M' = min(M, max_objs)``.

        Example:
            >>> t = head.assign_targets(batch["gt_boxes"])
            >>> t["heatmap"].amax()            # 1 where a box has its centre
        """
        _gt_check(gt_boxes)
        bsz = gt_boxes.shape[0]
        m = min(gt_boxes.shape[1], self.max_objs)
        nx, ny = self.feature_map_size
        pr, vs, stride = self._geometry()
        dev, dt = gt_boxes.device, gt_boxes.dtype
        heat = torch.zeros(bsz, self.num_classes, ny, nx, dtype=dt, device=dev)
        index = torch.zeros(bsz, m, dtype=torch.long, device=dev)
        mask = torch.zeros(bsz, m, dtype=torch.bool, device=dev)
        target = torch.zeros(bsz, m, 8, dtype=dt, device=dev)
        for b in range(bsz):
            gt = gt_boxes[b, :m]
            lab = gt[:, 7].round().long()
            valid = (lab >= 1) & (lab <= self.num_classes) & (gt[:, 3] > 0) & (gt[:, 4] > 0) \
                & (gt[:, 0] >= pr[0]) & (gt[:, 0] <= pr[3]) & (gt[:, 1] >= pr[1]) & (gt[:, 1] <= pr[4])
            _, cells = center_cell(gt, pr, vs, stride, self.feature_map_size)
            radius = gaussian_radius(gt[:, 3] / (vs[0] * stride), gt[:, 4] / (vs[1] * stride), self.gaussian_overlap)
            radius = radius.clamp_min(0).floor().long().clamp_min(self.min_radius)
            v = valid.nonzero()[:, 0]
            heat[b] = draw_heatmaps(cells[v], radius[v], lab[v] - 1, self.num_classes, self.feature_map_size, dt)
            index[b] = cells[:, 1] * nx + cells[:, 0]
            mask[b] = valid
            target[b] = encode_center_targets(gt, cells, pr, vs, stride)
        target = torch.where(mask[..., None], target, torch.zeros_like(target))
        index = torch.where(mask, index, torch.zeros_like(index))
        return {"heatmap": heat, "index": index, "mask": mask, "target": target}

    # ------------------------------------------------------------------ loss
    def loss(self, preds: Dict[str, torch.Tensor],
             gt_boxes: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Training loss against ``gt_boxes`` ``[B, M, 8]``: ``(loss, terms)`` with terms ``loss_hm``, ``loss_loc``."""
        hm = preds["hm"]
        _gt_check(gt_boxes, hm.shape[0])
        t = self.assign_targets(gt_boxes.to(hm.device, torch.float32))
        loss_hm = gaussian_focal_loss(hm, t["heatmap"].to(hm.dtype)) * self.cls_weight
        codes = self.box_codes(preds).flatten(2)  # [B, 8, Y * X]
        pred = codes.gather(2, t["index"][:, None, :].expand(-1, 8, -1)).transpose(1, 2)  # [B, M, 8]
        mask = t["mask"]
        l1 = torch.where(mask[..., None], (pred - t["target"].to(pred.dtype)).abs(), torch.zeros_like(pred))
        per_code = l1.sum((0, 1)) / mask.sum().clamp_min(1).to(pred.dtype)
        loss_loc = (per_code * self.code_weights).sum() * self.loc_weight
        return loss_hm + loss_loc, {"loss_hm": loss_hm.detach(), "loss_loc": loss_loc.detach()}

    # ------------------------------------------------------------------ inference
    def topk_candidates(self, preds: Dict[str, torch.Tensor], k: int) -> Dict[str, torch.Tensor]:
        """The ``k`` best heatmap peaks per sample (3x3 max-pool NMS on the sigmoid heatmap).

        Returns:
            dict: ``scores`` ``[B, k]`` (sigmoid), ``logits`` ``[B, k]``, ``labels`` int64 ``[B, k]``
            (1-based), ``cells`` int64 ``[B, k, 2]`` ``(i, j)``, ``pix`` int64 ``[B, k]`` (``j * X + i``),
            ``boxes`` ``[B, k, 7]``.
        """
        hm = preds["hm"]
        bsz, c, ny, nx = hm.shape
        heat = torch.sigmoid(hm)
        peak = F.max_pool2d(heat, 3, stride=1, padding=1) == heat
        heat = torch.where(peak, heat, torch.zeros_like(heat))
        k = min(k, c * ny * nx)
        scores, idx = heat.flatten(1).topk(k, dim=1)
        logits = hm.flatten(1).gather(1, idx)
        labels = idx // (ny * nx) + 1
        pix = idx % (ny * nx)
        cells = torch.stack([pix % nx, pix // nx], -1)
        codes = self.box_codes(preds).flatten(2).gather(2, pix[:, None, :].expand(-1, 8, -1)).transpose(1, 2)
        boxes = decode_center_boxes(codes, cells, *self._geometry())
        return {"scores": scores, "logits": logits, "labels": labels, "cells": cells, "pix": pix, "boxes": boxes}

    def postprocess(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Score threshold, centre range, NMS and sorting of one sample's candidates ``[K, 7]``, ``[K]``, ``[K]``."""
        keep = scores > self.score_threshold
        if self.post_center_range is not None:
            r = boxes.new_tensor(self.post_center_range)
            keep &= ((boxes[:, :3] >= r[:3]) & (boxes[:, :3] <= r[3:])).all(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.nms_type == "rotated":
            keep = rotated_nms(boxes, scores, self.nms_threshold, self.nms_pre_max, self.nms_post_max) \
                if self.class_agnostic_nms else \
                batched_rotated_nms(boxes, scores, labels, self.nms_threshold, self.nms_pre_max, self.nms_post_max)
        elif self.nms_type == "circle":
            keep = circle_nms(boxes, scores, float(self.circle_radius), self.nms_post_max) \
                if self.class_agnostic_nms else \
                batched_circle_nms(boxes, scores, labels, self.circle_radius, self.nms_post_max)
        else:
            keep = torch.sort(scores, descending=True, stable=True).indices
        if self.max_detections is not None:
            keep = keep[: self.max_detections]
        return {"boxes": boxes[keep].float(), "scores": scores[keep].float(), "labels": labels[keep].long()}

    @torch.no_grad()
    def predict(self, preds: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Detections per sample (``boxes`` float32 ``[K, 7]``, ``scores`` float32 ``[K]``, ``labels`` int64
        ``[K]`` 1-based), sorted by descending score."""
        cand = self.topk_candidates(preds, self.top_k)
        return [self.postprocess(cand["boxes"][b], cand["scores"][b], cand["labels"][b])
                for b in range(cand["boxes"].shape[0])]


class _RefineLayer(torch.nn.Module):
    """Pre-norm transformer layer: self-attention among candidates, cross-attention to BEV windows, FFN."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim) for _ in range(3))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj1 = torch.nn.Linear(dim, dim)
        self.q2 = torch.nn.Linear(dim, dim)
        self.kv2 = torch.nn.Linear(dim, 2 * dim)
        self.proj2 = torch.nn.Linear(dim, dim)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.ReLU(), torch.nn.Linear(2 * dim, dim))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, H, L, D / H]
        n, l, d = t.shape
        return t.reshape(n, l, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        n, h, l, e = t.shape
        return t.transpose(1, 2).reshape(n, l, h * e)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, window: torch.Tensor,
                window_pos: torch.Tensor) -> torch.Tensor:
        # tokens, pos: [B, K, D]; window, window_pos: [B * K, W, D]
        b, k, d = tokens.shape
        h = self.norm1(tokens) + pos
        q, kk, v = self.qkv(h).chunk(3, -1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(kk), self._split(v))
        tokens = tokens + self.proj1(self._merge(a))
        q = self.q2(self.norm2(tokens) + pos).reshape(b * k, 1, d)
        kk, v = self.kv2(window + window_pos).chunk(2, -1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(kk), self._split(v))
        tokens = tokens + self.proj2(self._merge(a)).reshape(b, k, d)
        return tokens + self.ffn(self.norm3(tokens))


class CenterHeadAttn(CenterHead):
    """:class:`CenterHead` followed by an attention refinement of its top-K candidates.

    The ``refine_k`` best heatmap peaks per sample (as at inference, from the detached heatmap) become
    tokens: a linear map of the shared BEV feature at the candidate's cell, its class one-hot, its heatmap
    logit and its box codes, plus a positional encoding (a 2-layer MLP of the candidate centre normalized to
    the x-y range). ``refine_layers`` pre-norm layers each run multi-head self-attention among the K
    candidates (``torch.nn.functional.scaled_dot_product_attention``), cross-attention of each candidate to
    the ``refine_window`` x ``refine_window`` BEV features around its cell (zero beyond the map, with the
    cells' positional encodings) and an FFN. Linear heads predict a score refinement ``delta`` (the refined
    logit is the detached heatmap logit plus ``delta``) and a box residual (:class:`ResidualCoder` with
    sin / cos yaw, relative to the detached first-stage box). Both heads start at zero, so an untrained
    refinement returns the first stage's scores and boxes.

    Training: each candidate is matched to the nearest box of its class by BEV centre distance; within
    ``assign_radius`` metres it is positive (score target 1, box target the box's residual), else negative
    (score target 0, no box loss). Extra loss terms: binary cross entropy of the refined logits (mean over
    candidates) times ``refine_cls_weight``, and smooth L1 (beta 1/9) on the residuals of the positives,
    summed and divided by their number, times ``refine_box_weight``.

    Inference: the refined scores and boxes of the K candidates go through :meth:`CenterHead.postprocess`.

    Args:
        refine_k: candidates per sample.
        refine_dim, refine_heads, refine_layers: token width, attention heads (divides the width), layers.
        refine_window: odd window size in cells of the BEV cross-attention.
        assign_radius: matching distance in metres.
        refine_cls_weight, refine_box_weight: loss weights.
        **kwargs: :class:`CenterHead` arguments.

    Shape:
        ``forward(x [B, C, Y, X])`` -> the :class:`CenterHead` maps plus the candidates (``cand_*``, detached)
        and ``refine_logits`` ``[B, K]``, ``refine_deltas`` ``[B, K, 8]``.

    Example:
        >>> head = CenterHeadAttn(64, ("Car",), (0, -20, -3, 32, 20, 1), (0.2, 0.2, 0.1), (20, 25), refine_k=64)
        >>> preds = head(torch.randn(2, 64, 25, 20))
        >>> loss, terms = head.loss(preds, gt_boxes)
    """

    def __init__(self, *args, refine_k: int = 128, refine_dim: int = 64, refine_heads: int = 4,
                 refine_layers: int = 1, refine_window: int = 3, assign_radius: float = 2.0,
                 refine_cls_weight: float = 1.0, refine_box_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.refine_k = _pos_int(refine_k, "refine_k")
        dim = _pos_int(refine_dim, "refine_dim")
        heads = _pos_int(refine_heads, "refine_heads")
        if dim % heads:
            raise ValueError(f"refine_heads must divide refine_dim={dim}, got {refine_heads!r}")
        layers = _pos_int(refine_layers, "refine_layers", 0)
        self.refine_window = _pos_int(refine_window, "refine_window")
        if self.refine_window % 2 == 0:
            raise ValueError(f"refine_window must be odd, got {refine_window!r}")
        if not float(assign_radius) > 0:
            raise ValueError(f"assign_radius must be > 0 (metres), got {assign_radius!r}")
        self.assign_radius = float(assign_radius)
        self.refine_cls_weight, self.refine_box_weight = float(refine_cls_weight), float(refine_box_weight)
        self.refine_coder = ResidualCoder(encode_angle_by_sincos=True)
        c = self.shared_channels
        self.token_proj = torch.nn.Linear(c + self.num_classes + 1 + 8, dim)
        self.window_proj = torch.nn.Linear(c, dim)
        self.pos_mlp = torch.nn.Sequential(torch.nn.Linear(2, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))
        self.refine_layers = torch.nn.ModuleList(_RefineLayer(dim, heads) for _ in range(layers))
        self.refine_norm = torch.nn.LayerNorm(dim)
        self.score_delta = torch.nn.Linear(dim, 1)
        self.box_delta = torch.nn.Linear(dim, self.refine_coder.code_size)
        for lin in (self.score_delta, self.box_delta):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)

    def _normalize_xy(self, xy: torch.Tensor) -> torch.Tensor:
        pr = self.point_range
        lo, hi = xy.new_tensor(pr[:2]), xy.new_tensor(pr[3:5])
        return (xy - lo) / (hi - lo)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = super().forward(x)
        with torch.no_grad():
            cand = self.topk_candidates({k: v.detach() for k, v in out.items()}, self.refine_k)
        feats = out["features"]
        bsz, c, ny, nx = feats.shape
        k = cand["pix"].shape[1]
        flat = feats.flatten(2)  # [B, C, Y * X]
        center_feat = flat.gather(2, cand["pix"][:, None, :].expand(-1, c, -1)).transpose(1, 2)  # [B, K, C]
        codes = self.box_codes({n: out[n].detach() for n in ("center", "center_z", "dim", "rot")}).flatten(2)
        cand_codes = codes.gather(2, cand["pix"][:, None, :].expand(-1, 8, -1)).transpose(1, 2)
        onehot = F.one_hot(cand["labels"] - 1, self.num_classes).to(feats.dtype)
        tokens = self.token_proj(torch.cat([center_feat, onehot, cand["logits"][..., None], cand_codes], -1))
        pos = self.pos_mlp(self._normalize_xy(cand["boxes"][..., :2]))
        # the BEV window around each candidate's cell (zero features beyond the map)
        w, r = self.refine_window, self.refine_window // 2
        off = torch.arange(-r, r + 1, device=x.device)
        wi = cand["cells"][..., 0:1, None] + off[None, None, None, :]  # [B, K, 1, w] along x
        wj = cand["cells"][..., 1:2, None] + off[None, None, :, None]  # [B, K, w, 1] along y
        wi, wj = wi.expand(-1, -1, w, w).reshape(bsz, k * w * w), wj.expand(-1, -1, w, w).reshape(bsz, k * w * w)
        inside = (wi >= 0) & (wi < nx) & (wj >= 0) & (wj < ny)
        wpix = (wj.clamp(0, ny - 1) * nx + wi.clamp(0, nx - 1))
        wfeat = flat.gather(2, wpix[:, None, :].expand(-1, c, -1)).transpose(1, 2)  # [B, K * w * w, C]
        wfeat = torch.where(inside[..., None], wfeat, torch.zeros_like(wfeat))
        window = self.window_proj(wfeat).reshape(bsz * k, w * w, -1)
        pr = self.point_range
        cell_x = self.voxel_size[0] * self.feature_map_stride
        cell_y = self.voxel_size[1] * self.feature_map_stride
        wxy = torch.stack([pr[0] + (wi.to(feats.dtype) + 0.5) * cell_x,
                           pr[1] + (wj.to(feats.dtype) + 0.5) * cell_y], -1)  # window cell centres
        window_pos = self.pos_mlp(self._normalize_xy(wxy)).reshape(bsz * k, w * w, -1)
        for layer in self.refine_layers:
            tokens = layer(tokens, pos, window, window_pos)
        tokens = self.refine_norm(tokens)
        out.update({f"cand_{n}": v for n, v in cand.items()})
        out["refine_logits"] = cand["logits"] + self.score_delta(tokens)[..., 0]
        out["refine_deltas"] = self.box_delta(tokens)
        return out

    @torch.no_grad()
    def assign_candidates(self, boxes: torch.Tensor, labels: torch.Tensor,
                          gt_boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest box of the same class within ``assign_radius`` of each candidate.

        Args:
            boxes: ``[B, K, 7]`` candidate boxes; labels: int64 ``[B, K]`` (1-based).
            gt_boxes: ``[B, M, 8]``.

        Returns:
            ``(positive bool [B, K], matched box [B, K, 7])`` (the matched box is 0 for negatives).
        """
        gt = gt_boxes.to(boxes.dtype)
        if gt.shape[1] == 0:
            return torch.zeros_like(labels, dtype=torch.bool), torch.zeros_like(boxes)
        d = pairwise_distance(boxes[..., :2], gt[..., :2])  # [B, K, M]
        same = labels[..., None] == gt[..., 7].round().long()[:, None, :]  # padding rows have label 0: never
        d = torch.where(same, d, torch.full_like(d, float("inf")))
        dmin, arg = d.min(2)
        positive = dmin <= self.assign_radius
        matched = gt[..., :7].gather(1, arg[..., None].expand(-1, -1, 7))
        return positive, torch.where(positive[..., None], matched, torch.zeros_like(matched))

    def loss(self, preds: Dict[str, torch.Tensor],
             gt_boxes: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """:class:`CenterHead` loss plus ``loss_refine_cls`` and ``loss_refine_box``."""
        total, terms = super().loss(preds, gt_boxes)
        base = preds["cand_boxes"]
        positive, matched = self.assign_candidates(base, preds["cand_labels"], gt_boxes.to(base.device))
        logits = preds["refine_logits"]
        loss_cls = F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype)) * self.refine_cls_weight
        target = self.refine_coder.encode(torch.where(positive[..., None], matched, base), base)
        diff = torch.where(positive[..., None], preds["refine_deltas"] - target, torch.zeros_like(target))
        loss_box = smooth_l1(diff).sum() / positive.sum().clamp_min(1).to(diff.dtype) * self.refine_box_weight
        terms.update({"loss_refine_cls": loss_cls.detach(), "loss_refine_box": loss_box.detach()})
        return total + loss_cls + loss_box, terms

    @torch.no_grad()
    def refined_candidates(self, preds: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Refined ``(boxes [B, K, 7], scores [B, K], labels [B, K])`` of the candidates."""
        boxes = self.refine_coder.decode(preds["refine_deltas"], preds["cand_boxes"])
        return boxes, torch.sigmoid(preds["refine_logits"]), preds["cand_labels"]

    @torch.no_grad()
    def predict(self, preds: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Detections per sample from the refined candidates, sorted by descending score."""
        boxes, scores, labels = self.refined_candidates(preds)
        return [self.postprocess(boxes[b], scores[b], labels[b]) for b in range(boxes.shape[0])]
