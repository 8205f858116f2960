"""Detection stack: box coders, rotated IoU / NMS, anchor and CenterPoint heads, the registered detectors.

References are independent: NumPy's exact rotated IoU (``sparseconv.metrics.box_iou_bev``), brute-force
greedy NMS loops, a loop implementation of OpenPCDet's anchor assignment, closed-form encodings.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparseconv.models as M
from sparseconv.datasets import collate, simulate_scan
from sparseconv.metrics import box_iou_bev
from sparseconv.models.anchor_head import AnchorHeadSingle
from sparseconv.models.box_coder import (ResidualCoder, center_cell, decode_center_boxes, encode_center_targets,
                                         limit_period)
from sparseconv.models.center_head import CenterHead, CenterHeadAttn, gaussian_radius
from sparseconv.models.nms import (batched_circle_nms, batched_rotated_nms, boxes_iou_bev, circle_nms,
                                   rotated_nms)

torch.set_num_threads(1)

CLASSES = ("Car", "Pedestrian", "Cyclist")
PR = (0.0, -9.6, -3.0, 25.6, 9.6, 1.0)
VS = (0.2, 0.2, 0.2)
MAP = (16, 12)  # BEV cells (X, Y): (128, 96) voxels / 8; not square, so that x and y cannot be confused


def random_boxes(n, seed, extent=10.0, dtype=torch.float64, yaw_range=math.pi):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * extent
    z = torch.rand(n, 1, generator=g, dtype=dtype) * 2 - 2
    size = torch.rand(n, 3, generator=g, dtype=dtype) * 3 + 0.3
    yaw = (torch.rand(n, 1, generator=g, dtype=dtype) * 2 - 1) * yaw_range
    return torch.cat([xy, z, size, yaw], 1)


def wrapped_diff(a, b):
    return limit_period(a - b).abs()


# ---------------------------------------------------------------------------------------------- box coding
@pytest.mark.parametrize("sincos", [False, True])
def test_residual_coder_inverse(sincos):
    coder = ResidualCoder(sincos)
    boxes = random_boxes(500, 0, yaw_range=3 * math.pi)  # yaws far outside [-pi, pi)
    anchors = random_boxes(500, 1, yaw_range=3 * math.pi)
    dec = coder.decode(coder.encode(boxes, anchors), anchors)
    assert torch.allclose(dec[:, :6], boxes[:, :6], rtol=0, atol=1e-12)
    if sincos:
        assert wrapped_diff(dec[:, 6], boxes[:, 6]).max() < 1e-12
        assert (dec[:, 6] > -math.pi - 1e-12).all() and (dec[:, 6] <= math.pi + 1e-12).all()
    else:
        assert torch.allclose(dec[:, 6], boxes[:, 6], rtol=0, atol=1e-12)
        deltas = torch.randn(500, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(coder.encode(coder.decode(deltas, anchors), anchors), deltas, rtol=0, atol=1e-12)


def test_residual_coder_closed_form():
    anchor = torch.tensor([[1.0, 2.0, -1.0, 3.0, 4.0, 2.0, 0.25]], dtype=torch.float64)  # BEV diagonal 5
    box = torch.tensor([[6.0, -8.0, 0.0, 6.0, 2.0, 4.0, 0.75]], dtype=torch.float64)
    want = [1.0, -2.0, 0.5, math.log(2), math.log(0.5), math.log(2), 0.5]
    assert torch.allclose(ResidualCoder().encode(box, anchor)[0], torch.tensor(want, dtype=torch.float64))
    sc = ResidualCoder(True).encode(box, anchor)[0]
    assert torch.allclose(sc[6:], torch.tensor([math.cos(0.75) - math.cos(0.25), math.sin(0.75) - math.sin(0.25)],
                                               dtype=torch.float64))
    with pytest.raises(ValueError, match="deltas"):
        ResidualCoder(True).decode(torch.zeros(1, 7), anchor)


def test_center_coding_inverse():
    boxes = random_boxes(400, 3, yaw_range=3 * math.pi)
    boxes[:, 0] = boxes[:, 0] * 2.5  # x in [0, 25)
    boxes[:, 1] = boxes[:, 1] * 1.9 - 9.6
    center, cells = center_cell(boxes, PR, VS, 8, MAP)
    assert torch.equal(cells, torch.floor((boxes[:, :2] - torch.tensor(PR[:2], dtype=torch.float64)) / 1.6).long())
    codes = encode_center_targets(boxes, cells, PR, VS, 8)
    assert (codes[:, :2] >= 0).all() and (codes[:, :2] < 1).all()  # offsets within the cell
    assert torch.allclose(codes[:, 3:6], boxes[:, 3:6].log())
    assert torch.allclose(codes[:, 6], boxes[:, 6].cos()) and torch.allclose(codes[:, 7], boxes[:, 6].sin())
    dec = decode_center_boxes(codes, cells, PR, VS, 8)
    assert torch.allclose(dec[:, :6], boxes[:, :6], rtol=0, atol=1e-12)
    assert wrapped_diff(dec[:, 6], boxes[:, 6]).max() < 1e-12


# ---------------------------------------------------------------------------------------------- IoU and NMS
def nms_boxes(seed, n=80):
    b = random_boxes(n, seed, extent=8.0)
    square = torch.tensor([[3.0, 3.0, -1.0, 2.0, 2.0, 1.5, 0.3]], dtype=torch.float64)
    turned = square.clone()
    turned[0, 6] += math.pi / 2  # the same square, rotated by 90 degrees: IoU 1
    rect_turned = b[:1].clone()
    rect_turned[0, 6] += math.pi / 2
    far = torch.tensor([[500.0, -500.0, 0.0, 4.0, 2.0, 1.5, 0.0]], dtype=torch.float64)  # disjoint
    return torch.cat([b, b[:3], square, turned, rect_turned, far])  # b[:3] duplicated


def test_boxes_iou_bev_matches_numpy():
    b = nms_boxes(4)
    ref = box_iou_bev(b.numpy(), b.numpy())
    got = boxes_iou_bev(b, b).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(boxes_iou_bev(b.float(), b.float()).double().numpy(), ref, rtol=0, atol=2e-5)
    assert np.allclose(np.diag(got), 1.0)
    n = len(b)
    assert got[n - 4, n - 3] == pytest.approx(1.0)  # square vs itself rotated by 90 degrees
    assert got[:, -1][:-1].max() == 0.0  # the far box
    assert boxes_iou_bev(b[:0], b).shape == (0, n) and boxes_iou_bev(b, b[:0]).shape == (n, 0)
    bev = b[:, [0, 1, 3, 4, 6]]  # [N, 5] input
    np.testing.assert_allclose(boxes_iou_bev(bev, bev).numpy(), ref, rtol=0, atol=1e-9)


def greedy_reference(order, conflict, post_max=None):
    keep = []
    for i in order:
        if all(not conflict(i, k) for k in keep):
            keep.append(i)
            if post_max is not None and len(keep) == post_max:
                break
    return keep


def score_order(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("thr", [0.0, 0.1, 0.4, 0.8])
def test_rotated_nms_brute_force(seed, thr):
    b = nms_boxes(seed)
    g = torch.Generator().manual_seed(10 + seed)
    scores = torch.rand(len(b), generator=g, dtype=torch.float64)
    scores[5] = scores[6]  # a tie: the lower index first
    iou = box_iou_bev(b.numpy(), b.numpy())
    s = scores.tolist()
    for pre_max, post_max in [(None, None), (30, None), (None, 7)]:
        order = score_order(s)[:pre_max]
        want = greedy_reference(order, lambda i, k: iou[i, k] > thr, post_max)
        got = rotated_nms(b, scores, thr, pre_max=pre_max, post_max=post_max).tolist()
        assert got == want
    keep = set(rotated_nms(b, scores, 0.5).tolist())
    n = len(b)
    assert not {0, n - 7} <= keep  # a box and its duplicate never both survive
    assert not {n - 4, n - 3} <= keep  # nor a square and its 90-degree turn
    assert n - 1 in keep  # a disjoint box always survives


def test_nms_empty_and_errors():
    empty = torch.zeros(0, 7)
    assert rotated_nms(empty, torch.zeros(0), 0.5).tolist() == []
    assert circle_nms(empty, torch.zeros(0), 1.0).tolist() == []
    assert batched_rotated_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []
    assert rotated_nms(empty, torch.zeros(0), 0.5).dtype == torch.int64
    with pytest.raises(ValueError, match="iou_threshold"):
        rotated_nms(torch.zeros(2, 7), torch.zeros(2), 1.5)
    with pytest.raises(ValueError, match="scores"):
        rotated_nms(torch.zeros(2, 7), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="boxes"):
        rotated_nms(torch.zeros(2, 6), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="min_radius"):
        circle_nms(torch.zeros(2, 2), torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="post_max"):
        rotated_nms(torch.zeros(2, 7), torch.zeros(2), 0.5, post_max=0)


@pytest.mark.parametrize("radius", [0.0, 0.5, 1.5])
def test_circle_nms_brute_force(radius):
    g = torch.Generator().manual_seed(5)
    c = torch.rand(150, 2, generator=g, dtype=torch.float64) * 8
    c = torch.cat([c, c[:2]])  # exact duplicates: suppressed even at radius 0
    scores = torch.rand(len(c), generator=g, dtype=torch.float64)
    s, pts = scores.tolist(), c.numpy()
    for post_max in (None, 10):
        want = greedy_reference(score_order(s), lambda i, k: np.hypot(*(pts[i] - pts[k])) <= radius, post_max)
        assert circle_nms(c, scores, radius, post_max).tolist() == want


def test_batched_nms_brute_force():
    b = nms_boxes(7)
    g = torch.Generator().manual_seed(8)
    scores = torch.rand(len(b), generator=g, dtype=torch.float64)
    labels = torch.randint(1, 4, (len(b),), generator=g)
    labels[-7] = labels[0]  # the duplicate of box 0 in its class
    iou = box_iou_bev(b.numpy(), b.numpy())
    s, lab = scores.tolist(), labels.tolist()
    for post_max in (None, 4):
        want = []
        for c in set(lab):
            order = [i for i in score_order(s) if lab[i] == c]
            want += greedy_reference(order, lambda i, k: iou[i, k] > 0.2, post_max)
        want = sorted(want, key=lambda i: (-s[i], i))
        assert batched_rotated_nms(b, scores, labels, 0.2, post_max=post_max).tolist() == want
    pts = b[:, :2].numpy()
    radii = {1: 0.5, 2: 1.0, 3: 2.0}
    want = []
    for c in set(lab):
        order = [i for i in score_order(s) if lab[i] == c]
        want += greedy_reference(order, lambda i, k: np.hypot(*(pts[i] - pts[k])) <= radii[c])
    assert batched_circle_nms(b, scores, labels, radii).tolist() == sorted(want, key=lambda i: (-s[i], i))


# ---------------------------------------------------------------------------------------------- anchor head
def anchor_head(**kw):
    return AnchorHeadSingle(8, CLASSES, PR, VS, MAP, **kw)


def test_anchor_layout():
    head = anchor_head()
    a = head.anchors.view(MAP[1], MAP[0], 6, 7)
    assert head.num_anchors_per_location == 6 and head.class_slices == ((0, 2), (2, 4), (4, 6))
    i, j = 5, 11
    step_x, step_y = (PR[3] - PR[0]) / (MAP[0] - 1), (PR[4] - PR[1]) / (MAP[1] - 1)  # align_center=False
    want = torch.tensor([[PR[0] + i * step_x, PR[1] + j * step_y, -1.78 + 1.56 / 2, 3.9, 1.6, 1.56, 0.0],
                         [PR[0] + i * step_x, PR[1] + j * step_y, -1.78 + 1.56 / 2, 3.9, 1.6, 1.56, math.pi / 2],
                         [PR[0] + i * step_x, PR[1] + j * step_y, -0.6 + 1.73 / 2, 0.8, 0.6, 1.73, 0.0]])
    assert torch.allclose(a[j, i, :3], want, atol=1e-5)
    assert torch.allclose(a[j, i, 5, 3:6], torch.tensor([1.76, 0.6, 1.73]))
    centred = anchor_head(align_center=True).anchors.view(MAP[1], MAP[0], 6, 7)
    assert centred[0, 0, 0, 0].item() == pytest.approx(PR[0] + 0.8, abs=1e-5)
    custom = anchor_head(anchor_config={"Car": {"sizes": [(4.0, 2.0, 1.5), (5.0, 2.0, 2.0)], "rotations": [0.0]}})
    assert custom.num_anchors_per_location == 6 and custom.class_slices[0] == (0, 2)
    with pytest.raises(ValueError, match="anchor_config"):
        AnchorHeadSingle(8, ("Truck",), PR, VS, MAP)
    with pytest.raises(ValueError, match="unknown keys"):
        anchor_head(anchor_config={"Car": {"size": (1, 1, 1)}})


def assign_reference(head, gt):
    """OpenPCDet's AxisAlignedTargetAssigner (no sampling) with NumPy's rotated BEV IoU, by loops."""
    anchors = head.anchors.double().numpy()
    n, a_all = len(anchors), head.num_anchors_per_location
    labels, match = -np.ones(n, int), -np.ones(n, int)
    for c, (a0, a1) in enumerate(head.class_slices):
        idx = np.array([k for k in range(n) if a0 <= k % a_all < a1])
        gi = [g for g in range(len(gt)) if int(gt[g, 7]) == c + 1]
        if not gi:
            labels[idx] = 0
            continue
        iou = box_iou_bev(anchors[idx], gt[gi, :7])
        col_max = iou.max(0)
        for r, k in enumerate(idx):
            best = int(iou[r].argmax())
            forced = any(col_max[g] > 0 and iou[r, g] == col_max[g] for g in range(len(gi)))
            if forced or iou[r].max() >= head.matched_thresholds[c]:
                labels[k], match[k] = c + 1, gi[best]
            elif iou[r].max() < head.unmatched_thresholds[c]:
                labels[k] = 0
    return labels, match


def scene_gt(head, seed, n=8):
    """Boxes near anchors (so that IoUs cross the thresholds), classes mixed, one padding row."""
    g = np.random.default_rng(seed)
    sizes = {1: (3.9, 1.6, 1.56), 2: (0.8, 0.6, 1.73), 3: (1.76, 0.6, 1.73)}
    rows = []
    anchors = head.anchors.numpy()
    for k in range(n):
        cls = int(g.integers(1, 4))
        a = anchors[int(g.integers(0, len(anchors)))]
        size = np.array(sizes[cls]) * g.uniform(0.85, 1.15, 3)
        yaw = g.choice([0.0, np.pi / 2]) + g.normal(0, 0.15)
        rows.append([a[0] + g.normal(0, 0.3), a[1] + g.normal(0, 0.3), a[2], *size, yaw, cls])
    rows.append([0.0] * 8)  # padding
    return np.array(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anchor_assignment_matches_reference(seed):
    head = anchor_head()
    gt = np.stack([scene_gt(head, seed), scene_gt(head, seed + 10)])
    t = head.assign_targets(torch.tensor(gt, dtype=torch.float32))
    for b in range(2):
        labels, match = assign_reference(head, gt[b].astype(np.float32).astype(np.float64))
        assert len(set(match[labels > 0])) >= 6  # not trivial: most boxes have positive anchors
        np.testing.assert_array_equal(t["labels"][b].numpy(), labels)
        np.testing.assert_array_equal(t["gt_index"][b].numpy(), match)
        pos = labels > 0
        dec = head.coder.decode(t["reg_targets"][b][pos].double(), head.anchors[pos].double())
        np.testing.assert_allclose(dec.numpy(), gt[b][match[pos], :7], atol=1e-4)


def test_anchor_identical_to_gt_is_positive_with_zero_residual():
    head = anchor_head()
    k = (7 * MAP[0] + 9) * 6 + 1  # cell (9, 7), the Car anchor rotated by pi / 2
    gt = torch.zeros(1, 2, 8)
    gt[0, 0, :7] = head.anchors[k]
    gt[0, 0, 7] = 1
    t = head.assign_targets(gt)
    assert t["labels"][0, k] == 1 and t["gt_index"][0, k] == 0
    assert torch.equal(t["reg_targets"][0, k], torch.zeros(7))
    assert torch.equal(head.coder.decode(t["reg_targets"][0, k], head.anchors[k]), gt[0, 0, :7])
    # no anchor of another class is positive; the Car anchor at 0 rad has IoU 1.56 * 1.6 / ... < 0.45: negative
    assert t["labels"][0].max() == 1 and (t["labels"][0] == 1).sum() == 1
    assert t["labels"][0, k - 1] == 0


def test_anchor_decode_recovers_boxes_with_direction():
    head = anchor_head()
    gt_np = scene_gt(head, 3)
    gt_np[:, 6] += np.where(np.arange(len(gt_np)) % 2 == 0, np.pi, 0.0)  # headings in both directions
    gt_np[:, 6] = np.asarray(limit_period(torch.tensor(gt_np[:, 6])))
    gt = torch.tensor(gt_np, dtype=torch.float32)[None]
    t = head.assign_targets(gt)
    pos = t["labels"] > 0
    onehot = torch.nn.functional.one_hot(t["labels"].clamp_min(0), 4)[..., 1:].bool()
    preds = {"cls_preds": torch.where(onehot, 10.0, -10.0),
             "box_preds": t["reg_targets"],
             "dir_preds": torch.nn.functional.one_hot(head.direction_targets(t["gt_yaw"]), 2).float() * 10}
    _, boxes = head.decode(preds)
    want = gt[0, t["gt_index"][0][pos[0]], :7]
    got = boxes[0][pos[0]]
    assert torch.allclose(got[:, :6], want[:, :6], atol=1e-4)
    assert wrapped_diff(got[:, 6], want[:, 6]).max() < 1e-4  # right direction, not off by pi
    assert (got[:, 6] >= -math.pi).all() and (got[:, 6] < math.pi).all()
    for multi in (False, True):
        head.multi_class_nms = multi
        dets = head.predict(preds)[0]
        assert len(dets["boxes"]) > 0 and (dets["scores"][:-1] >= dets["scores"][1:]).all()
        assert (dets["scores"] >= head.score_threshold).all()
        # every detection is one of the boxes (the positives' decodings), with its class
        iou = box_iou_bev(dets["boxes"].double().numpy(), gt[0, :-1, :7].double().numpy())
        best = iou.argmax(1)
        assert (iou.max(1) > 0.999).all()
        assert dets["labels"].tolist() == gt[0, best, 7].long().tolist()


def test_anchor_loss_closed_form():
    """Zero predictions: every term has a closed form given the targets (OpenPCDet's normalization)."""
    head = anchor_head()
    gt = torch.tensor(np.stack([scene_gt(head, 4), scene_gt(head, 5)]), dtype=torch.float32)
    t = head.assign_targets(gt)
    n = head.anchors.shape[0]
    preds = {"cls_preds": torch.zeros(2, n, 3), "box_preds": torch.zeros(2, n, 7), "dir_preds": torch.zeros(2, n, 2)}
    loss, terms = head.loss(preds, gt)
    ln2 = math.log(2)
    want_cls = want_box = 0.0
    for b in range(2):
        lab = t["labels"][b]
        pos, cared = int((lab > 0).sum()), int((lab >= 0).sum())
        assert pos > 0
        # p = 0.5: a 0-target costs 0.75 * 0.5^2 * ln 2, a 1-target 0.25 * 0.5^2 * ln 2
        want_cls += ((cared * 3 - pos) * 0.75 + pos * 0.25) * 0.25 * ln2 / pos
        tgt = t["reg_targets"][b][lab > 0].double()
        diff = torch.cat([-tgt[:, :6], -torch.sin(tgt[:, 6:7])], 1).abs()  # sin(0 - target yaw residual)
        want_box += torch.where(diff < 1 / 9, 4.5 * diff ** 2, diff - 1 / 18).sum().item() / pos
    assert terms["loss_cls"].item() == pytest.approx(want_cls / 2, rel=1e-5)
    assert terms["loss_box"].item() == pytest.approx(2.0 * want_box / 2, rel=1e-5)
    assert terms["loss_dir"].item() == pytest.approx(0.2 * ln2, rel=1e-5)  # cross entropy ln 2 per positive
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


def test_anchor_head_errors():
    head = anchor_head()
    with pytest.raises(ValueError, match="BEV map"):
        head(torch.zeros(1, 8, MAP[0], MAP[1]))  # [B, C, X, Y]: transposed
    with pytest.raises(ValueError, match="gt_boxes"):
        head.assign_targets(torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="class_names"):
        AnchorHeadSingle(8, "Car", PR, VS, MAP)
    with pytest.raises(ValueError, match="point_range"):
        AnchorHeadSingle(8, CLASSES, PR[:5], VS, MAP)
    with pytest.raises(ValueError, match="in_channels"):
        AnchorHeadSingle(0, CLASSES, PR, VS, MAP)


# ---------------------------------------------------------------------------------------------- center head
def center_head(cls=CenterHead, **kw):
    return cls(8, CLASSES, PR, VS, MAP, shared_channels=8, **kw)


def centre_gt():
    return torch.tensor([[[5.1, -3.3, -1.0, 3.9, 1.6, 1.5, 0.4, 1],
                          [12.0, 4.0, -0.8, 0.8, 0.6, 1.7, -2.0, 2],
                          [20.3, 8.9, -0.7, 1.8, 0.6, 1.7, 3.0, 3],
                          [0, 0, 0, 0, 0, 0, 0, 0]]])


def test_gaussian_radius_closed_form():
    # CenterPoint's gaussian_radius: the smallest root (b + sqrt(b^2 - 4ac)) / 2 of three quadratics
    # (sic: not divided by 2a, as in CenterNet's code). For 10 x 10 at min_overlap 0.1 the third wins.
    a3, b3, c3 = 0.4, -4.0, -90.0
    want = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    assert gaussian_radius(torch.tensor([10.0]), torch.tensor([10.0]), 0.1).item() == pytest.approx(want, rel=1e-6)
    rng = np.random.default_rng(0)
    for h, w, o in zip(rng.uniform(0.2, 20, 50), rng.uniform(0.2, 20, 50), rng.uniform(0.05, 0.9, 50)):
        r1 = ((h + w) + math.sqrt((h + w) ** 2 - 4 * w * h * (1 - o) / (1 + o))) / 2
        r2 = (2 * (h + w) + math.sqrt(4 * (h + w) ** 2 - 16 * (1 - o) * w * h)) / 2
        r3 = (-2 * o * (h + w) + math.sqrt(4 * o * o * (h + w) ** 2 - 16 * o * (o - 1) * w * h)) / 2
        got = gaussian_radius(torch.tensor([h], dtype=torch.float64), torch.tensor([w], dtype=torch.float64), o)
        assert got.item() == pytest.approx(min(r1, r2, r3), rel=1e-12)


def test_heatmap_targets():
    head = center_head()
    gt = centre_gt()
    t = head.assign_targets(gt)
    hm = t["heatmap"][0]
    assert hm.shape == (3, MAP[1], MAP[0])
    for k in range(3):
        i, j = int((gt[0, k, 0] - PR[0]) // 1.6), int((gt[0, k, 1] - PR[1]) // 1.6)
        c = int(gt[0, k, 7]) - 1
        assert hm[c, j, i] == 1.0  # the peak, exactly 1, at the centre cell
        assert t["index"][0, k] == j * MAP[0] + i and t["mask"][0, k]
        r = max(int(gaussian_radius(gt[0, k, 3:4] / 1.6, gt[0, k, 4:5] / 1.6, 0.1)), 2)
        sigma = (2 * r + 1) / 6
        assert hm[c, j, i - 1].item() == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), rel=1e-5)
        assert hm[c, j - 1, i - 1].item() == pytest.approx(math.exp(-2 / (2 * sigma ** 2)), rel=1e-5)
        assert hm[c, j, i - r].item() == pytest.approx(math.exp(-r * r / (2 * sigma ** 2)), rel=1e-5)
        assert hm[c, j, i - r - 1] == 0  # outside the (2r + 1) window
    assert (hm == 1).sum() == 3 and not t["mask"][0, 3]
    cells = torch.stack([t["index"][0, :3] % MAP[0], t["index"][0, :3] // MAP[0]], 1)
    dec = decode_center_boxes(t["target"][0, :3], cells, PR, VS, 8)
    assert torch.allclose(dec[:, :6], gt[0, :3, :6], atol=1e-5)
    assert wrapped_diff(dec[:, 6], gt[0, :3, 6]).max() < 1e-5


def test_center_loss_closed_form():
    head = center_head()
    gt = centre_gt()
    t = head.assign_targets(gt)
    zeros = {k: torch.zeros(1, c, MAP[1], MAP[0]) for k, c in (("hm", 3), ("center", 2), ("center_z", 1),
                                                               ("dim", 3), ("rot", 2))}
    _, terms = head.loss(zeros, gt)
    hm = t["heatmap"].double()
    peaks = (hm == 1).double()
    # p = 0.5: a peak costs ln 2 * 0.25, any other cell ln 2 * 0.25 * (1 - target)^4; divided by the peaks
    want_hm = (math.log(2) * 0.25 * (peaks + (1 - peaks) * (1 - hm) ** 4)).sum() / peaks.sum()
    assert terms["loss_hm"].item() == pytest.approx(want_hm.item(), rel=1e-5)
    want_loc = 2.0 * t["target"][0, :3].abs().sum().item() / 3  # L1 per code over the 3 boxes, summed, x 2
    assert terms["loss_loc"].item() == pytest.approx(want_loc, rel=1e-5)


def maps_from_targets(head, gt):
    """Prediction maps that say exactly the targets: peaks at the centre cells, codes there."""
    t = head.assign_targets(gt)
    preds = {"hm": torch.full((1, 3, MAP[1], MAP[0]), -10.0)}
    codes = torch.zeros(1, 8, MAP[1] * MAP[0])
    for k in range(int(t["mask"][0].sum())):
        pix = t["index"][0, k]
        preds["hm"][0, int(gt[0, k, 7]) - 1].view(-1)[pix] = 8.0 - k  # distinct scores
        codes[0, :, pix] = t["target"][0, k]
    codes = codes.view(1, 8, MAP[1], MAP[0])
    preds.update(center=codes[:, :2], center_z=codes[:, 2:3], dim=codes[:, 3:6], rot=codes[:, 6:8])
    return preds


@pytest.mark.parametrize("nms_type,agnostic", [("rotated", True), ("rotated", False), ("circle", True),
                                               ("circle", False), ("none", True)])
def test_center_predict_recovers_boxes(nms_type, agnostic):
    radius = 1.0 if agnostic else {1: 1.0, 2: 0.5, 3: 0.5}
    head = center_head(nms_type=nms_type, circle_radius=radius, class_agnostic_nms=agnostic,
                       score_threshold=0.5).eval()
    gt = centre_gt()
    dets = head.predict(maps_from_targets(head, gt))[0]
    assert dets["boxes"].dtype == torch.float32 and dets["labels"].dtype == torch.int64
    assert dets["labels"].tolist() == [1, 2, 3]  # scores 8, 7, 6 in that order
    assert torch.allclose(dets["boxes"][:, :6], gt[0, :3, :6], atol=1e-5)
    assert wrapped_diff(dets["boxes"][:, 6], gt[0, :3, 6]).max() < 1e-5
    assert torch.allclose(dets["scores"], torch.sigmoid(torch.tensor([8.0, 7.0, 6.0])))
    head.post_center_range = (0.0, -9.6, -3.0, 15.0, 9.6, 1.0)  # drops the box at x = 20.3
    assert head.predict(maps_from_targets(head, gt))[0]["labels"].tolist() == [1, 2]


def test_center_attn_starts_as_identity_and_assigns_nearest():
    torch.manual_seed(0)
    head = center_head(CenterHeadAttn, refine_k=40, top_k=40, score_threshold=0.0, nms_type="none").eval()
    with torch.no_grad():
        preds = head(torch.randn(2, 8, MAP[1], MAP[0]))
    refined = head.predict(preds)
    plain = CenterHead.predict(head, preds)
    for r, p in zip(refined, plain):
        assert torch.allclose(r["scores"], p["scores"]) and torch.equal(r["labels"], p["labels"])
        assert torch.allclose(r["boxes"], p["boxes"], atol=1e-5)
    # nearest same-class centre within assign_radius
    boxes = torch.tensor([[[0.0, 0, 0, 1, 1, 1, 0], [5.0, 0, 0, 1, 1, 1, 0], [9.0, 9, 0, 1, 1, 1, 0]]])
    labels = torch.tensor([[1, 1, 2]])
    gt = torch.tensor([[[1.5, 0, 0, 2, 2, 2, 0, 1], [0.5, 0.5, 0, 3, 3, 3, 0, 2], [4.0, 0, 0, 4, 4, 4, 0, 1],
                        [9.0, 9, 0, 1, 1, 1, 0, 0]]])
    pos, matched = head.assign_candidates(boxes, labels, gt)
    assert pos.tolist() == [[True, True, False]]  # the third's only box at distance 0 is padding
    assert torch.equal(matched[0, 0], gt[0, 0, :7]) and torch.equal(matched[0, 1], gt[0, 2, :7])


# ---------------------------------------------------------------------------------------------- detectors
def crop_sample(seed):
    s = simulate_scan(seed, "vlp32c")
    p, b = s.points, s.boxes
    keep = np.all((p[:, :3] >= PR[:3]) & (p[:, :3] < PR[3:]), 1)
    inb = (b[:, 0] >= PR[0]) & (b[:, 0] <= PR[3]) & (b[:, 1] >= PR[1]) & (b[:, 1] <= PR[4])
    labels = np.array([CLASSES.index(n) + 1 if n in CLASSES else 0 for n in s.names], np.int64)
    return {"points": p[keep], "gt_boxes": b[inb].astype(np.float32), "gt_labels": labels[inb]}


@pytest.fixture(scope="module")
def batch():
    out = collate([crop_sample(0), crop_sample(1)], VS, PR)
    assert (out["gt_boxes"][..., 7] > 0).sum() >= 4
    return out


SMALL = dict(bev_layer_nums=(1, 1), bev_num_filters=(32, 64), bev_num_upsample_filters=(64, 64))
DETECTORS = {
    "second": dict(SMALL),
    "centerpoint": dict(SMALL, head_kwargs={"shared_channels": 32}),
    "centerpoint_attn": dict(SMALL, backbone_kwargs={"n_blocks": 1}, head_kwargs={"shared_channels": 32,
                                                                                   "refine_k": 32}),
}


def make(name, **kw):
    torch.manual_seed(0)
    return M.create_model(name, class_names=CLASSES, point_range=PR, voxel_size=VS, in_channels=4,
                          **DETECTORS[name], **kw)


def grads(module):
    g = [p.grad for p in module.parameters() if p.grad is not None]
    assert g and all(torch.isfinite(x).all() for x in g)
    return sum(float(x.abs().sum()) for x in g)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_trains_and_predicts(name, batch):
    net = make(name)
    assert net.class_names == CLASSES and net.grid_size == (128, 96, 20)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    losses = []
    for step in range(10):
        opt.zero_grad()
        out = net(batch)
        loss = out["loss"]
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in out["terms"].values())
        assert float(sum(out["terms"].values())) == pytest.approx(loss.item(), rel=1e-5)
        loss.backward()
        if step in (0, 9):
            assert grads(net.dense_head) > 0 and grads(net.backbone_2d) > 0
            assert grads(net.backbone_3d.conv_input) > 0  # through the whole backbone
            if name == "centerpoint_attn" and step == 9:  # the zero-initialised refinement heads moved
                assert grads(net.dense_head.refine_layers) > 0
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses

    # BatchNorm running statistics after 10 steps are far from the batch statistics; make them those of
    # this batch (a cumulative average over one pass) so that eval mode sees the trained network.
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net(batch)
    net.eval()
    net.dense_head.score_threshold = 0.0
    with torch.no_grad():
        preds = net(batch)
    assert isinstance(preds, list) and len(preds) == 2
    for p in preds:
        assert set(p) == {"boxes", "scores", "labels"}
        k = len(p["scores"])
        assert k > 0
        assert p["boxes"].shape == (k, 7) and p["boxes"].dtype == torch.float32
        assert p["scores"].dtype == torch.float32 and p["labels"].dtype == torch.int64
        assert ((p["scores"] >= 0) & (p["scores"] <= 1)).all()
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
        assert ((p["labels"] >= 1) & (p["labels"] <= 3)).all()
        assert torch.isfinite(p["boxes"]).all() and (p["boxes"][:, 3:6] > 0).all()


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_empty_scene(name, batch):
    net = make(name).train()
    for gt in (torch.zeros(2, 0, 8), torch.cat([batch["gt_boxes"][:1], torch.zeros_like(batch["gt_boxes"][:1])])):
        empty = dict(batch, gt_boxes=gt)
        net.zero_grad()
        out = net(empty)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        assert grads(net) > 0


def test_bev_orientation_single_point():
    """One point at (x, y): the BEV map the head sees is non-zero only near cell (i, j) = ((x - x0), (y - y0)) / 1.6
    at index [..., j, i] (rows y, columns x)."""
    net = make("second").eval()
    pts = np.array([[20.1, -7.9, -1.0, 0.5]], np.float32)
    b = collate([{"points": pts, "gt_boxes": np.zeros((0, 7), np.float32)}], VS, PR)
    with torch.no_grad():
        bev = M.height_compression(net.backbone_3d(b["voxels"])["encoded"])
    assert bev.shape[2:] == (MAP[1], MAP[0])
    j, i = (bev[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    ci, cj = int((20.1 - PR[0]) // 1.6), int((-7.9 - PR[1]) // 1.6)  # (12, 1)
    assert len(i) > 0 and (i - ci).abs().max() <= 1 and (j - cj).abs().max() <= 1


def test_detector_errors(batch):
    with pytest.raises(ValueError, match="class_names"):
        M.create_model("second", class_names=(), point_range=PR, voxel_size=VS, in_channels=4)
    with pytest.raises(ValueError, match="voxel_size"):
        M.create_model("centerpoint", class_names=CLASSES, point_range=PR, voxel_size=(0.2, 0.2), in_channels=4)
    with pytest.raises(ValueError, match="in_channels"):
        M.create_model("second", class_names=CLASSES, point_range=PR, voxel_size=VS, in_channels=2)
    with pytest.raises(ValueError, match="BEV neck"):
        M.create_model("second", class_names=CLASSES, point_range=PR, voxel_size=VS, in_channels=4,
                       bev_layer_strides=(2, 2))
    net = make("second").train()
    other = collate([crop_sample(0)], (0.4, 0.4, 0.2), PR)
    with pytest.raises(ValueError, match="grid"):
        net(other)
    with pytest.raises(ValueError, match="gt_boxes"):
        net({k: v for k, v in batch.items() if k != "gt_boxes"})
    assert {"second", "centerpoint", "centerpoint_attn"} <= set(M.list_models())
