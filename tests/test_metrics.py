"""``sparseconv.metrics``: rotated-box IoU, KITTI AP and segmentation IoU.

Every expected value is derived by hand in the comments, or comes from an independent reference:
shapely (or a Monte-Carlo area estimate) for the rotated IoU, and a literal transcription of the
KITTI devkit's ``cleanData`` / ``computeStatistics`` / ``getThresholds`` loops (written here, on
axis-aligned boxes whose IoU is a product of interval overlaps) for the AP on random scenes.
"""
from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import torch

from sparseconv.metrics import (SegmentationMeter, box_iou_3d, box_iou_bev, camera_boxes_to_lidar_frame,
                                confusion_matrix, format_kitti_table, iou_per_class, kitti_eval, mean_iou)

KITTI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kitti")
DIFFS = ("easy", "moderate", "hard")


# =============================================================================== rotated IoU
def test_identical_boxes_iou_one():
    rng = np.random.default_rng(0)
    boxes = np.c_[rng.uniform(-30, 30, (20, 3)), rng.uniform(0.5, 5, (20, 3)), rng.uniform(-np.pi, np.pi, 20)]
    np.testing.assert_allclose(np.diag(box_iou_3d(boxes, boxes)), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(box_iou_bev(boxes, boxes)), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(box_iou_bev(boxes[:, [0, 1, 3, 4, 6]], boxes[:, [0, 1, 3, 4, 6]])), 1.0,
                               atol=1e-12)


def test_shifted_box_by_hand():
    # 4 x 2 box, shifted 1 m along x: intersection 3 x 2 = 6, union 8 + 8 - 6 = 10 -> 0.6.
    a = [[0.0, 0.0, 4.0, 2.0, 0.0]]
    assert box_iou_bev(a, [[1.0, 0.0, 4.0, 2.0, 0.0]])[0, 0] == pytest.approx(0.6, abs=1e-12)
    # Shifted 0.5 m along y instead: 4 x 1.5 = 6 again -> 0.6; along both: 3 x 1.5 = 4.5 / 11.5.
    assert box_iou_bev(a, [[0.0, 0.5, 4.0, 2.0, 0.0]])[0, 0] == pytest.approx(0.6, abs=1e-12)
    assert box_iou_bev(a, [[1.0, 0.5, 4.0, 2.0, 0.0]])[0, 0] == pytest.approx(4.5 / 11.5, abs=1e-12)
    # 3D, height 2 (z in [-1, 1]): shifted 1 m in z -> z overlap 1, inter 4*2*1 = 8, union 16+16-8 = 24 -> 1/3.
    a3 = [[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.0]]
    assert box_iou_3d(a3, [[0.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.0]])[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    # 1 m in x and 1 m in z: inter 3*2*1 = 6, union 32 - 6 = 26 -> 3/13.
    assert box_iou_3d(a3, [[1.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.0]])[0, 0] == pytest.approx(3 / 13, abs=1e-12)
    # The same shift 1 m in z is a BEV IoU of 1 (z ignored).
    assert box_iou_bev(a3, [[0.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.0]])[0, 0] == pytest.approx(1.0, abs=1e-12)
    # z shift of 2 m: the boxes touch (z in [-1, 1] and [1, 3]) -> 0; BEV apart by 4 m (touching) -> 0.
    assert box_iou_3d(a3, [[0.0, 0.0, 2.0, 4.0, 2.0, 2.0, 0.0]])[0, 0] == 0.0
    assert box_iou_bev(a, [[4.0, 0.0, 4.0, 2.0, 0.0], [10.0, 0.0, 4.0, 2.0, 0.0]]).tolist() == [[0.0, 0.0]]
    # Different heights, same footprint: z in [-1, 1] vs [0, 4] -> overlap 1: 8 / (16 + 32 - 8) = 0.2.
    assert box_iou_3d(a3, [[0.0, 0.0, 2.0, 4.0, 2.0, 4.0, 0.0]])[0, 0] == pytest.approx(0.2, abs=1e-12)


def test_rotations_by_hand():
    # A 2 x 2 square rotated by 90 degrees is the same square: same IoU against a box shifted by
    # (1, 0.5): inter 1 x 1.5 = 1.5, union 4 + 4 - 1.5 = 6.5.
    other = [[1.0, 0.5, 2.0, 2.0, 0.0]]
    for yaw in (0.0, np.pi / 2, np.pi, -np.pi / 2, 2 * np.pi):
        assert box_iou_bev([[0.0, 0.0, 2.0, 2.0, yaw]], other)[0, 0] == pytest.approx(1.5 / 6.5, abs=1e-12)
    # A 4 x 2 box against itself rotated 90 degrees (same centre): the cross's centre 2 x 2 = 4,
    # union 8 + 8 - 4 = 12 -> 1/3. Yaw pi is the same box: 1.
    assert box_iou_bev([[0, 0, 4, 2, 0]], [[0, 0, 4, 2, np.pi / 2]])[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    assert box_iou_bev([[0, 0, 4, 2, 0]], [[0, 0, 4, 2, np.pi]])[0, 0] == pytest.approx(1.0, abs=1e-12)
    # Square of side 2 against itself rotated 45 degrees: the diamond |x| + |y| <= sqrt(2) cuts
    # from each corner of [-1, 1]^2 a right isosceles triangle of legs 1 - (sqrt(2) - 1) = 2 - sqrt(2),
    # so the octagon has area 4 - 4 (2 - sqrt(2))^2 / 2 = 8 sqrt(2) - 8 and the union
    # 8 - (8 sqrt(2) - 8) = 16 - 8 sqrt(2): IoU = (sqrt(2) - 1) / (2 - sqrt(2)) = 1 / sqrt(2).
    for yaw in (np.pi / 4, -np.pi / 4, 3 * np.pi / 4):
        assert box_iou_bev([[0, 0, 2, 2, 0]], [[0, 0, 2, 2, yaw]])[0, 0] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # Far from the origin the same numbers come out (coordinates are taken relative to a box).
    assert box_iou_bev([[1e5, -1e5, 2, 2, 0]], [[1e5, -1e5, 2, 2, np.pi / 4]])[0, 0] == pytest.approx(
        1 / math.sqrt(2), abs=1e-9)


def _corners(b):
    c, s = math.cos(b[4]), math.sin(b[4])
    return [(b[0] + c * u * b[2] / 2 - s * v * b[3] / 2, b[1] + s * u * b[2] / 2 + c * v * b[3] / 2)
            for u, v in ((1, 1), (-1, 1), (-1, -1), (1, -1))]


def test_rotated_iou_against_independent_reference():
    rng = np.random.default_rng(1)
    try:
        from shapely.geometry import Polygon
    except ImportError:  # Monte-Carlo areas: 400k uniform samples in the pair's bounding square
        Polygon = None
    n = 120 if Polygon is not None else 12
    a = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(0.3, 4, (n, 2)), rng.uniform(-np.pi, np.pi, n)]
    b = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(0.3, 4, (n, 2)), rng.uniform(-np.pi, np.pi, n)]
    iou = box_iou_bev(a, b)
    assert iou.shape == (n, n) and (iou > 0).mean() > 0.5  # mostly overlapping pairs
    if Polygon is not None:
        pa, pb = [Polygon(_corners(x)) for x in a], [Polygon(_corners(x)) for x in b]
        ref = np.array([[p.intersection(q).area / p.union(q).area for q in pb] for p in pa])
        np.testing.assert_allclose(iou, ref, atol=1e-9)
    else:
        def inside(b, pts):
            c, s = math.cos(b[4]), math.sin(b[4])
            d = pts - b[:2]
            u, v = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]
            return (np.abs(u) <= b[2] / 2) & (np.abs(v) <= b[3] / 2)
        for i in range(n):
            pts = rng.uniform(-5, 5, (400_000, 2))
            ia, ib = inside(a[i], pts), inside(b[i], pts)
            ref = (ia & ib).sum() / max((ia | ib).sum(), 1)
            assert iou[i, i] == pytest.approx(ref, abs=0.01)
    # Symmetry, and 3D IoU = BEV intersection * z overlap / union of volumes with the reference areas.
    np.testing.assert_allclose(box_iou_bev(b, a), iou.T, atol=1e-12)


def test_3d_iou_matches_bev_times_height():
    rng = np.random.default_rng(2)
    a = np.c_[rng.uniform(-2, 2, (30, 3)), rng.uniform(0.5, 4, (30, 3)), rng.uniform(-np.pi, np.pi, 30)]
    b = np.c_[rng.uniform(-2, 2, (30, 3)), rng.uniform(0.5, 4, (30, 3)), rng.uniform(-np.pi, np.pi, 30)]
    bev = box_iou_bev(a, b)
    area_a, area_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    inter_area = bev * (area_a[:, None] + area_b[None]) / (1 + bev)  # from IoU = I / (A + B - I)
    zo = np.clip(np.minimum(a[:, None, 2] + a[:, None, 5] / 2, b[None, :, 2] + b[None, :, 5] / 2)
                 - np.maximum(a[:, None, 2] - a[:, None, 5] / 2, b[None, :, 2] - b[None, :, 5] / 2), 0, None)
    vol = inter_area * zo
    va, vb = area_a * a[:, 5], area_b * b[:, 5]
    np.testing.assert_allclose(box_iou_3d(a, b), vol / (va[:, None] + vb[None] - vol), atol=1e-12)


def test_camera_frame_boxes_match_lidar_conversion():
    # Camera boxes through the (visually verified) KITTI camera -> LiDAR conversion of the viewer,
    # with a calibration that only permutes axes (cam x = -lidar y, cam y = -lidar z, cam z = lidar x).
    from sparseconv.cli.view import camera_boxes_to_lidar

    calib = {"R0_rect": np.eye(3), "Tr_velo_to_cam": np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0.0]])}
    rng = np.random.default_rng(3)
    n = 25
    loc = np.c_[rng.uniform(-3, 3, n), rng.uniform(1, 2, n), rng.uniform(5, 11, n)]
    hwl = rng.uniform(0.5, 4, (n, 3))
    ry = rng.uniform(-np.pi, np.pi, n)
    lidar = camera_boxes_to_lidar({"location": loc, "dimensions": hwl, "rotation_y": ry}, calib)
    cam = np.c_[loc, hwl[:, 2], hwl[:, 0], hwl[:, 1], ry]  # OpenPCDet order x, y, z, l, h, w, ry
    np.testing.assert_allclose(box_iou_3d(cam, cam, frame="camera"), box_iou_3d(lidar, lidar), atol=1e-9)
    np.testing.assert_allclose(box_iou_bev(cam, cam, frame="camera"), box_iou_bev(lidar, lidar), atol=1e-9)
    assert box_iou_3d(cam, cam, frame="camera").diagonal() == pytest.approx(1.0)
    assert camera_boxes_to_lidar_frame(cam).shape == (n, 7)


def test_iou_inputs():
    a = torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.0]])
    assert box_iou_3d(a, a.numpy()).tolist() == [[1.0]]
    assert box_iou_bev(np.zeros((0, 5)), [[0, 0, 1, 1, 0]]).shape == (0, 1)
    assert box_iou_3d([[0, 0, 0, 0, 2, 2, 0]], [[0, 0, 0, 0, 2, 2, 0]]).tolist() == [[0.0]]  # empty box
    with pytest.raises(ValueError, match=r"\[N, 5 or 7\]"):
        box_iou_bev([[0, 0, 1, 1]], [[0, 0, 1, 1, 0]])
    with pytest.raises(ValueError, match="negative size"):
        box_iou_3d([[0, 0, 0, -1, 1, 1, 0]], a)
    with pytest.raises(ValueError, match="non-finite"):
        box_iou_bev([[0, np.nan, 1, 1, 0]], [[0, 0, 1, 1, 0]])
    with pytest.raises(ValueError, match="frame"):
        box_iou_3d(a, a, frame="radar")
    # A few thousand pairs (60 x 100 boxes scattered in a 30 m square) in well under a second.
    rng = np.random.default_rng(4)
    many = np.c_[rng.uniform(-15, 15, (100, 3)), rng.uniform(1, 5, (100, 3)), rng.uniform(-3, 3, 100)]
    assert box_iou_3d(many[:60], many).shape == (60, 100)


# =============================================================================== KITTI AP
def obj(x, name="Car", occ=0, trunc=0.0, height=50.0, y=0.0, size=(4.0, 1.8, 1.5), yaw=0.0):
    """One labelled object: a box at (x, y) and a 2D box of the given pixel height."""
    return {"name": name, "occ": occ, "trunc": trunc, "bbox": [100.0, 100.0, 150.0, 100.0 + height],
            "box": [x, y, -1.0, *size, yaw]}


def gt_frame(objs):
    return {"name": [o["name"] for o in objs], "truncated": [o["trunc"] for o in objs],
            "occluded": [o["occ"] for o in objs], "bbox": np.array([o["bbox"] for o in objs]).reshape(-1, 4),
            "boxes_lidar": np.array([o["box"] for o in objs]).reshape(-1, 7)}


def det_frame(dets, with_bbox=False):
    """dets: (x, score[, name[, bbox height]]) tuples, boxes 4 x 1.8 x 1.5 at (x, 0)."""
    out = {"name": [d[2] if len(d) > 2 else "Car" for d in dets], "score": [d[1] for d in dets],
           "boxes_lidar": np.array([[d[0], 0.0, -1.0, 4.0, 1.8, 1.5, 0.0] for d in dets]).reshape(-1, 7)}
    if with_bbox:
        out["bbox"] = np.array([[100, 100, 150, 100 + (d[3] if len(d) > 3 else 50.0)] for d in dets]).reshape(-1, 4)
    return out


def ap(res, cls="Car", metric="3d", r="R40", diff="moderate"):
    return res[cls][metric][r][diff]


def test_identical_detections_give_100():
    # Cars, pedestrians and cyclists of every difficulty; detections = the ground truth boxes.
    ped, cyc = (0.6, 0.8, 1.7), (1.8, 0.6, 1.7)
    objs = [obj(0), obj(10, occ=1), obj(20, occ=2, height=30), obj(30, y=5, yaw=0.7),
            obj(0, "Pedestrian", y=10, size=ped), obj(5, "Pedestrian", y=10, occ=1, size=ped),
            obj(10, "Cyclist", y=10, trunc=0.4, size=cyc), obj(15, "Cyclist", y=10, size=cyc)]
    gt = gt_frame(objs)
    det = {"name": gt["name"], "score": np.linspace(0.9, 0.2, len(objs)), "boxes_lidar": gt["boxes_lidar"],
           "bbox": gt["bbox"]}
    res = kitti_eval([gt], [det])
    # easy: the unoccluded car at x = 0 and x = 30, pedestrian at x = 0, cyclist at x = 15;
    # moderate adds occlusion-1 objects, hard adds the occlusion-2 car and the 0.4-truncated cyclist.
    assert res["Car"]["num_gt"] == {"easy": 2, "moderate": 3, "hard": 4}
    assert res["Pedestrian"]["num_gt"] == {"easy": 1, "moderate": 2, "hard": 2}
    assert res["Cyclist"]["num_gt"] == {"easy": 1, "moderate": 1, "hard": 2}
    for cls in ("Car", "Pedestrian", "Cyclist"):
        for m in ("bev", "3d"):
            for r in ("R40", "R11"):
                for d in DIFFS:
                    assert ap(res, cls, m, r, d) == pytest.approx(100.0, abs=1e-9), (cls, m, r, d)
    # No ground truth -> NaN, shown as "-".
    empty = kitti_eval([gt_frame([obj(0)])], [det_frame([(0.0, 0.9)])], classes=["Car", "Cyclist"])
    assert all(math.isnan(ap(empty, "Cyclist", "bev", "R11", d)) for d in DIFFS)
    table = format_kitti_table(empty)
    assert "Car" in table and "100.00" in table and "R40" in table and "R11" in table and " -" in table


def hand_case(split_frames: bool):
    """4 cars; 5 detections, sorted by score TP, FP, TP, FP, TP (FPs 20 m away from any car)."""
    cars = [obj(0), obj(10), obj(20), obj(30)]
    dets = [(0.0, 0.9), (50.0, 0.8), (10.0, 0.7), (60.0, 0.6), (20.0, 0.5)]
    if not split_frames:
        return [gt_frame(cars)], [det_frame(dets)]
    return ([gt_frame(cars[:2]), gt_frame(cars[2:])],
            [det_frame([d for d in dets if d[0] in (0.0, 10.0, 50.0)]), det_frame([d for d in dets if d[0] in (20.0, 60.0)])])


@pytest.mark.parametrize("split_frames", [False, True])
def test_ap_by_hand(split_frames):
    # Score order: TP, FP, TP, FP, TP; n_gt = 4. After each detection (precision, recall):
    #   (1/1, 1/4), (1/2, 1/4), (2/3, 2/4), (2/4, 2/4), (3/5, 3/4).
    # Interpolated precision p(r) = max{P : R >= r}:
    #   r <= 1/4: max(1, 1/2, 2/3, 1/2, 3/5) = 1;  1/4 < r <= 1/2: max(2/3, 1/2, 3/5) = 2/3;
    #   1/2 < r <= 3/4: 3/5;  r > 3/4: 0 (never reached).
    # R40, r = k/40, k = 1..40: k = 1..10 -> 1, k = 11..20 -> 2/3, k = 21..30 -> 3/5, k = 31..40 -> 0:
    #   (10 + 20/3 + 6) / 40 = 0.5666... -> 56.6667.
    # R11, r = 0, .1, .., 1: r = 0, .1, .2 -> 1; .3, .4, .5 -> 2/3; .6, .7 -> 3/5; .8, .9, 1 -> 0:
    #   (3 + 2 + 1.2) / 11 = 0.563636... -> 56.3636.
    gt, det = hand_case(split_frames)
    res = kitti_eval(gt, det, classes=["Car"])
    for m in ("bev", "3d"):
        for d in DIFFS:
            assert ap(res, "Car", m, "R40", d) == pytest.approx(100 * (10 + 20 / 3 + 6) / 40, abs=1e-6)
            assert ap(res, "Car", m, "R11", d) == pytest.approx(100 * 6.2 / 11, abs=1e-6)
    # The devkit's own sampling (sampling="devkit"): getThresholds over the 3 TP scores with
    # n_gt = 4 keeps all three (each recall step of 1/4 exceeds the 1/40 step), so its precision
    # array is [1, 2/3, 3/5, 0, ..., 0] (41 entries; already max-to-the-right):
    #   R40 = (2/3 + 3/5) / 40 = 0.031666 -> 3.1667;  R11 = entries 0, 4, .., 40 = 1 / 11 -> 9.0909.
    dev = kitti_eval(gt, det, classes=["Car"], sampling="devkit")
    assert ap(dev, r="R40") == pytest.approx(100 * (2 / 3 + 3 / 5) / 40, abs=1e-6)
    assert ap(dev, r="R11") == pytest.approx(100 / 11, abs=1e-6)


def test_devkit_sampling_with_many_cars():
    # n cars in a row, each detected exactly (scores descending). The devkit keeps a threshold
    # whenever the left recall (i+1)/n is at least as close to its running recall k/40 as the right one.
    #   n = 80: thresholds at TP 1, 2, 4, 6, .., 80 -> 41 thresholds, all precision 1 -> R40 = R11 = 100.
    #   n = 40: every TP is kept (40 thresholds), entry 40 of the 41 stays 0:
    #     R40 = 39/40 = 97.5, R11 = 10/11 = 90.909 (entries 0, 4, .., 36 are 1, entry 40 is 0).
    for n, r40, r11 in ((80, 100.0, 100.0), (40, 97.5, 1000 / 11)):
        gt = gt_frame([obj(10.0 * i) for i in range(n)])
        det = det_frame([(10.0 * i, 1.0 - i / (2 * n)) for i in range(n)])
        dev = kitti_eval([gt], [det], classes=["Car"], metrics=["bev"], sampling="devkit")
        assert ap(dev, metric="bev", r="R40") == pytest.approx(r40, abs=1e-9)
        assert ap(dev, metric="bev", r="R11") == pytest.approx(r11, abs=1e-9)
        exact = kitti_eval([gt], [det], classes=["Car"], metrics=["bev"])
        assert ap(exact, metric="bev", r="R40") == pytest.approx(100.0) and ap(exact, metric="bev", r="R11") == 100.0


def test_difficulty_filtering():
    # Car A: occlusion 0 (easy); car B: occlusion 2 (hard only). Detections by score: F (0.95, on
    # nothing), B (0.9), A (0.8).
    gt = [gt_frame([obj(0.0), obj(10.0, occ=2)])]
    det = [det_frame([(50.0, 0.95), (10.0, 0.9), (0.0, 0.8)])]
    res = kitti_eval(gt, det, classes=["Car"])
    # easy / moderate: n_gt = 1; B is ignored, so its detection is neither TP nor FP: the sequence is
    # FP (P 0/1, R 0), [ignored], TP (P 1/2, R 1) -> p(r) = 1/2 for every r -> 50 (R40 and R11).
    # (Were it a FP, P would be 1/3; were B not ignored, recall could not reach 1 with one TP.)
    # hard: n_gt = 2: FP (0, 0), TP (1/2, 1/2), TP (2/3, 1) -> p(r) = 2/3 everywhere -> 66.667.
    for m in ("bev", "3d"):
        for r in ("R40", "R11"):
            assert ap(res, "Car", m, r, "easy") == pytest.approx(50.0, abs=1e-6)
            assert ap(res, "Car", m, r, "moderate") == pytest.approx(50.0, abs=1e-6)
            assert ap(res, "Car", m, r, "hard") == pytest.approx(200 / 3, abs=1e-6)
    # Thresholds at the difficulty borders (devkit: ignored when height <= min, occlusion > max,
    # truncation > max): height 40 is not easy but moderate; truncation 0.30 is moderate, 0.31 hard.
    gt = [gt_frame([obj(0.0, height=40.0), obj(10.0, trunc=0.30), obj(20.0, trunc=0.31), obj(30.0, height=25.0)])]
    res = kitti_eval(gt, [det_frame([])], classes=["Car"])
    assert res["Car"]["num_gt"] == {"easy": 0, "moderate": 2, "hard": 3}


def test_neighbouring_classes_are_ignored():
    # A Van is ignored for Car: a Car detection on it (score 0.9) is neither TP nor FP, so with the
    # true car detected at 0.8: TP (1/1, R 1) -> 100. A Truck is not a neighbour: the detection on it
    # is a FP: FP (0/1), TP (1/2, R 1) -> 50.
    for other, expected in (("Van", 100.0), ("Truck", 50.0)):
        gt = [gt_frame([obj(0.0, other), obj(10.0)])]
        res = kitti_eval(gt, [det_frame([(0.0, 0.9), (10.0, 0.8)])], classes=["Car"])
        assert res["Car"]["num_gt"]["moderate"] == 1  # the Van / Truck is never a missed car
        for r in ("R40", "R11"):
            assert ap(res, r=r) == pytest.approx(expected, abs=1e-6)
    # Person_sitting for Pedestrian, the same way (pedestrian boxes, IoU threshold 0.5).
    size = (0.8, 0.8, 1.7)
    gt = [gt_frame([obj(0.0, "Person_sitting", size=size), obj(10.0, "Pedestrian", size=size)])]
    det = {"name": ["Pedestrian"] * 2, "score": [0.9, 0.8],
           "boxes_lidar": [[0.0, 0.0, -1.0, *size, 0.0], [10.0, 0.0, -1.0, *size, 0.0]]}
    res = kitti_eval(gt, [det], classes=["Pedestrian"])
    assert ap(res, "Pedestrian") == pytest.approx(100.0, abs=1e-6)


def test_dontcare():
    dc_box = [0.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0.0]
    placeholder = [-1000.0, -1000.0, -1000.0, -1.0, -1.0, -1.0, -10.0]  # KITTI DontCare: no 3D box
    # Car at x = 10; Car detections at x = 0 (0.9, on the DontCare region) and x = 10 (0.8).
    def case(box):
        gt = gt_frame([obj(10.0)])
        gt["name"].append("DontCare")
        gt["truncated"].append(-1)
        gt["occluded"].append(-1)
        gt["bbox"] = np.r_[gt["bbox"], [[0, 0, 10, 10]]]
        gt["boxes_lidar"] = np.r_[gt["boxes_lidar"], [box]]
        return [gt]
    det = [det_frame([(0.0, 0.9), (10.0, 0.8)])]
    # A DontCare with a 3D box absorbs the detection inside it: TP only -> 100; never a FN (n_gt = 1).
    res = kitti_eval(case(dc_box), det, classes=["Car"])
    assert res["Car"]["num_gt"]["moderate"] == 1
    assert ap(res) == pytest.approx(100.0) and ap(res, metric="bev", r="R11") == pytest.approx(100.0)
    # KITTI's placeholder DontCare (location -1000, size -1) absorbs nothing in BEV / 3D, as in the
    # devkit: FP (0/1), TP (1/2, R 1) -> 50.
    res = kitti_eval(case(placeholder), det, classes=["Car"])
    assert ap(res) == pytest.approx(50.0) and ap(res, metric="bev") == pytest.approx(50.0)
    # The DontCare test is intersection / detection volume (devkit criterion 0), not IoU: a 10 x 10
    # x 3 m region fully contains the 4 x 1.8 x 1.5 detection (ratio 1 > 0.7) although their IoU is
    # 10.8 / 300 = 0.036.
    res = kitti_eval(case([0.0, 0.0, -1.0, 10.0, 10.0, 3.0, 0.0]), det, classes=["Car"])
    assert ap(res) == pytest.approx(100.0)
    # OpenPCDet-style infos: no boxes for the trailing DontCare entries -> accepted, they mask nothing.
    gt = case(dc_box)
    gt[0]["boxes_lidar"] = gt[0]["boxes_lidar"][:1]
    assert ap(kitti_eval(gt, det, classes=["Car"])) == pytest.approx(50.0)


def test_detection_height_filter():
    # A Car detection (0.9) on no car, with a 2D box 20 px high (< 25, the moderate minimum) is
    # ignored: neither FP nor TP -> only the TP at 0.8 counts -> 100. Without 'bbox' heights are
    # not checked: FP, TP -> 50. With height 30 it is ignored in easy (< 40) only.
    gt = [gt_frame([obj(10.0)])]
    low = [det_frame([(50.0, 0.9, "Car", 20.0), (10.0, 0.8, "Car", 50.0)], with_bbox=True)]
    assert ap(kitti_eval(gt, low, classes=["Car"])) == pytest.approx(100.0)
    assert ap(kitti_eval(gt, [det_frame([(50.0, 0.9), (10.0, 0.8)])], classes=["Car"])) == pytest.approx(50.0)
    mid = [det_frame([(50.0, 0.9, "Car", 30.0), (10.0, 0.8, "Car", 50.0)], with_bbox=True)]
    res = kitti_eval(gt, mid, classes=["Car"])
    assert ap(res, diff="easy") == pytest.approx(100.0) and ap(res, diff="moderate") == pytest.approx(50.0)


def test_iou_thresholds_strict_and_lenient():
    # Detection shifted 1.6 m along the 4 m car: BEV inter 2.4 x 1.8 = 4.32, union 14.4 - 4.32 = 10.08
    # -> IoU 0.4286 (3D: same, equal heights). Strict (0.7) and lenient (0.5): a FP and a miss -> 0.
    # Shifted 1 m: IoU 3/5 = 0.6: strict 0, lenient 100.
    gt = [gt_frame([obj(0.0)])]
    for shift, strict, lenient in ((1.6, 0.0, 0.0), (1.0, 0.0, 100.0)):
        det = [det_frame([(shift, 0.9)])]
        assert ap(kitti_eval(gt, det, classes=["Car"])) == pytest.approx(strict)
        res = kitti_eval(gt, det, classes=["Car"], overlap="lenient")
        assert ap(res) == pytest.approx(lenient) and res["Car"]["iou_threshold"] == {"bev": 0.5, "3d": 0.5}
    assert ap(kitti_eval(gt, [det_frame([(1.6, 0.9)])], classes=["Car"], overlap={"Car": 0.4})) == 100.0


def test_eval_inputs():
    gt, det = hand_case(False)
    # dict frames (a frame without detections may be missing) and torch arrays.
    as_torch = {k: (torch.as_tensor(v) if k != "name" else v) for k, v in det[0].items()}
    res = kitti_eval({"000": gt[0], "001": gt_frame([obj(0)])}, {"000": as_torch}, classes="Car", metrics="bev",
                     recall_points=[40])
    # frame 001 adds a 5th car that is never detected: recall 3/5 at most. Points (P, R):
    # (1, 1/5), (1/2, 1/5), (2/3, 2/5), (1/2, 2/5), (3/5, 3/5) -> k = 1..8 -> 1, 9..16 -> 2/3,
    # 17..24 -> 3/5, 25..40 -> 0: (8 + 16/3 + 4.8) / 40.
    assert ap(res, metric="bev") == pytest.approx(100 * (8 + 16 / 3 + 4.8) / 40, abs=1e-6)
    assert set(res["Car"]) == {"bev", "num_gt", "iou_threshold"} and set(res["Car"]["bev"]) == {"R40"}
    with pytest.raises(ValueError, match="2 ground-truth frames but 1"):
        kitti_eval(gt * 2, det)
    bad = dict(gt[0], bbox=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"ground-truth frame 0: 'bbox' must have shape \[N, 4\]"):
        kitti_eval([bad], det)
    with pytest.raises(ValueError, match=r"detection frame 0: missing key\(s\) \['score'\]"):
        kitti_eval(gt, [{"name": ["Car"], "boxes_lidar": np.zeros((1, 7))}])
    with pytest.raises(ValueError, match="'score' has 2 rows for 1 detections"):
        kitti_eval(gt, [{"name": ["Car"], "score": [1, 2], "boxes_lidar": np.zeros((1, 7))}])
    with pytest.raises(ValueError, match="detections for frame"):
        kitti_eval({"a": gt[0]}, {"b": det[0]})
    with pytest.raises(ValueError, match="no IoU threshold for class 'Tram'"):
        kitti_eval(gt, det, classes=["Tram"])
    with pytest.raises(ValueError, match="recall_points"):
        kitti_eval(gt, det, recall_points=[20])
    with pytest.raises(ValueError, match="non-finite"):
        kitti_eval(gt, [dict(det[0], score=[np.nan] * 5)])


# --------------------------------------------------------------------- devkit transcription
def _aa_iou(d, g, volume):
    """IoU of axis-aligned boxes (yaw a multiple of pi/2) from interval overlaps, plus inter / vol(d)."""
    def ext(b):
        swap = abs(math.sin(b[6])) > 0.5
        lx, ly = (b[4], b[3]) if swap else (b[3], b[4])
        return [(b[0] - lx / 2, b[0] + lx / 2), (b[1] - ly / 2, b[1] + ly / 2), (b[2] - b[5] / 2, b[2] + b[5] / 2)]
    ed, eg = ext(d), ext(g)
    axes = 3 if volume else 2
    inter, vd, vg = 1.0, 1.0, 1.0
    for k in range(axes):
        inter *= max(0.0, min(ed[k][1], eg[k][1]) - max(ed[k][0], eg[k][0]))
        vd *= max(ed[k][1] - ed[k][0], 0.0)
        vg *= max(eg[k][1] - eg[k][0], 0.0)
    union = vd + vg - inter
    return (inter / union if union > 0 else 0.0), (inter / vd if vd > 0 else 0.0)


MIN_HEIGHT, MAX_OCC, MAX_TRUNC = [40, 25, 25], [0, 1, 2], [0.15, 0.3, 0.5]


def _ref_clean(gt, det, cls, diff):  # devkit cleanData
    ig_gt, ig_det, n_gt = [], [], 0
    for i, name in enumerate(gt["name"]):
        height = gt["bbox"][i][3] - gt["bbox"][i][1]
        if name.lower() == cls.lower():
            valid = 1
        elif (cls.lower() == "pedestrian" and name.lower() == "person_sitting") or (
                cls.lower() == "car" and name.lower() == "van"):
            valid = 0
        else:
            valid = -1
        ignore = gt["occluded"][i] > MAX_OCC[diff] or gt["truncated"][i] > MAX_TRUNC[diff] or height <= MIN_HEIGHT[diff]
        if valid == 1 and not ignore:
            ig_gt.append(0)
            n_gt += 1
        elif valid == 0 or (ignore and valid == 1):
            ig_gt.append(1)
        else:
            ig_gt.append(-1)
    dc = [i for i, name in enumerate(gt["name"]) if name.lower() == "dontcare"]
    for i, name in enumerate(det["name"]):
        valid = 1 if name.lower() == cls.lower() else -1
        height = abs(det["bbox"][i][3] - det["bbox"][i][1]) if "bbox" in det else 1e9
        ig_det.append(1 if height < MIN_HEIGHT[diff] else (0 if valid == 1 else -1))
    return ig_gt, ig_det, dc, n_gt


def _ref_stats(ov, ov_dc, ig_gt, ig_det, scores, thr, compute_fp, t=0.0):  # devkit computeStatistics
    NO = -10000000
    nd = len(scores)
    assigned = [False] * nd
    ign_thr = [compute_fp and scores[j] < t for j in range(nd)]
    tp = fp = fn = 0
    tps = []
    for i in range(len(ig_gt)):
        if ig_gt[i] == -1:
            continue
        det_idx, valid, max_ov, assigned_ignored = -1, NO, 0.0, False
        for j in range(nd):
            if ig_det[j] == -1 or assigned[j] or ign_thr[j]:
                continue
            o = ov[j][i]
            if not compute_fp and o > thr and scores[j] > valid:
                det_idx, valid = j, scores[j]
            elif compute_fp and o > thr and (o > max_ov or assigned_ignored) and ig_det[j] == 0:
                max_ov, det_idx, valid, assigned_ignored = o, j, 1, False
            elif compute_fp and o > thr and valid == NO and ig_det[j] == 1:
                det_idx, valid, assigned_ignored = j, 1, True
        if valid == NO and ig_gt[i] == 0:
            fn += 1
        elif valid != NO and (ig_gt[i] == 1 or ig_det[det_idx] == 1):
            assigned[det_idx] = True
        elif valid != NO:
            tp += 1
            tps.append(scores[det_idx])
            assigned[det_idx] = True
    if compute_fp:
        fp = sum(1 for j in range(nd) if not (assigned[j] or ig_det[j] in (-1, 1) or ign_thr[j]))
        nstuff = 0
        for k in range(len(ov_dc[0]) if nd else 0):
            for j in range(nd):
                if assigned[j] or ig_det[j] in (-1, 1) or ign_thr[j]:
                    continue
                if ov_dc[j][k] > thr:
                    assigned[j] = True
                    nstuff += 1
        fp -= nstuff
    return tp, fp, fn, tps


def _ref_thresholds(v, n):  # devkit getThresholds
    v = sorted(v, reverse=True)
    t, cur = [], 0.0
    for i in range(len(v)):
        l_r = (i + 1) / n
        r_r = (i + 2) / n if i < len(v) - 1 else l_r
        if (r_r - cur) < (cur - l_r) and i < len(v) - 1:
            continue
        t.append(v[i])
        cur += 1 / 40.0
    return t


def _ref_ap(gts, dets, cls, diff, volume, thr, sampling):
    frames = []
    n_gt = 0
    for gt, det in zip(gts, dets):
        ig_gt, ig_det, dc, n = _ref_clean(gt, det, cls, diff)
        n_gt += n
        pairs = [[_aa_iou(d, g, volume) for g in gt["boxes_lidar"]] for d in det["boxes_lidar"]]
        ov = [[p[0] for p in row] for row in pairs]
        ov_dc = [[row[k][1] for k in dc] for row in pairs]
        frames.append((ov, ov_dc, ig_gt, ig_det, list(det["score"])))
    if n_gt == 0:
        return None
    def counts(t):
        tp = fp = 0
        for ov, ov_dc, ig_gt, ig_det, sc in frames:
            a, b, _, _ = _ref_stats(ov, ov_dc, ig_gt, ig_det, sc, thr, True, t)
            tp, fp = tp + a, fp + b
        return tp, fp
    if sampling == "devkit":
        tps = [s for fr in frames for s in _ref_stats(fr[0], fr[1], fr[2], fr[3], fr[4], thr, False)[3]]
        prec = [0.0] * 41
        for i, t in enumerate(_ref_thresholds(tps, n_gt)):
            tp, fp = counts(t)
            prec[i] = tp / (tp + fp)
        prec = [max(prec[i:]) for i in range(41)]
        return 100 * sum(prec[1:]) / 40, 100 * sum(prec[0::4]) / 11
    pts = []
    for t in sorted({s for fr in frames for s in fr[4]}):  # every score of every detection
        tp, fp = counts(t)
        if tp + fp:
            pts.append((tp / n_gt, tp / (tp + fp)))
    interp = lambda r: max([p for rec, p in pts if rec >= r - 1e-12], default=0.0)  # noqa: E731
    return (100 * sum(interp(k / 40) for k in range(1, 41)) / 40, 100 * sum(interp(k / 10) for k in range(11)) / 11)


def _random_scene(rng, n_frames):
    """Crowded scenes: clusters of overlapping cars / vans / pedestrians / DontCare, jittered detections."""
    names = ["Car", "Car", "Car", "Van", "Truck", "Pedestrian", "Pedestrian", "Person_sitting", "DontCare"]
    gts, dets = [], []
    for _ in range(n_frames):
        g = {"name": [], "truncated": [], "occluded": [], "bbox": [], "boxes_lidar": []}
        d = {"name": [], "score": [], "boxes_lidar": [], "bbox": []}
        for _ in range(rng.integers(0, 7)):
            name = str(rng.choice(names))
            size = [rng.uniform(3.5, 4.5), rng.uniform(1.6, 2.0), 1.5] if name not in (
                "Pedestrian", "Person_sitting") else [0.8, 0.7, 1.7]
            if name == "DontCare":
                size = [rng.uniform(2, 8), rng.uniform(2, 8), 3.0]
            box = [rng.integers(0, 4) * 1.5 + rng.uniform(-0.3, 0.3), rng.integers(0, 2) * 1.0,
                   rng.uniform(-1.2, -0.8), *size, float(rng.choice([0.0, np.pi / 2, np.pi]))]
            g["name"].append(name)
            g["truncated"].append(float(rng.choice([0.0, 0.1, 0.15, 0.3, 0.45, 0.6])))
            g["occluded"].append(int(rng.integers(0, 4)))
            top = rng.uniform(0, 200)
            g["bbox"].append([0.0, top, 10.0, top + float(rng.choice([20.0, 25.0, 30.0, 40.0, 60.0]))])
            g["boxes_lidar"].append(box)
            for _ in range(rng.integers(0, 3)):  # detections around this object
                jit = np.r_[rng.normal(0, 0.4, 3), rng.normal(0, 0.2, 3), 0.0]
                dname = name if name in ("Car", "Pedestrian") and rng.uniform() < 0.8 else str(
                    rng.choice(["Car", "Pedestrian"]))
                d["name"].append(dname)
                d["boxes_lidar"].append(list(np.array(box) + jit))
                h = float(rng.choice([20.0, 30.0, 50.0]))
                d["bbox"].append([0.0, 0.0, 10.0, h])
                d["score"].append(float(np.round(rng.uniform(), 2)))  # ties on purpose
        for _ in range(rng.integers(0, 3)):  # stray false positives
            d["name"].append(str(rng.choice(["Car", "Pedestrian"])))
            d["boxes_lidar"].append([rng.uniform(-5, 10), rng.uniform(-3, 3), -1.0, 4.0, 1.8, 1.5, 0.0])
            d["bbox"].append([0.0, 0.0, 10.0, 50.0])
            d["score"].append(float(np.round(rng.uniform(), 2)))
        g = {k: np.array(v, dtype=object if k == "name" else float).reshape((-1, 4) if k == "bbox" else (
            (-1, 7) if k == "boxes_lidar" else (-1,))) for k, v in g.items()}
        d = {k: np.array(v, dtype=object if k == "name" else float).reshape((-1, 4) if k == "bbox" else (
            (-1, 7) if k == "boxes_lidar" else (-1,))) for k, v in d.items()}
        if rng.uniform() < 0.3:
            del d["bbox"]
        gts.append({k: (list(v) if k == "name" else v) for k, v in g.items()})
        dets.append({k: (list(v) if k == "name" else v) for k, v in d.items()})
    return gts, dets


@pytest.mark.parametrize("seed", [0, 1])
def test_against_devkit_transcription(seed):
    # Random crowded scenes (many detections overlapping several ground truths, ignored objects,
    # neighbouring classes, DontCare regions with 3D boxes, low 2D boxes, score ties): both
    # samplings against the literal devkit loops above, for Car and Pedestrian, strict and lenient.
    rng = np.random.default_rng(seed)
    gts, dets = _random_scene(rng, 14)
    for overlap in ("strict", "lenient"):
        for sampling in ("exact", "devkit"):
            res = kitti_eval(gts, dets, classes=["Car", "Pedestrian"], overlap=overlap, sampling=sampling)
            for cls in ("Car", "Pedestrian"):
                thr = {"strict": {"Car": 0.7, "Pedestrian": 0.5}, "lenient": {"Car": 0.5, "Pedestrian": 0.25}}[
                    overlap][cls]
                for m, volume in (("bev", False), ("3d", True)):
                    for k, diff in enumerate(DIFFS):
                        ref = _ref_ap(gts, dets, cls, k, volume, thr, sampling)
                        got = (ap(res, cls, m, "R40", diff), ap(res, cls, m, "R11", diff))
                        if ref is None:
                            assert all(math.isnan(x) for x in got)
                        else:
                            assert got == pytest.approx(ref, abs=1e-9), (overlap, sampling, cls, m, diff)
    # The scenes do exercise the matching: some AP strictly between 0 and 100.
    res = kitti_eval(gts, dets, classes=["Car"], overlap="lenient")
    assert any(0 < ap(res, "Car", "bev", "R40", d) < 100 for d in DIFFS)


@pytest.mark.skipif(not os.path.isdir(os.path.join(KITTI, "label_2")), reason="KITTI sample data not present")
def test_real_kitti_labels_as_detections():
    from sparseconv.cli.view import camera_boxes_to_lidar, read_kitti_calib, read_kitti_labels

    gts, dets = [], []
    for path in sorted(glob.glob(os.path.join(KITTI, "label_2", "*.txt"))):
        frame = os.path.basename(path)[:-4]
        labels = read_kitti_labels(path, skip_dontcare=False)
        calib = read_kitti_calib(os.path.join(KITTI, "calib", frame + ".txt"))
        boxes = camera_boxes_to_lidar(labels, calib)
        gts.append({"name": labels["type"], "truncated": labels["truncated"], "occluded": labels["occluded"],
                    "bbox": labels["bbox"], "boxes_lidar": boxes})
        keep = labels["type"] != "DontCare"
        dets.append({"name": labels["type"][keep], "score": np.linspace(0.9, 0.1, int(keep.sum())),
                     "boxes_lidar": boxes[keep], "bbox": labels["bbox"][keep]})
    res = kitti_eval(gts, dets)
    seen = 0
    for cls in ("Car", "Pedestrian", "Cyclist"):
        for d in DIFFS:
            for m in ("bev", "3d"):
                v = ap(res, cls, m, "R40", d)
                if res[cls]["num_gt"][d]:
                    seen += 1
                    assert v == pytest.approx(100.0), (cls, m, d)
                else:
                    assert math.isnan(v)
    assert seen > 0


# =============================================================================== segmentation
def test_segmentation_by_hand():
    # pred   = 0 0 1 1 2 2   1   0
    # target = 0 1 1 1 2 255 255 0   (255 ignored, 4 classes; class 3 never occurs)
    # Kept (target, pred): (0,0) (1,0) (1,1) (1,1) (2,2) (0,0) ->
    #   conf = [[2,0,0,0], [1,2,0,0], [0,0,1,0], [0,0,0,0]]   (rows: target, columns: pred)
    # IoU_0 = 2 / (row 2 + col 3 - 2) = 2/3; IoU_1 = 2 / (3 + 2 - 2) = 2/3; IoU_2 = 1 / (1 + 1 - 1) = 1;
    # IoU_3 = NaN (absent from both). mIoU = (2/3 + 2/3 + 1) / 3 = 7/9; without class 2: 2/3.
    # Accuracy 5 / 6; class accuracy [1, 2/3, 1, NaN].
    pred = np.array([0, 0, 1, 1, 2, 2, 1, 0])
    target = np.array([0, 1, 1, 1, 2, 255, 255, 0])
    conf = confusion_matrix(pred, target, 4, ignore_index=255)
    assert conf.tolist() == [[2, 0, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    iou = iou_per_class(conf)
    np.testing.assert_allclose(iou[:3], [2 / 3, 2 / 3, 1.0])
    assert math.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx(7 / 9)
    assert mean_iou(conf, ignore=2) == pytest.approx(2 / 3)
    assert mean_iou(conf, ignore=[0, 1, 2]) != mean_iou(conf, ignore=[0, 1, 2])  # NaN: nothing left
    # The meter, in two batches, one of them as torch scores [N, C] (argmax gives the same labels).
    meter = SegmentationMeter(4, ignore_index=255, class_names=["a", "b", "c", "d"])
    meter.update(torch.tensor(pred[:3]), torch.tensor(target[:3]))
    scores = np.eye(4)[pred[3:]] * 0.8 + 0.05
    meter.update(torch.tensor(scores), target[3:])
    out = meter.compute()
    assert out["confusion"].tolist() == conf.tolist()
    assert out["miou"] == pytest.approx(7 / 9) and out["accuracy"] == pytest.approx(5 / 6)
    np.testing.assert_allclose(out["class_accuracy"][:3], [1.0, 2 / 3, 1.0])
    assert out["iou_by_name"]["c"] == 1.0
    # Scores with the class axis at dim 1 ([B, C, N]) are argmax-ed there.
    meter.reset()
    meter.update(np.eye(4)[pred].T[None], target[None])
    assert meter.compute()["miou"] == pytest.approx(7 / 9)
    with pytest.raises(ValueError, match=r"target label 7 outside \[0, 4\)"):
        confusion_matrix([0], [7], 4)
    with pytest.raises(ValueError, match="pred has 2 elements, target 1"):
        confusion_matrix([0, 1], [0], 4)
    with pytest.raises(TypeError, match="integer class labels"):
        confusion_matrix([0.5], [0], 4)
