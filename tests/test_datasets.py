"""sparseconv.datasets: KITTI detection and SemanticKITTI loading, box conversion, augmentation,
ground-truth sampling, batching, and the errors for bad files.

Expected values come from hand derivations written next to them, from the raw files read
independently (``np.fromfile``, splitting label lines), or from point-in-box tests written here.
The real KITTI frames under ``../shared/data/kitti`` are used when present (never copied).
"""
from __future__ import annotations

import math
import os
from functools import partial

import numpy as np
import pytest
import torch

import sparseconv
from sparseconv.datasets import (
    CLASS_NAMES,
    LEARNING_MAP,
    LEARNING_MAP_INV,
    Compose,
    GlobalRotation,
    GlobalScaling,
    GlobalTranslation,
    GTDatabase,
    GTSampler,
    KittiDetection,
    RandomFlip,
    RandomPointDropout,
    SemanticKitti,
    boxes_bev_overlap,
    camera_boxes_to_lidar,
    collate,
    flip_scene,
    fov_mask,
    kitti_difficulty,
    lidar_boxes_to_camera,
    read_kitti_calib,
    read_kitti_labels,
    rotate_scene,
    scale_scene,
    translate_scene,
)
from sparseconv.datasets.semantic_kitti import RAW_LABELS
from sparseconv.io import PointCloudError

KITTI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kitti")
HAVE_KITTI = all(os.path.isdir(os.path.join(KITTI, d)) for d in ("velodyne", "label_2", "calib"))
needs_kitti = pytest.mark.skipif(not HAVE_KITTI, reason="../shared/data/kitti is absent")


# =============================================================================== helpers (independent of the module)
def inside(points, boxes, margin=0.0):
    """bool [N, M]: the point, in the box frame (rotate by -yaw about the centre), is within the half sizes."""
    p = np.asarray(points, np.float64)[:, :3]
    out = np.zeros((len(p), len(boxes)), bool)
    for j, (x, y, z, dx, dy, dz, yaw) in enumerate(np.asarray(boxes, np.float64)[:, :7]):
        ux, uy = p[:, 0] - x, p[:, 1] - y
        lx = ux * math.cos(yaw) + uy * math.sin(yaw)
        ly = -ux * math.sin(yaw) + uy * math.cos(yaw)
        out[:, j] = (abs(lx) <= dx / 2 + margin) & (abs(ly) <= dy / 2 + margin) & (abs(p[:, 2] - z) <= dz / 2 + margin)
    return out


def near_rotation(seed=0):
    """A proper rotation close to identity (like KITTI's R0_rect)."""
    a = np.eye(3) + 0.01 * np.random.default_rng(seed).standard_normal((3, 3))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))[None, :]
    return q if np.linalg.det(q) > 0 else -q


# LiDAR (x fwd, y left, z up) -> camera (x right, y down, z fwd): cam = (-y, -z, x) + t
PERM = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
P2 = np.array([[700.0, 0.0, 600.0, 0.0], [0.0, 700.0, 180.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


def write_calib(path, r0=np.eye(3), t=(0.0, 0.0, 0.0), p2=P2, skip=()):
    tr = np.c_[PERM, np.asarray(t, np.float64)]
    entries = {"P0": P2, "P1": P2, "P2": p2, "P3": P2, "R0_rect": r0, "Tr_velo_to_cam": tr,
               "Tr_imu_to_velo": np.c_[np.eye(3), np.zeros(3)]}
    lines = [f"{k}: " + " ".join(f"{v:.12e}" for v in np.ravel(m)) for k, m in entries.items() if k not in skip]
    path.write_text("\n".join(lines) + "\n")
    return {"R0_rect": np.asarray(r0), "Tr_velo_to_cam": tr, "P2": p2}


def label_line(name, box, r0, t, occluded=0, truncated=0.0, bbox_h=50.0):
    """A label_2 line for a LiDAR box, by the forward formulas: bottom centre to the camera, ry = -yaw - pi/2."""
    x, y, z, dx, dy, dz, yaw = box
    cam = np.asarray(r0) @ (PERM @ np.array([x, y, z - dz / 2]) + np.asarray(t))
    ry = -yaw - np.pi / 2
    return (f"{name} {truncated:.2f} {occluded} 0.00 100.00 100.00 200.00 {100 + bbox_h:.2f} {dz:.6f} {dy:.6f} "
            f"{dx:.6f} {cam[0]:.6f} {cam[1]:.6f} {cam[2]:.6f} {ry:.6f}")


def scene(seed=0, n_boxes=4, per_box=60, n_out=400):
    """Boxes, points strictly inside them (|local| <= 0.45 size) and points clearly outside every box."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((n_boxes, 7))
    boxes[:, 0] = np.arange(n_boxes) * 8.0 + 5.0
    boxes[:, 1] = rng.uniform(-5, 5, n_boxes)
    boxes[:, 2] = rng.uniform(-1.5, 0.0, n_boxes)
    boxes[:, 3:6] = rng.uniform([3.0, 1.5, 1.4], [4.5, 2.0, 1.8], (n_boxes, 3))
    boxes[:, 6] = rng.uniform(-np.pi, np.pi, n_boxes)
    pts = []
    for b in boxes:
        local = rng.uniform(-0.45, 0.45, (per_box, 3)) * b[3:6]
        c, s = math.cos(b[6]), math.sin(b[6])
        pts.append(np.c_[local[:, 0] * c - local[:, 1] * s + b[0], local[:, 0] * s + local[:, 1] * c + b[1],
                         local[:, 2] + b[2]])
    out = rng.uniform([-10, -20, -3], [40, 20, 2], (n_out * 3, 3))
    out = out[~inside(out, boxes, margin=0.1).any(1)][:n_out]
    xyz = np.concatenate(pts + [out])
    points = np.c_[xyz, rng.random(len(xyz))].astype(np.float32)
    return {"points": points, "gt_boxes": boxes.astype(np.float32), "gt_names": np.array(["Car"] * n_boxes),
            "gt_labels": np.ones(n_boxes, np.int64), "gt_difficulty": np.zeros(n_boxes, np.int64), "frame_id": "x"}


def front_markers(boxes):
    """A point 0.4 * length ahead of each box centre along its heading."""
    b = np.asarray(boxes, np.float64)
    return np.c_[b[:, 0] + 0.4 * b[:, 3] * np.cos(b[:, 6]), b[:, 1] + 0.4 * b[:, 3] * np.sin(b[:, 6]), b[:, 2],
                 np.zeros(len(b))]


# =============================================================================== real KITTI
@needs_kitti
def test_real_kitti_frames_load():
    ds = KittiDetection(KITTI)  # flat layout, no ImageSets: every frame
    frames = sorted(f[:-4] for f in os.listdir(os.path.join(KITTI, "velodyne")) if f.endswith(".bin"))
    assert ds.layout == "flat" and ds.frame_ids == frames
    for i, fid in enumerate(frames):
        s = ds[i]
        path = os.path.join(KITTI, "velodyne", fid + ".bin")
        assert s["points"].dtype == np.float32 and s["points"].shape == (os.path.getsize(path) // 16, 4)
        np.testing.assert_array_equal(s["points"], np.fromfile(path, "<f4").reshape(-1, 4))
        with open(os.path.join(KITTI, "label_2", fid + ".txt")) as f:
            rows = [line.split() for line in f if line.strip()]
        care = [r for r in rows if r[0] != "DontCare"]
        dontcare = [r for r in rows if r[0] == "DontCare"]
        assert s["gt_names"].tolist() == [r[0] for r in care] and "DontCare" not in s["gt_names"]
        assert s["gt_boxes"].shape == (len(care), 7)
        # dimensions (h, w, l) -> (dx, dy, dz) = (l, w, h)
        np.testing.assert_allclose(s["gt_boxes"][:, 3:6], [[float(r[10]), float(r[9]), float(r[8])] for r in care],
                                   rtol=1e-6)
        expected = [{"Car": 1, "Pedestrian": 2, "Cyclist": 3}.get(r[0], 0) for r in care]
        assert s["gt_labels"].tolist() == expected
        np.testing.assert_allclose(s["dontcare"]["bbox"],
                                   np.array([[float(v) for v in r[4:8]] for r in dontcare]).reshape(-1, 4))
        assert len(s["dontcare"]["name"]) == len(dontcare)
        assert s["annos"]["occluded"].tolist() == [int(r[2]) for r in care]


@needs_kitti
def test_real_kitti_boxes_hold_their_points():
    ds = KittiDetection(KITTI)
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        for j, box in enumerate(s["gt_boxes"]):
            if s["gt_labels"][j] == 0 or s["annos"]["occluded"][j] > 1 or np.hypot(box[0], box[1]) > 40:
                continue
            n = inside(s["points"], box[None]).sum()
            assert n >= 5, f"{s['frame_id']}: {s['gt_names'][j]} at {box[:3]} holds {n} points"
            checked += 1
    assert checked >= 2  # 000000's pedestrian and 000002's car


@needs_kitti
def test_real_kitti_fov_crop():
    full, fov = KittiDetection(KITTI), KittiDetection(KITTI, fov_only=True)
    for i in range(len(full)):
        a, b = full[i], fov[i]
        calib = a["calib"]
        # independent projection: [u v 1] * d = P2 [R0 0; 0 1] [Tr; 0 0 0 1] [x y z 1]
        xyz1 = np.c_[a["points"][:, :3].astype(np.float64), np.ones(len(a["points"]))]
        cam = calib["R0_rect"] @ (calib["Tr_velo_to_cam"] @ xyz1.T)
        img = calib["P2"] @ np.vstack([cam, np.ones(len(xyz1))])
        u, v = img[0] / img[2], img[1] / img[2]
        keep = (cam[2] > 0) & (u >= 0) & (u < 1242) & (v >= 0) & (v < 375)
        np.testing.assert_array_equal(b["points"], a["points"][keep])
        assert 0.1 < keep.mean() < 0.3  # the camera sees about a sixth of the 360 degree scan
        assert b["image_size"] == (1242, 375)


@needs_kitti
def test_real_kitti_gt_database():
    ds = KittiDetection(KITTI)
    db = GTDatabase.build(ds)  # Car / Pedestrian / Cyclist, >= 5 points, difficulty -1 excluded
    # 000000: Pedestrian (easy); 000001: Car and Cyclist are difficulty -1 (21.6 px tall; occluded 3);
    # 000002: Car (33.3 px tall, occluded 0: moderate); Misc is not a class
    assert sorted(db.names.tolist()) == ["Car", "Pedestrian"]
    for k in range(len(db)):
        pts = db.object_points(k)[:, :3] + db.boxes[k, :3]
        assert inside(pts, db.boxes[k:k + 1], margin=1e-4).all() and len(pts) >= 5


# =============================================================================== camera <-> LiDAR by hand
def test_camera_to_lidar_by_hand(tmp_path):
    # R0 = I, Tr = [PERM | t], t = (0.1, -0.2, 0.3): cam = PERM @ lidar + t, so lidar = PERM.T @ (cam - t):
    # lidar x = cam_z - 0.3, lidar y = -(cam_x - 0.1), lidar z = -(cam_y + 0.2).
    t = (0.1, -0.2, 0.3)
    calib = write_calib(tmp_path / "calib.txt", t=t)
    (tmp_path / "label.txt").write_text(
        # type trunc occ alpha bbox(4) h w l x y z ry
        "Car 0.00 0 0.00 100 100 200 150 1.50 1.60 3.90 2.00 1.70 20.00 0.30\n"
        "Pedestrian 0.00 0 0.00 100 100 200 150 1.80 0.60 0.80 -1.00 1.60 8.00 1.5707963267948966\n"
        "Cyclist 0.00 0 0.00 100 100 200 150 1.70 0.50 1.90 0.00 1.50 12.00 -1.5707963267948966\n"
        "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10\n")
    labels = read_kitti_labels(str(tmp_path / "label.txt"))
    got = camera_boxes_to_lidar(labels, read_kitti_calib(str(tmp_path / "calib.txt")))
    expected = np.array([
        # Car: bottom (20 - 0.3, -(2 - 0.1), -(1.7 + 0.2)) = (19.7, -1.9, -1.9), centre z + h/2 = -1.15;
        # (dx, dy, dz) = (l, w, h); yaw = -0.3 - pi/2
        [19.7, -1.9, -1.15, 3.9, 1.6, 1.5, -0.3 - np.pi / 2],
        # Pedestrian: (8 - 0.3, -(-1 - 0.1), -(1.6 + 0.2) + 0.9); ry = pi/2 -> yaw = -pi (faces -x: camera -z)
        [7.7, 1.1, -0.9, 0.8, 0.6, 1.8, -np.pi],
        # Cyclist: (12 - 0.3, -(0 - 0.1), -(1.5 + 0.2) + 0.85); ry = -pi/2 -> yaw = 0 (faces +x: camera +z)
        [11.7, 0.1, -0.85, 1.9, 0.5, 1.7, 0.0],
    ])
    np.testing.assert_allclose(got, expected, atol=1e-9)
    # and back: the camera fields of the label file
    cam = lidar_boxes_to_camera(expected, calib)
    np.testing.assert_allclose(cam["location"], [[2.0, 1.7, 20.0], [-1.0, 1.6, 8.0], [0.0, 1.5, 12.0]], atol=1e-9)
    np.testing.assert_allclose(cam["dimensions"], labels["dimensions"], atol=1e-12)
    # ry = -yaw - pi/2 wrapped to [-pi, pi): yaw = -0.3 - pi/2 gives 0.3; yaw = -pi gives pi/2; yaw = 0 gives -pi/2
    np.testing.assert_allclose(cam["rotation_y"], [0.3, np.pi / 2, -np.pi / 2], atol=1e-9)


def test_lidar_camera_round_trip():
    rng = np.random.default_rng(3)
    r0 = near_rotation(1)
    calib = {"R0_rect": r0, "Tr_velo_to_cam": np.c_[PERM @ near_rotation(2), [0.02, -0.07, -0.3]], "P2": P2}
    boxes = np.c_[rng.uniform([0, -30, -2], [70, 30, 1], (50, 3)), rng.uniform(0.5, 5, (50, 3)),
                  rng.uniform(-np.pi, np.pi, 50)]
    back = camera_boxes_to_lidar(lidar_boxes_to_camera(boxes, calib), calib)
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(np.angle(np.exp(1j * (back[:, 6] - boxes[:, 6]))), 0, atol=1e-9)
    assert (back[:, 6] >= -np.pi).all() and (back[:, 6] < np.pi).all()


def test_fov_mask_by_hand():
    # R0 = I, t = 0: lidar (x, y, z) -> camera (-y, -z, x); u = 700 * (-y) / x + 600, v = 700 * (-z) / x + 180
    calib = {"R0_rect": np.eye(3), "Tr_velo_to_cam": np.c_[PERM, np.zeros(3)], "P2": P2}
    pts = np.array([
        [10, 0, 0],      # u 600, v 180: in
        [10, -9.1, 0],   # u 637 + 600 = 1237 < 1242: in
        [10, -9.2, 0],   # u 644 + 600 = 1244: out
        [10, 0, -3],     # v 210 + 180 = 390 >= 375: out
        [10, 0, 2.5],    # v -175 + 180 = 5: in
        [-10, 0, 0],     # behind the camera: out
        [10, 8.6, 0],    # u -602 + 600 = -2 < 0: out
    ], np.float64)
    assert fov_mask(pts, calib).tolist() == [True, True, False, False, True, False, False]
    # a wider image keeps the 1244 px point
    assert fov_mask(pts, calib, (1300, 375)).tolist()[2]


def test_kitti_difficulty_rules():
    bbox = lambda h: [0, 100, 10, 100 + h]  # noqa: E731
    labels = {
        "bbox": np.array([bbox(40), bbox(39.9), bbox(40), bbox(40), bbox(25), bbox(25), bbox(24.9), bbox(60),
                          bbox(60)]),
        "occluded": np.array([0, 0, 1, 0, 2, 2, 0, 3, 0]),
        "truncated": np.array([0.15, 0.0, 0.0, 0.16, 0.5, 0.51, 0.0, 0.0, 0.3]),
    }
    # 40px/occ0/trunc.15: easy; 39.9px: moderate; occ1: moderate; trunc .16: moderate; 25px/occ2/trunc.5: hard;
    # trunc .51: none; 24.9px: none; occ3: none; trunc .3: moderate
    assert kitti_difficulty(labels).tolist() == [0, 1, 1, 1, 2, -1, -1, -1, 1]


# =============================================================================== synthetic KITTI folders
def make_kitti(root, frames=2, flat=True, seed=0, n_points=1500):
    """A KITTI folder with synthetic frames: LiDAR boxes written to label_2 by the forward formulas."""
    base = root if flat else root / "training"
    for d in ("velodyne", "label_2", "calib"):
        (base / d).mkdir(parents=True, exist_ok=True)
    r0, t = near_rotation(seed), (0.02, -0.07, -0.3)
    truth = []
    for f in range(frames):
        fid = f"{f:06d}"
        s = scene(seed + f, n_boxes=3, per_box=80, n_out=n_points)
        names = ["Car", "Pedestrian", "Van"]
        s["points"].astype("<f4").tofile(base / "velodyne" / f"{fid}.bin")
        write_calib(base / "calib" / f"{fid}.txt", r0=r0, t=t)
        lines = [label_line(n, b, r0, t) for n, b in zip(names, s["gt_boxes"].astype(np.float64))]
        lines.append("DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10")
        (base / "label_2" / f"{fid}.txt").write_text("\n".join(lines) + "\n")
        truth.append((s, names))
    return truth


def test_kitti_synthetic_flat_layout(tmp_path):
    truth = make_kitti(tmp_path, frames=2)
    ds = KittiDetection(tmp_path)
    assert len(ds) == 2
    for i, (s, names) in enumerate(truth):
        got = ds[i]
        np.testing.assert_array_equal(got["points"], s["points"])
        np.testing.assert_allclose(got["gt_boxes"][:, :6], s["gt_boxes"][:, :6], atol=1e-4)
        np.testing.assert_allclose(np.angle(np.exp(1j * (got["gt_boxes"][:, 6] - s["gt_boxes"][:, 6]))), 0, atol=1e-4)
        assert got["gt_names"].tolist() == names and got["gt_labels"].tolist() == [1, 2, 0]  # Van: not a class
        assert got["gt_difficulty"].tolist() == [0, 0, 0]  # 50 px tall, not occluded or truncated
        assert got["dontcare"]["name"].tolist() == ["DontCare"] and got["dontcare"]["difficulty"].tolist() == [-1]
        # every written point of a box is found inside the loaded box
        assert (inside(got["points"], got["gt_boxes"], margin=1e-3).sum(0) >= 80).all()


def test_kitti_official_layout_and_splits(tmp_path):
    make_kitti(tmp_path, frames=3, flat=False)
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "train.txt").write_text("000000\n000002\n")
    (tmp_path / "ImageSets" / "val.txt").write_text("000001\n")
    train, val = KittiDetection(tmp_path, "train"), KittiDetection(tmp_path, "val")
    assert train.layout == "official" and train.frame_ids == ["000000", "000002"] and val.frame_ids == ["000001"]
    assert train[1]["frame_id"] == "000002" and len(KittiDetection(tmp_path, None)) == 3
    with pytest.raises(FileNotFoundError, match=r"ImageSets.trainval\.txt"):
        KittiDetection(tmp_path, "trainval")
    # point_range: points with min <= p < max, boxes whose centre is inside
    pr = (0.0, -10.0, -3.0, 15.0, 10.0, 2.0)
    s = KittiDetection(tmp_path, "train", point_range=pr)[0]
    full = KittiDetection(tmp_path, "train")[0]
    xyz = full["points"][:, :3]
    keep = (xyz >= pr[:3]).all(1) & (xyz < pr[3:]).all(1)
    np.testing.assert_array_equal(s["points"], full["points"][keep])
    c = full["gt_boxes"][:, :3]
    np.testing.assert_array_equal(s["gt_boxes"], full["gt_boxes"][(c >= pr[:3]).all(1) & (c <= pr[3:]).all(1)])
    assert len(s["gt_boxes"]) < len(full["gt_boxes"])  # box centres are at x = 5, 13, 21


# =============================================================================== SemanticKITTI
def make_semantic_kitti(root):
    """Sequence 00 with two scans and hand-made labels; sequence 11 without labels (test split)."""
    rng = np.random.default_rng(0)
    raw = {
        "000000": ([10, 252, 60, 99, 40], [1, 2, 0, 0, 0]),
        "000001": ([0, 1, 254, 253, 81, 72, 259], [0, 0, 3, 4, 0, 0, 5]),
    }
    for seq, with_labels in (("00", True), ("11", False)):
        (root / "sequences" / seq / "velodyne").mkdir(parents=True)
        if with_labels:
            (root / "sequences" / seq / "labels").mkdir()
        for name, (sem, ins) in raw.items():
            pts = rng.normal(size=(len(sem), 4)).astype("<f4")
            pts.tofile(root / "sequences" / seq / "velodyne" / f"{name}.bin")
            if with_labels:  # uint32: semantic id in the low 16 bits, instance id in the high 16
                (np.array(sem, "<u4") | (np.array(ins, "<u4") << 16)).astype("<u4").tofile(
                    root / "sequences" / seq / "labels" / f"{name}.label")
    return raw


def test_semantic_kitti_tiny_sequence(tmp_path):
    make_semantic_kitti(tmp_path)
    ds = SemanticKitti(tmp_path, sequences=[0])
    assert len(ds) == 2 and ds.frame_ids == ["00/000000", "00/000001"]
    a, b = ds[0], ds[1]
    # learning map by hand (semantic-kitti.yaml): car 10 -> 1, moving-car 252 -> car 1, lane-marking 60 -> road 9,
    # other-object 99 -> 0, road 40 -> 9
    assert a["labels"].dtype == np.int64 and a["labels"].tolist() == [1, 1, 9, 0, 9]
    assert a["instance"].tolist() == [1, 2, 0, 0, 0]
    # unlabeled 0 -> 0, outlier 1 -> 0, moving-person 254 -> person 6, moving-bicyclist 253 -> bicyclist 7,
    # traffic-sign 81 -> 19, terrain 72 -> 17, moving-other-vehicle 259 -> other-vehicle 5
    assert b["labels"].tolist() == [0, 0, 6, 7, 19, 17, 5]
    assert b["instance"].tolist() == [0, 0, 3, 4, 0, 0, 5]
    np.testing.assert_array_equal(
        a["points"], np.fromfile(tmp_path / "sequences" / "00" / "velodyne" / "000000.bin", "<f4").reshape(-1, 4))
    # the test sequence has no labels
    t = SemanticKitti(tmp_path, sequences=["11"])[1]
    assert "labels" not in t and t["points"].shape == (7, 4) and t["frame_id"] == "11/000001"
    # a custom learning map
    assert SemanticKitti(tmp_path, sequences=["00"], learning_map={10: 3})[0]["labels"].tolist() == [3, 0, 0, 0, 0]


def test_semantic_kitti_tables():
    # every raw id of the official yaml is mapped; the inverse map recovers each training class
    assert set(LEARNING_MAP) == set(RAW_LABELS) and len(LEARNING_MAP) == 34
    assert sorted(set(LEARNING_MAP.values())) == list(range(20)) and len(CLASS_NAMES) == 19
    for i in range(1, 20):
        assert LEARNING_MAP[LEARNING_MAP_INV[i]] == i and RAW_LABELS[LEARNING_MAP_INV[i]] == CLASS_NAMES[i - 1]
    for raw, name in RAW_LABELS.items():  # moving-X maps to X's class
        if name.startswith("moving-") and name not in ("moving-on-rails", "moving-bus"):
            static = name[len("moving-"):]
            assert LEARNING_MAP[raw] == CLASS_NAMES.index(static) + 1, name
    assert CLASS_NAMES[:5] == ("car", "bicycle", "motorcycle", "truck", "other-vehicle")
    assert CLASS_NAMES[8] == "road" and CLASS_NAMES[18] == "traffic-sign"


def test_semantic_kitti_default_splits(tmp_path):
    make_semantic_kitti(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"sequence\(s\) 01, 02, 03, 04, 05, 06, 07, 09, 10 missing"):
        SemanticKitti(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="08"):
        SemanticKitti(tmp_path, "val")
    with pytest.raises(ValueError, match="unknown split"):
        SemanticKitti(tmp_path, "bogus")


# =============================================================================== augmentation
def test_scene_ops_by_hand():
    s = {"points": np.array([[1.0, 2.0, 3.0, 0.5]], np.float32),
         "gt_boxes": np.array([[1.0, 2.0, 3.0, 4.0, 2.0, 1.0, 0.3]], np.float32)}
    # rotation by pi/2: (x, y) -> (-y, x); yaw + pi/2
    r = rotate_scene(s, np.pi / 2)
    np.testing.assert_allclose(r["points"], [[-2, 1, 3, 0.5]], atol=1e-6)
    np.testing.assert_allclose(r["gt_boxes"], [[-2, 1, 3, 4, 2, 1, 0.3 + np.pi / 2]], atol=1e-6)
    # flip along x: y -> -y, yaw -> -yaw; along y: x -> -x, yaw -> pi - yaw
    np.testing.assert_allclose(flip_scene(s, "x")["gt_boxes"], [[1, -2, 3, 4, 2, 1, -0.3]], atol=1e-6)
    np.testing.assert_allclose(flip_scene(s, "y")["gt_boxes"], [[-1, 2, 3, 4, 2, 1, np.pi - 0.3]], atol=1e-6)
    np.testing.assert_allclose(flip_scene(s, "y")["points"], [[-1, 2, 3, 0.5]], atol=1e-6)
    # scale 2: coordinates and sizes double, yaw and intensity kept
    np.testing.assert_allclose(scale_scene(s, 2.0)["gt_boxes"], [[2, 4, 6, 8, 4, 2, 0.3]], atol=1e-6)
    np.testing.assert_allclose(scale_scene(s, 2.0)["points"], [[2, 4, 6, 0.5]], atol=1e-6)
    np.testing.assert_allclose(translate_scene(s, (1, -1, 0.5))["points"], [[2, 1, 3.5, 0.5]], atol=1e-6)
    # the input is not modified
    np.testing.assert_array_equal(s["points"], [[1, 2, 3, 0.5]])
    # yaw wraps into [-pi, pi): 0.3 + pi -> 0.3 - pi
    assert abs(rotate_scene(s, np.pi)["gt_boxes"][0, 6] - (0.3 - np.pi)) < 1e-6


@pytest.mark.parametrize("name, transform", [
    ("rotate", lambda s, rng: rotate_scene(s, 2.1)),
    ("flip_x", lambda s, rng: flip_scene(s, "x")),
    ("flip_y", lambda s, rng: flip_scene(s, "y")),
    ("scale", lambda s, rng: scale_scene(s, 1.07)),
    ("translate", lambda s, rng: translate_scene(s, (0.4, -0.3, 0.2))),
    ("random", Compose([RandomFlip(True, True, 0.5), GlobalRotation((-np.pi, np.pi)), GlobalScaling((0.9, 1.1)),
                        GlobalTranslation((0.5, 0.5, 0.2))])),
])
def test_transforms_keep_points_in_their_boxes(name, transform):
    s = scene(1)
    s["points"] = np.concatenate([s["points"], front_markers(s["gt_boxes"]).astype(np.float32)])
    before = inside(s["points"], s["gt_boxes"])
    for seed in range(4):
        out = transform(s, np.random.default_rng(seed))
        np.testing.assert_array_equal(inside(out["points"], out["gt_boxes"]), before, err_msg=name)
        # the heading follows: the front marker of each box is still 0.4 * length ahead along the new yaw
        m = len(s["gt_boxes"])
        np.testing.assert_allclose(out["points"][-m:, :3], front_markers(out["gt_boxes"])[:, :3], atol=2e-4,
                                   err_msg=name)
        assert (out["gt_boxes"][:, 6] >= -np.pi).all() and (out["gt_boxes"][:, 6] < np.pi).all()


def test_transforms_are_deterministic_per_seed():
    s = scene(2)
    aug = Compose([RandomFlip(True, True), GlobalRotation(), GlobalScaling(), GlobalTranslation(),
                   RandomPointDropout(0.2)])
    a, b, c = aug(s, 5), aug(s, np.random.default_rng(5)), aug(s, 6)
    np.testing.assert_array_equal(a["points"], b["points"])
    np.testing.assert_array_equal(a["gt_boxes"], b["gt_boxes"])
    assert a["points"].shape != c["points"].shape or not np.array_equal(a["points"], c["points"])


def test_point_dropout_rate():
    n = 100_000
    s = {"points": np.random.default_rng(0).random((n, 4)).astype(np.float32), "labels": np.arange(n),
         "instance": np.arange(n) * 2}
    out = RandomPointDropout(0.2)(s, 0)
    kept = len(out["points"]) / n
    assert abs(kept - 0.8) < 0.006  # binomial std sqrt(0.8 * 0.2 / 1e5) = 0.0013: 4.6 sigma
    # labels follow their points
    np.testing.assert_array_equal(out["points"], s["points"][out["labels"]])
    np.testing.assert_array_equal(out["instance"], out["labels"] * 2)


def test_bev_overlap_by_hand():
    a = np.array([[0, 0, 0, 2, 2, 1, 0]], np.float64)
    b = np.array([
        [2.0, 0, 0, 2, 2, 1, 0],            # shares the edge x = 1: touching, not overlapping
        [1.9, 0, 0, 2, 2, 1, 0],            # overlaps by 0.1 m
        [2.3, 2.3, 0, 2, 2, 1, np.pi / 4],  # corners at centre +- (1.414, 0) / (0, 1.414): its edge x + y = 3.186
                                            # passes beyond a's corner (1, 1) (x + y = 2): no overlap, though
                                            # the axis-aligned bounds [0.886, 3.714]^2 and [-1, 1]^2 overlap
        [1.6, 1.6, 0, 2, 2, 1, np.pi / 4],  # edge x + y = 1.786 < 2: a's corner (1, 1) is inside: overlap
        [0, 0, 5, 0.5, 0.5, 1, 1.0],        # inside a in BEV (z does not matter)
    ])
    assert boxes_bev_overlap(a, b).tolist() == [[False, True, False, True, True]]


def _db_dataset(seed=0):
    """A list of synthetic frames with Car / Pedestrian boxes, as a dataset for GTDatabase.build."""
    class Frames(list):
        classes = ("Car", "Pedestrian")

    frames = Frames()
    for f in range(6):
        s = scene(seed + f, n_boxes=4, per_box=30, n_out=200)
        s["gt_names"] = np.array(["Car", "Pedestrian", "Car", "Pedestrian"])
        s["gt_labels"] = np.array([1, 2, 1, 2])
        s["frame_id"] = f"{f:06d}"
        frames.append(s)
    return frames


def test_gt_database_and_sampler(tmp_path):
    frames = _db_dataset()
    db = GTDatabase.build(frames, str(tmp_path / "db.npz"))
    assert len(db) == 24 and db.counts() == {"Car": 12, "Pedestrian": 12}
    loaded = GTDatabase.load(tmp_path / "db.npz")
    np.testing.assert_array_equal(loaded.points, db.points)
    assert loaded.names.tolist() == db.names.tolist() and loaded.classes == ("Car", "Pedestrian")
    for k in range(len(db)):  # the 30 points written inside each box, relative to its centre
        assert len(db.object_points(k)) == 30
    sampler = GTSampler(db, {"Car": 8, "Pedestrian": 6})
    target = frames[0]
    n0 = len(target["gt_boxes"])
    rejected_some = False
    for seed in range(5):
        out = sampler(target, seed)
        boxes = out["gt_boxes"].astype(np.float64)
        new = boxes[n0:]
        assert len(new) >= 1
        assert (out["gt_names"] == "Car").sum() <= 8 and (out["gt_names"] == "Pedestrian").sum() <= 6
        rejected_some |= len(new) < (8 - 2) + (6 - 2)
        assert out["gt_labels"][n0:].tolist() == [1 if n == "Car" else 2 for n in out["gt_names"][n0:]]
        # no two boxes overlap in BEV: 3000 random points inside each pasted box (shrunk by 1 mm) fall in no
        # other box (grown by nothing)
        rng = np.random.default_rng(seed)
        for j in range(n0, len(boxes)):
            b = boxes[j]
            local = rng.uniform(-0.5, 0.5, (3000, 2)) * (b[3:5] - 2e-3)
            c, s_ = math.cos(b[6]), math.sin(b[6])
            probe = np.c_[local[:, 0] * c - local[:, 1] * s_ + b[0], local[:, 0] * s_ + local[:, 1] * c + b[1],
                          np.zeros(3000)]
            flat = boxes.copy()
            flat[:, 2], flat[:, 5] = 0.0, 1.0  # BEV: ignore heights
            hit = inside(probe, np.delete(flat, j, 0))
            assert not hit.any(), f"seed {seed}: pasted box {j} overlaps another box"
        # the pasted points lie in their boxes, come first, and no other scene point is in a pasted box
        npasted = sum(30 for _ in new)
        assert inside(out["points"][:npasted], new, margin=1e-4).any(1).all()
        assert not inside(out["points"][npasted:], new).any()
        # the scene points outside the pasted boxes are all kept
        outside = ~inside(target["points"], new).any(1)
        np.testing.assert_array_equal(out["points"][npasted:], target["points"][outside])
        # same seed, same result
        np.testing.assert_array_equal(sampler(target, seed)["points"], out["points"])
    assert rejected_some  # candidates from the same places collide: some are refused


def test_kitti_dataset_with_sampler_and_seed(tmp_path):
    make_kitti(tmp_path, frames=3)
    db = GTDatabase.build(KittiDetection(tmp_path), classes=("Car", "Pedestrian"))
    assert db.counts() == {"Car": 3, "Pedestrian": 3}
    aug = Compose([GTSampler(db, {"Car": 3, "Pedestrian": 2}), RandomFlip(), GlobalRotation()])
    ds = KittiDetection(tmp_path, transforms=aug, seed=11)
    a, b = ds[0], ds[0]
    np.testing.assert_array_equal(a["points"], b["points"])
    np.testing.assert_array_equal(a["gt_boxes"], b["gt_boxes"])
    ds.set_epoch(1)
    assert not np.array_equal(ds[0]["gt_boxes"][:3], a["gt_boxes"][:3])  # another rotation
    for s in (a, ds[1]):  # every box holds its points after pasting and the global transforms
        counts = inside(s["points"], s["gt_boxes"], margin=1e-3).sum(0)
        assert (counts >= 80).all(), counts
    assert ds.get(0, augment=False)["gt_boxes"].shape == (3, 7)


# =============================================================================== collate
VS, PR = (0.5, 0.5, 0.5), (-10.0, -20.0, -3.0, 40.0, 20.0, 2.0)


def test_collate_detection():
    a, b = scene(3), scene(4, n_boxes=2)
    b["gt_labels"] = np.array([0, 2])  # a box of another class: left out of the targets
    batch = collate([a, b], VS, PR)
    na, nb = len(a["points"]), len(b["points"])
    assert batch["batch_size"] == 2 and batch["batch_index"].tolist() == [0] * na + [1] * nb
    x = batch["voxels"]
    assert isinstance(x, sparseconv.SparseTensor) and x.batch_size == 2
    # each scan voxelized on its own gives the rows of its batch index
    for k, s in enumerate((a, b)):
        ref = sparseconv.voxelize(torch.from_numpy(s["points"]), VS, PR)
        rows = x.coords[:, 0] == k
        np.testing.assert_array_equal(x.coords[rows][:, 1:], ref.tensor.coords[:, 1:])
        torch.testing.assert_close(x.features[rows], ref.tensor.features)
        p2v = batch["point_to_voxel"][batch["batch_index"] == k]
        offset = int((x.coords[:, 0] < k).sum())
        np.testing.assert_array_equal(p2v, torch.where(ref.point_to_voxel >= 0, ref.point_to_voxel + offset, -1))
    g = batch["gt_boxes"]
    assert g.shape == (2, 4, 8)
    np.testing.assert_array_equal(g[0, :, :7], a["gt_boxes"])
    assert g[0, :, 7].tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(g[1, 0, :7], b["gt_boxes"][1])
    assert g[1, 0, 7] == 2 and (g[1, 1:] == 0).all()
    assert batch["frame_id"] == ["x", "x"] and len(batch["gt_names"]) == 2


def test_collate_segmentation(tmp_path):
    make_semantic_kitti(tmp_path)
    ds = SemanticKitti(tmp_path, sequences=[0])
    batch = collate([ds[0], ds[1]], (0.1, 0.1, 0.1), (-5, -5, -5, 5, 5, 5), reduce="max")
    assert batch["labels"].tolist() == [1, 1, 9, 0, 9, 0, 0, 6, 7, 19, 17, 5]
    assert batch["instance"].tolist() == [1, 2, 0, 0, 0, 0, 0, 3, 4, 0, 0, 5]
    assert "gt_boxes" not in batch and batch["frame_id"] == ["00/000000", "00/000001"]


def test_dataloader_with_workers(tmp_path):
    make_kitti(tmp_path, frames=4, n_points=800)
    ds = KittiDetection(tmp_path, transforms=Compose([RandomFlip(), GlobalRotation(), RandomPointDropout(0.1)]),
                        seed=2)
    fn = partial(collate, voxel_size=VS, point_range=PR)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=fn)
    batches = list(loader)
    assert len(batches) == 2
    for k, got in enumerate(batches):
        ref = fn([ds[2 * k], ds[2 * k + 1]])  # seeded per frame: the workers made the same samples
        x, y = got["voxels"], ref["voxels"]
        torch.testing.assert_close(x.features, y.features)
        assert torch.equal(x.coords, y.coords) and x.spatial_shape == y.spatial_shape and x.batch_size == 2
        assert x.geometry == y.geometry
        torch.testing.assert_close(got["gt_boxes"], ref["gt_boxes"])
        assert got["frame_id"] == [f"{2 * k:06d}", f"{2 * k + 1:06d}"]
        assert got["gt_boxes"].shape == (2, 2, 8)  # Car and Pedestrian; the Van is not a target


# =============================================================================== bad input
def test_kitti_missing_files(tmp_path):
    make_kitti(tmp_path, frames=2)
    os.remove(tmp_path / "calib" / "000001.txt")
    ds = KittiDetection(tmp_path)
    assert ds[0]["gt_boxes"].shape == (3, 7)
    with pytest.raises(FileNotFoundError, match=r"calib.000001\.txt"):
        ds[1]
    os.remove(tmp_path / "velodyne" / "000001.bin")
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "train.txt").write_text("000000\n000001\n")
    with pytest.raises(FileNotFoundError, match=r"velodyne.000001\.bin"):
        KittiDetection(tmp_path)[1]
    with pytest.raises(FileNotFoundError, match="not a KITTI object folder"):
        KittiDetection(tmp_path / "velodyne")
    with pytest.raises(FileNotFoundError, match="not found"):
        KittiDetection(tmp_path / "nowhere")


def test_kitti_malformed_label_and_calib(tmp_path):
    make_kitti(tmp_path, frames=1)
    label = tmp_path / "label_2" / "000000.txt"
    lines = label.read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0]  # 14 values
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(PointCloudError, match=rf"{label}:2: a KITTI label line has 15 values .* got 14"):
        KittiDetection(tmp_path)[0]
    lines[1] = lines[2].replace(" 0.00 ", " zero ", 1)
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(PointCloudError, match=rf"{label}:2: .*type then 14 numbers"):
        KittiDetection(tmp_path)[0]
    make_kitti(tmp_path, frames=1)
    calib = tmp_path / "calib" / "000000.txt"
    write_calib(calib, skip=("P2",))
    with pytest.raises(PointCloudError, match=rf"{calib}: .*no P2"):
        KittiDetection(tmp_path)[0]
    # view's reader does not need P2
    assert "P2" not in read_kitti_calib(str(calib))


def test_semantic_kitti_bad_labels(tmp_path):
    make_semantic_kitti(tmp_path)
    labels = tmp_path / "sequences" / "00" / "labels"
    np.zeros(6, "<u4").tofile(labels / "000000.label")  # the scan has 5 points
    ds = SemanticKitti(tmp_path, sequences=[0])
    scan = tmp_path / "sequences" / "00" / "velodyne" / "000000.bin"
    with pytest.raises(PointCloudError, match=rf"{labels / '000000.label'}: 6 labels .* {scan} has 5 points"):
        ds[0]
    (labels / "000000.label").write_bytes(b"\0" * 7)  # not whole uint32s
    with pytest.raises(PointCloudError, match=r"1\.75 labels \(7 bytes"):
        ds[0]
    os.remove(labels / "000001.label")
    with pytest.raises(FileNotFoundError, match=r"000001\.label \(the labels of .*000001\.bin\)"):
        ds[1]


def test_gt_database_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="db.npz"):
        GTDatabase.load(tmp_path / "db.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(PointCloudError, match=r"other\.npz: not a GT database file: no names"):
        GTDatabase.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PointCloudError, match=r"junk\.npz: not a GT database"):
        GTDatabase.load(tmp_path / "junk.npz")
    db = GTDatabase.build(_db_dataset())
    with pytest.raises(ValueError, match="not classes of the database"):
        GTSampler(db, {"Cyclist": 5})
