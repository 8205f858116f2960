"""Shipped-weights plumbing: tools/export_det.py, sparseconv.models.pretrained, ``sparseconv demo`` and
tools/det_figures.py, on a tiny SECOND trained for 2 steps on 2 simulated scenes.

References: the checkpoint's own model (built by the engine from the stored config) for the exported
weights; detections recomputed here through the model's ordinary forward on points cropped with NumPy
(the camera FOV with ``fov_mask`` and the half-open point range written out) for the demo and the
figures; the simulator's LiDAR boxes for the ground truth the demo reads back from KITTI label files.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("yaml", reason="the training configs need PyYAML")

from sparseconv.datasets import collate, fov_mask, simulate_scan, write_kitti_scene  # noqa: E402
from sparseconv.models import list_models  # noqa: E402
from sparseconv.models.pretrained import (FORMAT, default_pretrained, list_pretrained, load_pretrained,  # noqa: E402
                                          pretrained_from_checkpoint, read_pretrained, save_pretrained)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
PR = (0.0, -25.6, -3.0, 51.2, 25.6, 1.0)
VS = (0.4, 0.4, 0.2)
MAX_DET = 12
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif("second" not in list_models(), reason="sparseconv.models has no 'second'")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=_env())


def _demo(*args):
    return _run("-m", "sparseconv", "demo", "--threads", 1, *args)


def _png_size(path):
    data = open(path, "rb").read(32)
    assert data[:8] == PNG and data[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


def _crop(points, calib=None):
    """The reference crop: camera FOV (when calib), then min <= xyz < max of PR."""
    pts = np.asarray(points, np.float32)
    if calib is not None:
        pts = pts[fov_mask(pts, calib)]
    lo, hi = np.array(PR[:3], np.float32), np.array(PR[3:], np.float32)
    return pts[((pts[:, :3] >= lo) & (pts[:, :3] < hi)).all(1)]


@torch.no_grad()
def _reference_dets(model, points, score_threshold=0.0):
    """The model's ordinary forward on one scan, with the given score threshold."""
    model.eval()
    old = model.dense_head.score_threshold
    model.dense_head.score_threshold = score_threshold
    try:
        return model(collate([{"points": points}], VS, PR))[0]
    finally:
        model.dense_head.score_threshold = old


def _canonical(scores, labels, boxes):
    """Detections ordered by score (rounded: scores equal within float rounding are ties, whose order a
    different thread count may swap), then label and box centre."""
    scores, labels, boxes = np.asarray(scores, np.float64), np.asarray(labels), np.asarray(boxes, np.float64)
    order = np.lexsort((boxes[:, 1].round(3), boxes[:, 0].round(3), labels, -scores.round(5)))
    return scores[order], labels[order], boxes[order]


def _assert_same_dets(rows, ref):
    assert len(rows) == len(ref["scores"])
    got = _canonical([r["score"] for r in rows], [r["label"] for r in rows],
                     np.array([r["box"] for r in rows]).reshape(-1, 7))
    exp = _canonical(ref["scores"].numpy(), ref["labels"].numpy(), ref["boxes"].numpy())
    np.testing.assert_allclose(got[2], exp[2], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[0], exp[0], rtol=1e-5, atol=1e-6)
    assert got[1].tolist() == exp[1].tolist()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-step SECOND checkpoint (grid 128 x 128 x 20, at most 12 detections)."""
    from sparseconv.datasets import generate_dataset
    from sparseconv.engine import CheckpointManager

    tmp = tmp_path_factory.mktemp("train")
    root, out = str(tmp / "synth"), str(tmp / "run")
    generate_dataset(root, scenes=2, seed=0)
    threads = torch.get_num_threads()
    try:
        assert _tool("train_det").main([
            "--config", os.path.join(ROOT, "configs", "second_synth.yaml"), "--output", out, "--max-steps", "2",
            "--batch-size", "1", "--workers", "0", "--no-progress", "--threads", "1",
            "--set", "data.root", root, "--set", "data.point_range", str(list(PR)),
            "--set", "data.voxel_size", str(list(VS)), "--set", "data.augment.enabled", "false",
            "--set", "train.tensorboard", "false", "--set", "eval.every_epochs", "0",
            "--set", "model.args", f"{{max_detections: {MAX_DET}}}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return CheckpointManager(out).latest()


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """tools/export_det.py run as a command: weights dir with tiny.pt."""
    wdir = tmp_path_factory.mktemp("weights")
    p = _run(os.path.join(TOOLS, "export_det.py"), "--ckpt", ckpt, "--name", "tiny", "--out", wdir)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "tiny.pt" in p.stdout
    return {"dir": str(wdir), "path": os.path.join(str(wdir), "tiny.pt")}


@pytest.fixture(scope="module")
def checkpoint_model(ckpt):
    from sparseconv.engine import load_checkpoint
    from sparseconv.engine.det import build_detector

    state = load_checkpoint(ckpt)
    model = build_detector(state["config"])
    model.load_state_dict(state["model"])
    return model.eval(), state


# ----------------------------------------------------------------------------- export and loading
def test_export_round_trip(exported, checkpoint_model, ckpt):
    ref_model, state = checkpoint_model
    path = exported["path"]
    # small, plain, readable with weights_only=True
    assert os.path.getsize(path) < 0.5 * os.path.getsize(ckpt) and os.path.getsize(path) < 8 * 2 ** 20
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["format"] == FORMAT and obj["model"] == "second" and "optimizer" not in obj
    assert obj["model_args"] == {"class_names": ["Car", "Pedestrian", "Cyclist"], "point_range": list(PR),
                                 "voxel_size": list(VS), "in_channels": 4, "max_detections": MAX_DET}
    assert obj["data"] == state["config"]["data"]
    sd = state["model"]
    assert set(obj["state_dict"]) == set(sd)
    for k, v in sd.items():
        w = obj["state_dict"][k]
        assert w.dtype == (torch.float32 if v.is_floating_point() else v.dtype) and torch.equal(w, v.to(w.dtype)), k
    prov = obj["provenance"]
    assert prov["global_step"] == 2 and prov["epoch"] == state["epoch"] and prov["checkpoint"] == os.path.basename(ckpt)
    assert prov["config"] == state["config"] and prov["metrics"] is None
    assert prov["command_source"] == "reconstructed"
    # the recorded command, parsed by train_det's own parser, resolves to the checkpoint's config
    argv = shlex.split(prov["command"])
    assert argv[:2] == ["python", "tools/train_det.py"]
    targs = _tool("train_det").build_parser().parse_args(argv[2:])
    from sparseconv.engine.det import load_det_config

    cfg = load_det_config(os.path.join(ROOT, targs.config), list(targs.set) + [("output_dir", targs.output)])
    assert json.loads(json.dumps(cfg)) == json.loads(json.dumps(state["config"])) and targs.max_steps == 2
    # the loaded model computes exactly what the checkpoint's model computes
    model, info = load_pretrained(path)
    assert not model.training and info["class_names"] == ("Car", "Pedestrian", "Cyclist")
    assert info["point_range"] == PR and info["voxel_size"] == VS and info["provenance"]["global_step"] == 2
    assert info["num_parameters"] == sum(p.numel() for p in ref_model.parameters())
    scan = simulate_scan(5)
    batch = collate([{"points": _crop(scan.points)}, {"points": _crop(simulate_scan(6).points)}], VS, PR)
    low, _ = load_pretrained(path, score_threshold=0.0)  # every candidate up to max_detections
    old = ref_model.dense_head.score_threshold
    ref_model.dense_head.score_threshold = 0.0
    try:
        with torch.no_grad():
            a, b = low(batch), ref_model(batch)
    finally:
        ref_model.dense_head.score_threshold = old
    assert len(a) == 2
    for x, y in zip(a, b):
        assert len(x["scores"]) == MAX_DET
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(x[key], y[key]), key
    # the dense head sees the same features (not only the thresholded detections)
    with torch.no_grad():
        assert torch.equal(model.bev_features(batch), ref_model.bev_features(batch))


def test_names_defaults_overrides_and_errors(exported, ckpt, tmp_path):
    wdir = exported["dir"]
    assert list_pretrained(wdir) == ["tiny"] and list_pretrained(tmp_path) == []
    model, info = load_pretrained("tiny", weights_dir=wdir, score_threshold=0.0)
    assert info["path"] == exported["path"] and info["model_args"]["score_threshold"] == 0.0
    assert model.dense_head.score_threshold == 0.0
    with pytest.raises(ValueError, match=r"no pretrained weights named 'nosuch' \(available: tiny\)"):
        load_pretrained("nosuch", weights_dir=wdir)
    with pytest.raises(ValueError, match="none are installed"):
        load_pretrained("nosuch", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="no pretrained detector weights are installed.*export_det"):
        load_pretrained(None, weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_pretrained(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="may not change.*voxel_size"):
        load_pretrained(exported["path"], voxel_size=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="training checkpoint"):  # pickled objects / optimizer state
        read_pretrained(ckpt)
    # the default is the best by the recorded 3D mAP (weights without figures rank last)
    from sparseconv.engine import load_checkpoint

    state = load_checkpoint(ckpt)
    for name, ap in (("b_low", 10.0), ("a_none", None), ("c_high", 55.5)):
        metrics = None if ap is None else {"summary": {"mAP/3d_R40_moderate": ap}}
        save_pretrained(pretrained_from_checkpoint(state, ckpt, metrics=metrics), tmp_path / f"{name}.pt")
    assert list_pretrained(tmp_path) == ["a_none", "b_low", "c_high"] and default_pretrained(tmp_path) == "c_high"
    assert load_pretrained(None, weights_dir=tmp_path)[1]["name"] == "c_high"
    with pytest.raises(TypeError, match="holds only tensors"):
        save_pretrained({**pretrained_from_checkpoint(state), "provenance": {"x": object()}}, tmp_path / "bad.pt")
    assert not os.path.exists(tmp_path / "bad.pt")


def test_export_records_metrics_and_checks_their_step(ckpt, tmp_path):
    export = _tool("export_det")
    good, bad = tmp_path / "eval.json", tmp_path / "other.json"
    good.write_text(json.dumps({"global_step": 2, "summary": {"mAP/3d_R40_moderate": 12.5}, "frames": 3}))
    bad.write_text(json.dumps({"global_step": 7, "summary": {}}))
    with pytest.raises(SystemExit, match="global step 7"):
        export.main(["--ckpt", ckpt, "--name", "m", "--out", str(tmp_path), "--metrics", str(bad)])
    assert export.main(["--ckpt", ckpt, "--name", "m", "--out", str(tmp_path), "--metrics", str(good),
                        "--command", "python tools/train_det.py --config x.yaml"]) == 0
    prov = read_pretrained(tmp_path / "m.pt")["provenance"]
    assert prov["metrics"]["summary"] == {"mAP/3d_R40_moderate": 12.5} and prov["metrics"]["frames"] == 3
    assert prov["command"] == "python tools/train_det.py --config x.yaml" and prov["command_source"] == "given"
    with pytest.raises(SystemExit, match="exists"):
        export.main(["--ckpt", ckpt, "--name", "m", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="weights name"):
        export.main(["--ckpt", ckpt, "--name", "../evil", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- the demo
def test_demo_bundled_scan_json(exported, checkpoint_model, tmp_path):
    ref_model, _ = checkpoint_model
    image = tmp_path / "bev.png"
    p = _demo("--weights", exported["path"], "--json", "--score-threshold", "0", "-o", image, "--check-dense")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    scan = simulate_scan(0)
    pts = _crop(scan.points, scan.calib)  # the weights were trained with fov_only: front by default
    assert out["front"] is True and out["points"] == len(scan.points) and out["points_used"] == len(pts)
    ref = _reference_dets(ref_model, pts)
    assert len(ref["scores"]) == MAX_DET
    _assert_same_dets(out["detections"], ref)
    assert all(r["class"] == ("Car", "Pedestrian", "Cyclist")[r["label"] - 1] for r in out["detections"])
    # ground truth: the simulated objects in image 2 with a point, centre in the range
    keep = scan.in_label_2 & (scan.num_points > 0)
    c = scan.boxes[:, :3]
    keep &= ((c >= np.array(PR[:3])) & (c <= np.array(PR[3:]))).all(1)
    gt = out["ground_truth"]
    assert gt["source"] == "simulator" and len(gt["boxes"]) == keep.sum() > 0
    np.testing.assert_allclose([b["box"] for b in gt["boxes"]], scan.boxes[keep], rtol=1e-6, atol=1e-6)
    assert [b["class"] for b in gt["boxes"]] == list(scan.names[keep])
    assert 0 <= gt["found"]["found"] <= gt["found"]["gt"] <= keep.sum()
    t = out["timings"]
    assert t["threads"] == 1 and min(t["voxelize_ms"], t["network_ms"], t["postprocess_ms"]) >= 0
    assert t["total_ms"] >= t["network_ms"]
    assert out["grid"] == [128, 128, 20] and out["voxels"] > 100 and out["subm_vs_dense_max_abs_diff"] < 1e-9
    w, h = _png_size(image)
    assert w == 1000 and h > 500


def test_demo_input_bin_with_kitti_labels(exported, checkpoint_model, tmp_path):
    """A written .bin with its label_2 and calib files, text output, then JSON (same scan)."""
    from sparseconv.datasets import read_kitti_calib

    ref_model, _ = checkpoint_model
    scan = simulate_scan(3)
    paths = write_kitti_scene(str(tmp_path / "k"), 0, scan)
    args = ["--weights", exported["path"], "--input", paths["velodyne"], "--labels", paths["label_2"], "--calib",
            paths["calib"], "--front", "-o", tmp_path / "in.png"]
    p = _demo(*args)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    n = int(next(line for line in lines if line.startswith("detections:")).split(":")[1])
    assert "timing    voxelize" in p.stdout and "post-processing" in p.stdout and "(1 thread)" in p.stdout
    assert f"wrote {tmp_path / 'in.png'}" in p.stdout and _png_size(tmp_path / "in.png")[0] == 1000
    rows = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in ("Car", "Pedestrian",
                                                                                            "Cyclist")]
    assert len(rows) == n and all(len(r) == 9 for r in rows)
    p = _demo(*args, "--json", "--score-threshold", "0")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    calib = read_kitti_calib(paths["calib"])
    _assert_same_dets(out["detections"], _reference_dets(ref_model, _crop(scan.points, calib)))
    # the label file's boxes, back in the LiDAR frame, are the simulator's (to the file's 2 decimals)
    keep = scan.in_label_2.copy()
    c = scan.boxes[:, :3]
    keep &= ((c >= np.array(PR[:3]) - 0.01) & (c <= np.array(PR[3:]) + 0.01)).all(1)
    gt = out["ground_truth"]["boxes"]
    assert len(gt) == keep.sum() > 0 and [b["class"] for b in gt] == list(scan.names[keep])
    got = np.array([b["box"] for b in gt])
    np.testing.assert_allclose(got[:, :6], scan.boxes[keep, :6], atol=0.02)
    dyaw = (got[:, 6] - scan.boxes[keep, 6] + np.pi) % (2 * np.pi) - np.pi
    assert np.abs(dyaw).max() < 0.02


def test_demo_same_points_same_detections_without_front(exported, tmp_path):
    """The bundled scan and the same points read from a .bin give the same detections (no FOV crop)."""
    from sparseconv.cli import main as cli_main
    from sparseconv.io import write_kitti_bin

    scan = simulate_scan(0)
    write_kitti_bin(tmp_path / "s.bin", scan.points)
    outs = []
    for extra in ([], ["--input", str(tmp_path / "s.bin")]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli_main(["demo", "--weights", exported["path"], "--no-front", "--json", "--score-threshold", "0",
                             "-o", str(tmp_path / "x.png"), *extra]) == 0
        outs.append(json.loads(buf.getvalue()))
    assert outs[0]["front"] is False and outs[0]["points_used"] == len(_crop(scan.points))
    assert outs[0]["points_used"] == outs[1]["points_used"] and outs[0]["detections"] == outs[1]["detections"]
    assert outs[1]["ground_truth"] is None and outs[0]["ground_truth"]["source"] == "simulator"


def test_demo_errors(exported, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _demo("--weights-dir", empty, "-o", tmp_path / "x.png")
    assert p.returncode != 0 and "no pretrained detector weights are installed" in p.stderr
    assert "tools/export_det.py" in p.stderr and not os.path.exists(tmp_path / "x.png")
    from sparseconv.cli import main as cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli_main(["demo", "--weights", "nosuch", "--weights-dir", exported["dir"], "-o",
                         str(tmp_path / "x.png")]) == 1
        assert cli_main(["demo", "--weights", str(tmp_path / "nosuch.pt"), "-o", str(tmp_path / "x.png")]) == 1
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"\0" * 18)
        assert cli_main(["demo", "--input", str(bad), "--weights", exported["path"], "-o",
                         str(tmp_path / "x.png")]) == 1
        assert cli_main(["demo", "--labels", str(bad), "--weights", exported["path"], "-o",
                         str(tmp_path / "x.png")]) == 2
    text = err.getvalue()
    assert "no pretrained weights named 'nosuch' (available: tiny)" in text and "no such weights file" in text
    assert "not a multiple of 16" in text and "--labels needs --calib" in text
    assert not os.path.exists(tmp_path / "x.png")


def test_demo_list_weights(exported):
    from sparseconv.cli import main as cli_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["demo", "--list-weights", "--weights-dir", exported["dir"]]) == 0
    assert buf.getvalue().startswith("* tiny") and "second" in buf.getvalue()


# ----------------------------------------------------------------------------- figures on KITTI-layout scans
def test_det_figures_on_kitti_layout(exported, checkpoint_model, tmp_path, capsys):
    from sparseconv.datasets import read_kitti_calib

    ref_model, _ = checkpoint_model
    root = tmp_path / "kitti"
    scans = {f"{i:06d}": simulate_scan(10 + i) for i in range(3)}
    for i, s in enumerate(scans.values()):
        write_kitti_scene(str(root), i, s)  # root/training/{velodyne,label_2,calib}
    os.remove(root / "training" / "label_2" / "000001.txt")  # an incomplete frame: skipped
    out = tmp_path / "figs"
    tool = _tool("det_figures")
    threads = torch.get_num_threads()
    try:
        assert tool.main(["--weights", exported["path"], "--kitti", str(root), "--out", str(out),
                          "--score-threshold", "0", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "det_tiny.json").read_text())
    assert [s["frame"] for s in report["scans"]] == ["000000", "000002"]
    assert sorted(os.listdir(out)) == ["det_tiny.json", "det_tiny_000000.png", "det_tiny_000002.png"]
    for s in report["scans"]:
        _png_size(out / s["image"])
        calib = read_kitti_calib(str(root / "training" / "calib" / f"{s['frame']}.txt"))
        scan = scans[s["frame"]]
        pts = _crop(scan.points, calib)
        assert s["points_used"] == len(pts)
        _assert_same_dets(s["detections"], _reference_dets(ref_model, pts))
        assert len(s["ground_truth"]) > 0 and s["found"]["gt"] <= len(s["ground_truth"])
    # an absent folder: a message and nothing written
    capsys.readouterr()
    assert tool.main(["--weights", exported["path"], "--kitti", str(tmp_path / "nope"), "--out",
                      str(tmp_path / "none")]) == 0
    assert "absent" in capsys.readouterr().out and not os.path.exists(tmp_path / "none")
