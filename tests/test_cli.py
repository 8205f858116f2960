"""``sparseconv voxelize / info / view`` end to end, through ``python -m sparseconv`` subprocesses.

A temp folder holds a good LiDAR-like KITTI scan, a truncated one and one with NaN / inf points,
all written with NumPy. Voxel files are checked against ``sparseconv.voxelize`` called directly,
``info`` against NumPy, and the KITTI box transform against a forward camera projection and the
points of the real KITTI frames (when ``../shared/data/kitti`` is present).
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparseconv
from sparseconv.cli import main as cli_main
from sparseconv.datasets.synthetic import simulate_scan
from sparseconv.cli.view import box_corners_bev, camera_boxes_to_lidar, read_kitti_calib, read_kitti_labels
from sparseconv.io import load_voxels, read_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KITTI = os.path.join(ROOT, "..", "shared", "data", "kitti")
KITTI_FRAMES = [os.path.basename(p)[:-4] for p in sorted(glob.glob(os.path.join(KITTI, "velodyne", "*.bin")))
                if os.path.exists(os.path.join(KITTI, "label_2", os.path.basename(p)[:-4] + ".txt"))
                and os.path.exists(os.path.join(KITTI, "calib", os.path.basename(p)[:-4] + ".txt"))]
VOXEL = ["--voxel-size", "0.4", "0.4", "0.5", "--range", "-40", "-40", "-3", "40", "40", "2"]
VOXEL_SIZE, POINT_RANGE = (0.4, 0.4, 0.5), (-40.0, -40.0, -3.0, 40.0, 40.0, 2.0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "sparseconv", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def png_size(path):
    data = open(path, "rb").read(32)
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


def voxel_arrays(path):
    """Everything in a voxel file, as NumPy arrays / scalars."""
    x, meta = load_voxels(path)
    return {"coords": x.coords.numpy(), "feats": x.features.numpy(), "spatial_shape": x.spatial_shape,
            **{k: np.asarray(v) for k, v in meta.items()}}


def assert_same_voxels(a, b):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """good.bin, nan.bin (NaN / inf coordinates) and trunc.bin (not a multiple of 16 bytes)."""
    folder = tmp_path_factory.mktemp("scans")
    good = simulate_scan(1, sensor="vlp32c").points.copy()
    noisy = simulate_scan(2, sensor="vlp32c").points.copy()
    rng = np.random.default_rng(0)
    bad_rows = rng.choice(len(noisy), 40, replace=False)
    noisy[bad_rows[:25], rng.integers(0, 3, 25)] = np.nan
    noisy[bad_rows[25:], 2] = np.inf
    noisy[bad_rows[:5], 3] = np.nan  # NaN intensity on rows already dropped: must not matter
    good.astype("<f4").tofile(folder / "good.bin")
    noisy.astype("<f4").tofile(folder / "nan.bin")
    with open(folder / "trunc.bin", "wb") as f:
        f.write(good.astype("<f4").tobytes()[:-6])
    return {"dir": folder, "good": good, "nan": noisy}


@pytest.fixture(scope="module")
def first_run(scans, tmp_path_factory):
    out = tmp_path_factory.mktemp("voxels")
    p = run_cli("voxelize", scans["dir"], "-o", out, *VOXEL, "--json")
    return {"proc": p, "out": out, "summary": json.loads(p.stdout) if p.stdout.strip() else None}


def direct_voxelize(points):
    return sparseconv.voxelize(torch.from_numpy(points), VOXEL_SIZE, POINT_RANGE, reduce="mean", return_counts=True)


# =============================================================================== voxelize
def test_voxelize_reports_the_truncated_file_and_does_the_others(scans, first_run):
    p, s, out = first_run["proc"], first_run["summary"], first_run["out"]
    assert p.returncode == 1, p.stderr
    assert s["files"] == 3 and s["done"] == 2 and s["skipped_exists"] == []
    assert [os.path.basename(f["file"]) for f in s["failed"]] == ["trunc.bin"]
    reason = s["failed"][0]["reason"]
    assert "trunc.bin" in reason and "not a multiple of 16" in reason and "truncated" in reason
    assert "trunc.bin" in p.stderr and "not a multiple of 16" in p.stderr
    # only the two outputs: no output for the bad file, no temporary file left
    assert sorted(os.listdir(out)) == ["good.npz", "nan.npz"]


def test_voxelize_summary_counts_match_numpy(scans, first_run):
    s = first_run["summary"]
    good, noisy = scans["good"], scans["nan"]
    assert s["points"] == len(good) + len(noisy)
    nonfinite = int((~np.isfinite(noisy[:, :3]).all(1)).sum())
    assert nonfinite == 40 and s["dropped"]["nonfinite"] == nonfinite
    # out of range: NumPy count, allowing for points within 1e-4 of a boundary (float32 rounding)
    lo, hi = np.array(POINT_RANGE[:3]), np.array(POINT_RANGE[3:])
    n_out, n_edge = 0, 0
    for pts in (good, noisy):
        xyz = pts[np.isfinite(pts[:, :3]).all(1), :3].astype(np.float64)
        surely_in = ((xyz >= lo + 1e-4) & (xyz < hi - 1e-4)).all(1)
        surely_out = ((xyz < lo - 1e-4) | (xyz >= hi + 1e-4)).any(1)
        n_out += int(surely_out.sum())
        n_edge += int((~surely_in & ~surely_out).sum())
    assert n_out > 0 and n_out <= s["dropped"]["out_of_range"] <= n_out + n_edge
    assert s["dropped"]["max_voxels"] == s["dropped"]["max_points"] == 0
    assert s["kept"] == s["points"] - nonfinite - s["dropped"]["out_of_range"]
    by_name = {os.path.basename(r["input"]): r for r in s["results"]}
    assert by_name["nan.bin"]["dropped_nonfinite"] == 40 and by_name["good.bin"]["dropped_nonfinite"] == 0
    cells = np.prod(np.round((hi - lo) / np.array(VOXEL_SIZE)))
    assert math.isclose(s["mean_occupancy"], np.mean([r["voxels"] / cells for r in by_name.values()
                                                      if r["status"] == "done"]))
    assert s["voxels"] == sum(r["voxels"] for r in by_name.values() if r["status"] == "done")


@pytest.mark.parametrize("name", ["good", "nan"])
def test_voxel_file_equals_direct_voxelize(scans, first_run, name):
    got = voxel_arrays(first_run["out"] / f"{name}.npz")
    ref = direct_voxelize(scans[name])
    np.testing.assert_array_equal(got["coords"], ref.tensor.coords.numpy())
    np.testing.assert_array_equal(got["feats"], ref.tensor.features.numpy())
    np.testing.assert_array_equal(got["counts"], ref.counts.numpy())
    assert got["spatial_shape"] == ref.tensor.spatial_shape
    np.testing.assert_allclose(got["voxel_size"], VOXEL_SIZE)
    np.testing.assert_allclose(got["point_range"], POINT_RANGE)
    assert str(got["reduce"]) == "mean" and str(got["source"]) == f"{name}.bin"
    assert got["feature_names"].tolist() == ["x", "y", "z", "intensity"]
    for key in ("dropped_nonfinite", "dropped_out_of_range", "dropped_max_voxels", "dropped_max_points"):
        assert int(got[key]) == ref.stats[key], key
    assert int(got["num_points"]) == len(scans[name])


def test_voxelize_rerun_skips_existing_and_overwrite_redoes(scans, first_run):
    out = first_run["out"]
    inputs = [scans["dir"] / "good.bin", scans["dir"] / "nan.bin"]
    before = {f: os.stat(out / f).st_mtime_ns for f in ("good.npz", "nan.npz")}
    content = voxel_arrays(out / "nan.npz")
    p = run_cli("voxelize", *inputs, "-o", out, *VOXEL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("skipped: exists") == 2 and "0 done" in p.stdout
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before
    p = run_cli("voxelize", *inputs, "-o", out, *VOXEL, "--overwrite", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["done"] == 2 and s["skipped_exists"] == [] and s["failed"] == []
    assert all(os.stat(out / f).st_mtime_ns != t for f, t in before.items())
    assert_same_voxels(voxel_arrays(out / "nan.npz"), content)
    assert sorted(os.listdir(out)) == ["good.npz", "nan.npz"]


def test_voxelize_two_workers_and_a_quoted_glob_give_the_same_voxels(scans, first_run, tmp_path):
    p = run_cli("voxelize", str(scans["dir"] / "*.bin"), "-o", tmp_path, *VOXEL, "--workers", "2", "--json")
    assert p.returncode == 1, p.stderr
    s = json.loads(p.stdout)
    assert s["workers"] == 2 and s["done"] == 2 and len(s["failed"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["good.npz", "nan.npz"]
    for name in ("good.npz", "nan.npz"):
        assert_same_voxels(voxel_arrays(tmp_path / name), voxel_arrays(first_run["out"] / name))


def test_voxelize_ply_format(scans, tmp_path):
    pytest.importorskip("open3d")
    p = run_cli("voxelize", scans["dir"] / "good.bin", "-o", tmp_path, *VOXEL, "--format", "ply",
                "--reduce", "max", "--max-points", "3")
    assert p.returncode == 0, p.stderr + p.stdout
    assert sorted(os.listdir(tmp_path)) == ["good.ply"]
    cloud = read_points(tmp_path / "good.ply")
    ref = sparseconv.voxelize(torch.from_numpy(scans["good"]), VOXEL_SIZE, POINT_RANGE, reduce="max",
                              max_points_per_voxel=3, return_counts=True)
    coords = ref.tensor.coords.numpy()[:, 1:].astype(np.float64)
    centres = np.array(POINT_RANGE[:3]) + (coords + 0.5) * np.array(VOXEL_SIZE)
    np.testing.assert_allclose(cloud.xyz, centres, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(cloud.fields["count"], ref.counts.numpy())
    assert ref.counts.max() == 3
    feats = ref.tensor.features.numpy()
    for j, name in enumerate(("max_x", "max_y", "max_z", "max_intensity")):
        np.testing.assert_array_equal(cloud.fields[name], feats[:, j], err_msg=name)


def test_voxelize_usage_errors_exit_2(tmp_path, capsys):
    missing = tmp_path / "none.bin"
    p = run_cli("voxelize", missing, "-o", tmp_path / "out")
    assert p.returncode == 2 and "none.bin" in p.stderr and "no such file" in p.stderr
    assert not (tmp_path / "out").exists()
    p = run_cli("voxelize", tmp_path, "-o", tmp_path / "out", "--voxel-size", "0.1", "0.1")  # 2 values, not 3
    assert p.returncode == 2 and "--voxel-size" in p.stderr
    # the others in-process (the same parser and checks, without a Python start-up each)
    (tmp_path / "a.bin").write_bytes(np.zeros((4, 4), "<f4").tobytes())
    for bad in (["--voxel-size", "0.1", "-0.1", "0.1"], ["--range", "0", "0", "0", "-1", "1", "1"],
                ["--workers", "0"], ["--max-points", "0"], ["--reduce", "median"]):
        try:
            code = cli_main(["voxelize", str(tmp_path / "a.bin"), "-o", str(tmp_path / "o"), *bad])
        except SystemExit as e:
            code = e.code
        assert code == 2, bad
    try:
        code = cli_main(["voxelize", str(tmp_path / "a.bin")])  # no -o
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert cli_main(["voxelize", str(tmp_path / "*.xyz"), "-o", str(tmp_path / "o")]) == 2
    assert "no point-cloud file matches" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["voxelize", str(empty), "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# =============================================================================== info
def test_info_scans_json_matches_numpy(scans):
    p = run_cli("info", scans["dir"] / "good.bin", scans["dir"] / "trunc.bin", scans["dir"] / "nan.bin", "--json")
    assert p.returncode == 1
    assert "trunc.bin" in p.stderr and "not a multiple of 16" in p.stderr
    good, bad, noisy = json.loads(p.stdout)
    assert "not a multiple of 16" in bad["error"] and bad["file"].endswith("trunc.bin")
    for info, pts in ((good, scans["good"]), (noisy, scans["nan"])):
        finite = np.isfinite(pts[:, :3]).all(1)
        assert info["kind"] == "points" and info["points"] == len(pts)
        assert info["nonfinite"] == int((~finite).sum())
        assert info["fields"] == {"intensity": {"dtype": "float32", "columns": 1}}
        for i, axis in enumerate("xyz"):
            assert info["bounds"][axis] == [float(pts[finite, i].min()), float(pts[finite, i].max())]
        intensity = pts[:, 3][np.isfinite(pts[:, 3])]
        assert info["intensity"] == [float(intensity.min()), float(intensity.max())]
    assert noisy["nonfinite"] == 40


def test_info_voxel_file(first_run, capsys):
    path = first_run["out"] / "good.npz"
    p = run_cli("info", path, "--json")
    assert p.returncode == 0, p.stderr
    (info,) = json.loads(p.stdout)
    data = np.load(path)
    grid = np.round((np.array(POINT_RANGE[3:]) - POINT_RANGE[:3]) / VOXEL_SIZE).astype(int).tolist()
    assert info["kind"] == "voxels" and info["voxels"] == len(data["coords"])
    assert info["channels"] == data["feats"].shape[1] == 4
    assert info["spatial_shape"] == grid and info["batch_size"] == 1
    assert math.isclose(info["occupancy"], len(data["coords"]) / np.prod(grid))
    assert info["meta"]["voxel_size"] == list(VOXEL_SIZE) and info["meta"]["point_range"] == list(POINT_RANGE)
    assert info["points_per_voxel"]["max"] == int(data["counts"].max())
    # the text form (in-process) names the same numbers
    assert cli_main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{info['voxels']:,} x 4 channels" in text and str(tuple(grid)) in text


# =============================================================================== view
def synthetic_calib_and_label(folder, boxes_lidar):
    """A KITTI calib (rotated R0_rect, axis-swapping Tr_velo_to_cam) and label_2 for LiDAR boxes [M, 7]."""
    r0 = np.array([[0.9999, 0.0101, -0.0085], [-0.0101, 0.9999, -0.0040], [0.0085, 0.0041, 0.9999]])
    r0, _ = np.linalg.qr(r0)  # a proper rotation close to KITTI's
    r0 *= np.sign(np.diag(r0))[None, :]
    v2c = np.array([[0.0, -1.0, 0.0, -0.02], [0.0, 0.0, -1.0, -0.06], [1.0, 0.0, 0.0, -0.33]])
    calib = folder / "calib.txt"
    lines = [f"P{i}: " + " ".join(["0"] * 12) for i in range(4)]
    lines += ["R0_rect: " + " ".join(f"{v:.12e}" for v in r0.ravel()),
              "Tr_velo_to_cam: " + " ".join(f"{v:.12e}" for v in v2c.ravel())]
    calib.write_text("\n".join(lines) + "\n")
    label = folder / "label.txt"
    rows = []
    for x, y, z, l, w, h, yaw in boxes_lidar:  # forward: bottom centre to the camera, ry = -yaw - pi/2
        cam = r0 @ (v2c @ np.array([x, y, z - h / 2, 1.0]))
        ry = -yaw - np.pi / 2
        rows.append(f"Car 0.00 0 0.00 0 0 100 100 {h:.6f} {w:.6f} {l:.6f} {cam[0]:.6f} {cam[1]:.6f} {cam[2]:.6f} "
                    f"{ry:.6f}")
    rows.append("DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10")
    label.write_text("\n".join(rows) + "\n")
    return calib, label


def test_camera_boxes_to_lidar_inverts_the_camera_projection(tmp_path):
    boxes = np.array([[12.0, 3.0, -0.8, 4.0, 1.7, 1.5, 0.3], [25.0, -6.0, -1.0, 0.8, 0.6, 1.8, -2.5]])
    calib, label = synthetic_calib_and_label(tmp_path, boxes)
    labels = read_kitti_labels(str(label))
    assert labels["type"].tolist() == ["Car", "Car"]  # DontCare skipped
    assert len(read_kitti_labels(str(label), skip_dontcare=False)["type"]) == 3
    got = camera_boxes_to_lidar(labels, read_kitti_calib(str(calib)))
    np.testing.assert_allclose(got, boxes, atol=1e-5)
    # BEV corners: the front (first and last corner) lies along the heading
    corners = box_corners_bev(got)
    heading = corners[:, [0, 3]].mean(1) - got[:, :2]
    np.testing.assert_allclose(np.linalg.norm(heading, axis=1), boxes[:, 3] / 2, atol=1e-5)
    np.testing.assert_allclose(np.arctan2(heading[:, 1], heading[:, 0]), boxes[:, 6], atol=1e-5)


@pytest.mark.skipif(not KITTI_FRAMES, reason="../shared/data/kitti is absent")
@pytest.mark.parametrize("frame", KITTI_FRAMES)
def test_kitti_boxes_hold_the_object_points(frame):
    points = read_points(os.path.join(KITTI, "velodyne", frame + ".bin")).xyz.astype(np.float64)
    labels = read_kitti_labels(os.path.join(KITTI, "label_2", frame + ".txt"))
    boxes = camera_boxes_to_lidar(labels, read_kitti_calib(os.path.join(KITTI, "calib", frame + ".txt")))
    assert len(boxes)
    for kind, box in zip(labels["type"], boxes):
        d = points - box[:3]
        c, s = math.cos(box[6]), math.sin(box[6])
        local = np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c, d[:, 2]], 1)
        inside = (np.abs(local) <= box[3:6] / 2).all(1).sum()
        assert inside >= 5, f"{frame}: the {kind} box at {box[:3].round(2)} holds {inside} points"


def test_view_scan_and_voxel_file(scans, first_run, tmp_path):
    p = run_cli("view", scans["dir"] / "nan.bin", "-o", tmp_path / "scan.png", "--size", "400", "300",
                "--color", "intensity")
    assert p.returncode == 0, p.stderr
    assert png_size(tmp_path / "scan.png") == (400, 300)
    p = run_cli("view", first_run["out"] / "good.npz", "-o", tmp_path / "voxels.png", "--range", "-20", "-20", "20",
                "20")
    assert p.returncode == 0, p.stderr
    w, h = png_size(tmp_path / "voxels.png")
    assert w == 1000 and 300 < h < 1500
    assert sorted(os.listdir(tmp_path)) == ["scan.png", "voxels.png"]  # no temporary file left


def test_view_with_kitti_labels(scans, tmp_path):
    boxes = np.array([[10.0, 2.0, -1.0, 4.0, 1.7, 1.5, 0.4]])
    calib, label = synthetic_calib_and_label(tmp_path, boxes)
    p = run_cli("view", scans["dir"] / "good.bin", "-o", tmp_path / "synthetic.png", "--labels", label,
                "--calib", calib, "--size", "500", "400")
    assert p.returncode == 0, p.stderr
    assert "1 box)" in p.stdout and png_size(tmp_path / "synthetic.png") == (500, 400)
    if KITTI_FRAMES:
        f = KITTI_FRAMES[0]
        p = run_cli("view", os.path.join(KITTI, "velodyne", f + ".bin"), "-o", tmp_path / "kitti.png",
                    "--labels", os.path.join(KITTI, "label_2", f + ".txt"),
                    "--calib", os.path.join(KITTI, "calib", f + ".txt"), "--range", "0", "-40", "70.4", "40")
        assert p.returncode == 0, p.stderr
        assert png_size(tmp_path / "kitti.png")[0] == 1000


def test_view_errors(scans, tmp_path, capsys):
    assert cli_main(["view", str(scans["dir"] / "good.bin"), "-o", str(tmp_path / "a.png"), "--labels", "x.txt"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert cli_main(["view", str(scans["dir"] / "trunc.bin"), "-o", str(tmp_path / "a.png")]) == 1
    assert "not a multiple of 16" in capsys.readouterr().err
    assert cli_main(["view", str(scans["dir"] / "good.bin"), "-o", str(tmp_path / "a.png"),
                     "--range", "1", "0", "0", "1"]) == 2
    assert os.listdir(tmp_path) == []
