"""Segmentation training / evaluation tools and ``sparseconv segment``, end to end on a tiny simulated dataset.

Reference results are computed here independently with NumPy: each point's voxel by
``floor((p - lo) / voxel_size)`` in float32, voxel majority votes with ``np.unique``, IoU as
``TP / (TP + FP + FN)`` from boolean masks, class weights from their closed form.

The hand-built real-layout SemanticKITTI sequence (raw ids 10, 252, 60, 99, 40, 254, 253, 81, 72,
259 with instance bits) is tested in tests/test_datasets.py::test_semantic_kitti_tiny_sequence and
the learning-map tables (every raw id, including 48 sidewalk and 50 building) in
test_semantic_kitti_tables; not repeated here.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from sparseconv.datasets import SemanticKitti, collate, generate_dataset
from sparseconv.datasets.semantic_kitti import LEARNING_MAP, LEARNING_MAP_INV, learning_map_lut
from sparseconv.engine.checkpoint import CheckpointManager
from sparseconv.engine.config import ConfigError
from sparseconv.engine.seg import (SYNTH_TRAIN_IDS, build_train_set, class_weights_from_counts, load_seg_checkpoint,
                                   load_seg_config, predict_voxels, resolve_class_weights)
from sparseconv.io import read_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
VOXEL = 0.8
RANGE = [-32.0, -32.0, -4.0, 32.0, 32.0, 2.4]  # cuts off some points: they must be left out of the metric


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _run(args, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 simulated VLP-32C scenes (train: sequence 00 with 2 scans, val: sequence 08 with 1), a config, and
    a checkpoint trained by tools/train_seg.py for 2 steps."""
    tmp = tmp_path_factory.mktemp("seg")
    root = str(tmp / "synth")
    generate_dataset(root, scenes=3, seed=1, sensor="vlp32c", layout="semantickitti", val_fraction=0.34)
    cfg = {
        "_base_": os.path.join(ROOT, "configs", "minkunet_synth.yaml"),
        "model": {"name": "minkunet18", "args": {"width": 0.125}},
        "data": {"root": root, "voxel_size": [VOXEL] * 3, "point_range": RANGE},
        "loss": {"lovasz": 1.0, "class_weights": "inv_sqrt_freq"},
        "train": {"epochs": 1, "batch_size": 1, "workers": 0, "log_every": 1, "tensorboard": False},
        "eval": {"workers": 0, "every_epochs": 0, "sparsity_scans": 1},
    }
    path = str(tmp / "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    out = str(tmp / "run")
    p = _run([os.path.join(TOOLS, "train_seg.py"), "--config", path, "--output", out, "--no-progress",
              "--set", "train.lr", "0.01"])
    assert p.returncode == 0, p.stdout + p.stderr
    return {"root": root, "config": path, "out": out, "tmp": tmp, "stdout": p.stdout}


# ----------------------------------------------------------------------------- independent references
def _voxel_keys(points, lo, vs, grid):
    """Each point's voxel index (x, y, z) with voxelize's float32 arithmetic, and whether it is in the grid."""
    q = np.floor((points[:, :3].astype(np.float32) - np.float32(lo)) / np.float32(vs)).astype(np.int64)
    inside = np.all((q >= 0) & (q < grid), 1) & np.isfinite(points[:, :3]).all(1)
    return q, inside


def _grid(cfg):
    lo, hi = np.array(cfg["data"]["point_range"][:3]), np.array(cfg["data"]["point_range"][3:])
    vs = np.array(cfg["data"]["voxel_size"])
    return lo, vs, np.round((hi - lo) / vs).astype(np.int64)


def _majority_counts(ds, cfg, num_classes):
    """Voxel-label counts over a dataset: the majority of the non-ignored point labels of each voxel (ties to the
    smallest id; a voxel without such a point counts as 0)."""
    lo, vs, grid = _grid(cfg)
    counts = np.zeros(num_classes, np.int64)
    for i in range(len(ds)):
        s = ds.get(i, augment=False)
        q, inside = _voxel_keys(s["points"], lo, vs, grid)
        key = (q[:, 0] * grid[1] + q[:, 1]) * grid[2] + q[:, 2]
        lab = s["labels"]
        voting = inside & (lab > 0)
        pairs, n = np.unique(key[voting] * num_classes + lab[voting], return_counts=True)
        vox, cls = pairs // num_classes, pairs % num_classes
        order = np.lexsort((cls, -n, vox))              # per voxel: most votes first, then the smallest id
        first = np.ones(len(order), bool)
        first[1:] = vox[order][1:] != vox[order][:-1]
        np.add.at(counts, cls[order][first], 1)
        counts[0] += len(np.unique(key[inside])) - first.sum()
    return counts


def _reference_point_predictions(net, points, cfg):
    """Per-point training ids: run the network on collate's voxels, find every point's voxel by its own
    float32 floor, look its coordinates up among the voxels, arg-max over channels 1.. (0 outside)."""
    lo, vs, grid = _grid(cfg)
    batch = collate([{"points": points}], voxel_size=cfg["data"]["voxel_size"],
                    point_range=cfg["data"]["point_range"])
    with torch.no_grad():
        logits = net(batch["voxels"]).features.numpy()
    vox_class = logits[:, 1:].argmax(1) + 1
    rows = {tuple(c): r for r, c in enumerate(batch["voxels"].coords[:, 1:].tolist())}
    q, inside = _voxel_keys(points, lo, vs, grid)
    pred = np.zeros(len(points), np.int64)
    for i in np.flatnonzero(inside):
        pred[i] = vox_class[rows[tuple(q[i])]]
    return pred, inside


# ----------------------------------------------------------------------------- training
def test_train_seg_writes_checkpoint_log_and_class_weights(run):
    ckpt = CheckpointManager(run["out"]).latest()
    assert ckpt is not None and os.path.basename(ckpt) == "ckpt_e001_s00000002.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["epoch"] == 1
    assert all(k.startswith("net.") for k in state["model"]) and state["config"]["model"]["name"] == "minkunet18"
    import csv

    with open(os.path.join(run["out"], "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["kind"] == "step"]
    assert [int(r["global_step"]) for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0
        # loss = ce + 1.0 * lovasz (the terms are logged)
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["lovasz"]), rel=1e-4)
        assert 0 <= float(r["voxel_acc"]) <= 1
    # the class weights were counted once and cached beside the data; counts match an independent majority vote
    caches = [n for n in os.listdir(run["root"]) if n.startswith("seg_class_weights_")]
    assert len(caches) == 1
    cache = json.load(open(os.path.join(run["root"], caches[0])))
    cfg = load_seg_config(run["config"])
    ds = SemanticKitti(run["root"], sequences=["00"])
    assert cache["scans"] == len(ds) == 2
    assert cache["counts"] == _majority_counts(ds, cfg, 20).tolist()
    np.testing.assert_allclose(cache["weights"], class_weights_from_counts(cache["counts"]), rtol=1e-12)
    assert "class weights [0.00, " in run["stdout"]
    # a valid cache is read, not recounted; one counted over another number of scans is recounted
    path = os.path.join(run["root"], caches[0])
    sentinel = dict(cache, weights=[0.5] * 20)
    with open(path, "w") as f:
        json.dump(sentinel, f)
    msgs = []
    assert resolve_class_weights(cfg, log=msgs.append).tolist() == [0.5] * 20 and msgs == []
    with open(path, "w") as f:
        json.dump(dict(sentinel, scans=99), f)
    w = resolve_class_weights(cfg, log=msgs.append)
    assert any("recounting" in m for m in msgs)
    np.testing.assert_allclose(w.numpy(), class_weights_from_counts(cache["counts"]), rtol=1e-6)
    assert json.load(open(path))["scans"] == 2


def test_class_weights_closed_form():
    counts = [7, 100, 0, 25, 4]            # class 0 is ignore, class 2 absent
    f = np.array([100, 25, 4]) / 129.0
    inv = 1 / np.sqrt(f)
    expected = np.array([0, inv[0], 0, inv[1], inv[2]]) / inv.mean()
    np.testing.assert_allclose(class_weights_from_counts(counts), expected, rtol=1e-12)
    assert class_weights_from_counts(counts)[[1, 3, 4]].mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no labelled element"):
        class_weights_from_counts([5, 0, 0])


def test_config_checks_and_synth_classes(tmp_path):
    cfg = load_seg_config(os.path.join(ROOT, "configs", "minkunet_synth.yaml"))
    # the configs list exactly the training ids the simulator writes (raw ids through the learning map)
    from sparseconv.datasets.synthetic import SEMANTIC_IDS

    by_hand = sorted({LEARNING_MAP[r] for r in SEMANTIC_IDS.values()} - {0})
    assert list(SYNTH_TRAIN_IDS) == by_hand == cfg["data"]["eval_classes"] and len(by_hand) == 14
    attn = load_seg_config(os.path.join(ROOT, "configs", "sparse_unet_attn_synth.yaml"))
    assert attn["model"]["name"] == "sparse_unet_attn" and attn["data"] == cfg["data"]
    assert cfg["data"]["root"] == "data/synth" and cfg["data"]["splits"] == {"train": ["00"], "val": ["08"]}
    base = os.path.join(ROOT, "configs", "minkunet_synth.yaml")
    for key, value, match in (("data.eval_classes", "[0, 1]", "eval_classes"),
                              ("data.eval_classes", "[1, 20]", "eval_classes"),
                              ("loss.class_weights", "inverse", "class_weights"),
                              ("loss.class_weights", "[1, 2]", "20 non-negative"),
                              ("data.voxel_size", "[0.2, 0.2]", "voxel_size"),
                              ("loss.bogus", "1", "bogus")):
        with pytest.raises(ConfigError, match=match):
            load_seg_config(base, [(key, value)])


def test_augmented_samples_without_boxes(run):
    """Flip / rotation / scaling move the points of a SemanticKITTI sample rigidly (up to one scale) with their
    labels: the labels are unchanged point for point and the pairwise geometry is preserved."""
    cfg = load_seg_config(run["config"])
    ds = build_train_set(cfg)
    raw, aug = ds.get(0, augment=False), ds[0]
    assert "gt_boxes" not in aug
    np.testing.assert_array_equal(aug["labels"], raw["labels"])
    np.testing.assert_array_equal(aug["points"][:, 3], raw["points"][:, 3])
    a, b = raw["points"][:, :3].astype(np.float64), aug["points"][:, :3].astype(np.float64)
    scale = np.linalg.norm(b, axis=1).sum() / np.linalg.norm(a, axis=1).sum()
    assert 0.95 <= scale <= 1.05
    np.testing.assert_allclose(b[:, 2], a[:, 2] * scale, atol=1e-4)     # z only scaled
    np.testing.assert_allclose(np.linalg.norm(b[:, :2], axis=1), np.linalg.norm(a[:, :2], axis=1) * scale, atol=1e-3)
    assert not np.allclose(a[:, :2] * scale, b[:, :2], atol=1e-2)       # really rotated / flipped
    ds.set_epoch(1)
    assert not np.array_equal(ds[0]["points"], aug["points"])          # new draws per epoch


# ----------------------------------------------------------------------------- evaluation
def test_eval_seg_matches_numpy_reference(run):
    ckpt = CheckpointManager(run["out"]).latest()
    js = str(run["tmp"] / "eval.json")
    p = _run([os.path.join(TOOLS, "eval_seg.py"), "--ckpt", ckpt, "--json", js, "--no-progress", "--threads", "1"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ms per scan" in p.stdout and "mIoU" in p.stdout and "zero %" in p.stdout  # sparsity table
    r = json.loads(open(js).read())
    cfg, model, _, _ = load_seg_checkpoint(ckpt)
    names = r["class_names"]
    assert r["split"] == "val" and r["scans"] == 1 and r["threads"] == 1 and r["ms_per_scan"] > 0
    assert list(r["iou"]) == [names[k] for k in SYNTH_TRAIN_IDS] and len(r["iou"]) == 14
    for v in r["iou"].values():
        assert v is None or 0.0 <= v <= 1.0
    present = [v for v in r["iou"].values() if v is not None]
    assert present and r["miou"] == pytest.approx(np.mean(present)) and 0 <= r["miou"] <= 1
    assert 0 <= r["accuracy"] <= 1
    assert r["sparsity"]["scans"] == 1 and "decoder.3.1" in r["sparsity"]["layers"]
    # independent per-point reference on the validation scan
    s = SemanticKitti(run["root"], sequences=["08"])[0]
    pred, inside = _reference_point_predictions(model.net, s["points"], cfg)
    lab = s["labels"]
    assert (~inside & (lab > 0)).sum() == r["points_outside_range"] > 0    # the range cuts some labelled points
    keep = inside & (lab > 0)
    assert keep.sum() == r["points"]
    assert r["accuracy"] == pytest.approx((pred[keep] == lab[keep]).mean())
    for k in SYNTH_TRAIN_IDS:
        tp = np.sum(keep & (pred == k) & (lab == k))
        union = np.sum(keep & ((pred == k) | (lab == k)))
        got = r["iou"][names[k]]
        if union == 0:
            assert got is None
        else:
            assert got == pytest.approx(tp / union), names[k]


def test_predict_voxels_never_predicts_ignore():
    logits = torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, -1.0], [0.0, 0.0, 0.0]])
    assert predict_voxels(logits).tolist() == [2, 1, 1]


# ----------------------------------------------------------------------------- sparseconv segment
def test_segment_command_good_and_truncated_scan(run):
    ckpt = CheckpointManager(run["out"]).latest()
    src = os.path.join(run["root"], "sequences", "08", "velodyne", "000000.bin")
    scans = run["tmp"] / "scans"
    scans.mkdir()
    shutil.copy(src, scans / "good.bin")
    data = open(src, "rb").read()
    (scans / "cut.bin").write_bytes(data[:len(data) // 2 + 6])      # truncated in the middle of a record
    out = run["tmp"] / "pred"
    try:
        import open3d  # noqa: F401

        ply = ["--ply"]
    except ImportError:
        ply = []
    p = _run(["-m", "sparseconv", "segment", str(scans), "-o", str(out), "--ckpt", ckpt, "--threads", "1", *ply])
    assert p.returncode == 1, p.stdout + p.stderr
    assert "cut.bin" in p.stderr and "truncated" in p.stderr                  # reported ...
    assert "1 done" in p.stdout and "1 skipped (error)" in p.stdout            # ... and skipped, the other done
    assert sorted(os.listdir(out)) == sorted(["good.label"] + (["good.ply"] if ply else []))  # no temporary files
    points = np.fromfile(scans / "good.bin", "<f4").reshape(-1, 4)
    assert os.path.getsize(out / "good.label") == 4 * len(points)
    raw = np.fromfile(out / "good.label", "<u4")
    semantic, instance = raw & 0xFFFF, raw >> 16
    assert (instance == 0).all()
    assert set(np.unique(semantic).tolist()) <= set(LEARNING_MAP_INV.values())   # valid raw SemanticKITTI ids
    # the labels decode through the learning map to the network's predictions (0 outside the range)
    cfg, model, _, _ = load_seg_checkpoint(ckpt)
    pred, inside = _reference_point_predictions(model.net, points, cfg)
    decoded = learning_map_lut()[semantic]
    np.testing.assert_array_equal(decoded, pred)
    assert (decoded[~inside] == 0).all() and (~inside).any() and (decoded[inside] > 0).all()
    # .label round trip: sparseconv.io.read_labels and SemanticKitti read back what segment wrote
    sem, ins = read_labels(out / "good.label", num_points=len(points))
    np.testing.assert_array_equal(sem, np.array([LEARNING_MAP_INV[int(k)] for k in pred], np.uint16))
    assert not ins.any()
    seq = run["tmp"] / "roundtrip" / "sequences" / "08"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    shutil.copy(scans / "good.bin", seq / "velodyne" / "000000.bin")
    shutil.copy(out / "good.label", seq / "labels" / "000000.label")
    back = SemanticKitti(run["tmp"] / "roundtrip", "val")[0]
    np.testing.assert_array_equal(back["labels"], pred)
    if ply:
        from sparseconv.io import read_points

        cloud = read_points(out / "good.ply")
        np.testing.assert_array_equal(cloud.fields["label"], semantic)
        np.testing.assert_array_equal(cloud.fields["class"], pred)
        car = pred == 1
        if car.any():  # SemanticKITTI's car colour, BGR (245, 150, 100) as RGB
            assert (cloud.fields["colors"][car] == [100, 150, 245]).all()
    # a second run skips the finished file and still reports the bad one
    p = _run(["-m", "sparseconv", "segment", str(scans), "-o", str(out), "--ckpt", ckpt, "--json", *ply])
    assert p.returncode == 1
    summary = json.loads(p.stdout)
    assert summary["skipped_exists"] == [str(scans / "good.bin")] and len(summary["failed"]) == 1
    # bad arguments: exit status 2
    p = _run(["-m", "sparseconv", "segment", str(scans / "missing.bin"), "-o", str(out), "--ckpt", ckpt])
    assert p.returncode == 2 and "no such file" in p.stderr
    p = _run(["-m", "sparseconv", "segment", str(scans), "-o", str(out), "--ckpt", str(scans / "good.bin")])
    assert p.returncode == 2 and "checkpoint" in p.stderr


# ----------------------------------------------------------------------------- shipped weights
def test_export_seg_writes_slim_float16_weights_that_segment_reads(run):
    ckpt = CheckpointManager(run["out"]).latest()
    out_dir = run["tmp"] / "weights"
    p = _run([os.path.join(TOOLS, "export_seg.py"), "--ckpt", ckpt, "--name", "tiny", "--out", str(out_dir),
              "--command", "python tools/train_seg.py --config cfg.yaml"])
    assert p.returncode == 0, p.stdout + p.stderr
    path = str(out_dir / "tiny.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    full = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(state) == {"model", "config", "epoch", "global_step", "provenance"}      # no optimizer state
    assert state["config"] == full["config"] and state["provenance"]["command"].startswith("python tools/train_seg")
    for k, v in full["model"].items():
        got = state["model"][k]
        if v.is_floating_point():
            assert got.dtype == torch.float16 and torch.equal(got, v.half())
        else:
            assert torch.equal(got, v)
    # the slim file loads like a checkpoint; its logits equal those of the float32 weights rounded to float16
    _, model16, _, _ = load_seg_checkpoint(path)
    _, model32, _, _ = load_seg_checkpoint(ckpt)
    with torch.no_grad():
        for name, param in model32.named_parameters():
            param.copy_(param.half().float())
        for name, buf in model32.named_buffers():
            if buf.is_floating_point():
                buf.copy_(buf.half().float())
    cfg = state["config"]
    points = np.fromfile(os.path.join(run["root"], "sequences", "08", "velodyne", "000000.bin"), "<f4").reshape(-1, 4)
    batch = collate([{"points": torch.from_numpy(points)}], cfg["data"]["voxel_size"], cfg["data"]["point_range"])
    with torch.no_grad():
        torch.testing.assert_close(model16.net(batch["voxels"]).features, model32.net(batch["voxels"]).features)
    bad = _run([os.path.join(TOOLS, "export_seg.py"), "--ckpt", str(out_dir / "missing.pt"), "--name", "x",
                "--out", str(out_dir)])
    assert bad.returncode == 2 and "missing.pt" in bad.stderr


def test_compare_models_reports_parameters_and_latency(run):
    ckpt = CheckpointManager(run["out"]).latest()
    out = run["tmp"] / "latency.json"
    p = _run([os.path.join(TOOLS, "compare_models.py"), "--task", "seg", "--ckpt", ckpt, "--ckpt", ckpt, "--scans", "1",
              "--repeats", "2", "--threads", "1", "--json", str(out)])
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    _, model, _, _ = load_seg_checkpoint(ckpt)
    assert [m["parameters"] for m in res["models"]] == [sum(q.numel() for q in model.parameters())] * 2
    assert all(m["ms_per_scan"] > 0 for m in res["models"]) and res["models"][0]["ratio_to_first"] == 1.0
    bad = _run([os.path.join(TOOLS, "compare_models.py"), "--task", "seg", "--ckpt", str(run["tmp"] / "nope.pt")])
    assert bad.returncode == 2 and "nope.pt" in bad.stderr


def test_segment_without_ckpt_uses_the_best_shipped_weights(run, tmp_path):
    from sparseconv.engine.seg import shipped_seg_weights

    shipped = shipped_seg_weights()
    if not shipped:
        pytest.skip("no segmentation weights shipped in models/weights/seg yet (tools/export_seg.py)")
    state = torch.load(shipped[0], map_location="cpu", weights_only=False)
    assert state["provenance"]["metrics"]["miou"] >= 0.65 and state["provenance"]["command"]
    src = os.path.join(run["root"], "sequences", "08", "velodyne", "000000.bin")
    p = _run(["-m", "sparseconv", "segment", src, "-o", str(tmp_path), "--threads", "1"])
    assert p.returncode == 0, p.stdout + p.stderr
    n = os.path.getsize(src) // 16
    raw = np.fromfile(tmp_path / "000000.label", "<u4")
    assert len(raw) == n and set(np.unique(raw & 0xFFFF).tolist()) <= set(LEARNING_MAP_INV.values())
