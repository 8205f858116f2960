"""sparseconv.io: every format round-trips, every bad file gives an error naming the file and
the problem, and writes are atomic.

Readers are checked against files written by an independent writer (NumPy, Open3D, laspy or by
hand) and writers against an independent reader where one exists.
"""
from __future__ import annotations

import glob
import os
import stat
import sys

import numpy as np
import pytest
import torch

from _scans import make_scan, write_las
from sparseconv import SparseTensor
from sparseconv import io as sio
from sparseconv.io import PointCloud, PointCloudError

KITTI_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kitti", "velodyne")
KITTI_SCANS = sorted(glob.glob(os.path.join(KITTI_DIR, "*.bin")))


@pytest.fixture
def scan():
    return make_scan(300, seed=1)


def listing(folder) -> list:
    return sorted(os.listdir(folder))


def assert_fields_equal(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# =============================================================================== round trips
def test_kitti_bin_read_numpy_written(tmp_path, scan):
    path = tmp_path / "000001.bin"
    np.column_stack([scan["xyz"], scan["intensity"]]).astype("<f4").tofile(path)
    cloud = sio.read_points(path)
    assert cloud.xyz.dtype == np.float32 and cloud.path == str(path)
    np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
    assert_fields_equal(cloud.fields, {"intensity": scan["intensity"]})


def test_kitti_bin_writer(tmp_path, scan):
    cloud = PointCloud(scan["xyz"], {"intensity": scan["intensity"], "ring": scan["ring"]})
    sio.write_kitti_bin(tmp_path / "a.bin", cloud)
    raw = np.fromfile(tmp_path / "a.bin", dtype="<f4").reshape(-1, 4)
    np.testing.assert_array_equal(raw, np.column_stack([scan["xyz"], scan["intensity"]]))
    # no intensity field / an [N, 3] array: intensity 0; an [N, 4] array as is
    sio.write_kitti_bin(tmp_path / "b.bin", PointCloud(scan["xyz"]))
    sio.write_kitti_bin(tmp_path / "c.bin", scan["xyz"].astype(np.float64))
    for name in ("b.bin", "c.bin"):
        back = sio.read_points(tmp_path / name)
        np.testing.assert_array_equal(back.xyz, scan["xyz"])
        np.testing.assert_array_equal(back.fields["intensity"], np.zeros(len(scan["xyz"]), np.float32))
    sio.write_kitti_bin(tmp_path / "d.bin", raw)
    assert (tmp_path / "d.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()
    with pytest.raises(ValueError, match=r"\[N, 4\].*got shape \(300, 5\)"):
        sio.write_kitti_bin(tmp_path / "e.bin", np.zeros((300, 5)))
    assert not (tmp_path / "e.bin").exists()


def test_nuscenes_pcd_bin(tmp_path, scan):
    data = np.column_stack([scan["xyz"], scan["intensity"] * 255, scan["ring"]]).astype("<f4")
    data.tofile(tmp_path / "n008__LIDAR_TOP__1.pcd.bin")
    data.tofile(tmp_path / "sweep.bin")
    expected = {"intensity": data[:, 3], "ring": data[:, 4]}
    for cloud in (
        sio.read_points(tmp_path / "n008__LIDAR_TOP__1.pcd.bin"),
        sio.read_points(tmp_path / "sweep.bin", format="nuscenes"),
        sio.read_points(tmp_path / "sweep.bin", format=".pcd.bin"),
    ):
        np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
        assert_fields_equal(cloud.fields, expected)


def test_npy(tmp_path, scan):
    extra = np.random.default_rng(0).random((300, 2))
    arr = np.column_stack([scan["xyz"], scan["intensity"], extra])  # float64 [N, 6]
    np.save(tmp_path / "a.npy", arr)
    cloud = sio.read_points(tmp_path / "a.npy")
    np.testing.assert_array_equal(cloud.xyz, arr[:, :3].astype(np.float32))
    assert_fields_equal(cloud.fields, {"intensity": arr[:, 3], "f4": arr[:, 4], "f5": arr[:, 5]})
    np.save(tmp_path / "b.npy", scan["xyz"])
    cloud = sio.read_points(tmp_path / "b.npy")
    np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
    assert cloud.fields == {}


def test_npz(tmp_path, scan):
    labels = np.arange(300, dtype=np.int64)
    np.savez(tmp_path / "a.npz", xyz=scan["xyz"], intensity=scan["intensity"], rgb=scan["rgb"],
             label=labels, pose=np.eye(4), name=np.array("scan"))  # pose and name are not per-point
    cloud = sio.read_points(tmp_path / "a.npz")
    np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
    assert_fields_equal(cloud.fields, {"intensity": scan["intensity"], "rgb": scan["rgb"], "label": labels})

    points = np.column_stack([scan["xyz"], scan["intensity"]])
    np.savez_compressed(tmp_path / "b.npz", points=points, ring=scan["ring"])
    cloud = sio.read_points(tmp_path / "b.npz")
    np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
    assert_fields_equal(cloud.fields, {"intensity": scan["intensity"], "ring": scan["ring"]})


def test_npz_writer(tmp_path, scan):
    fields = {k: scan[k] for k in ("intensity", "ring", "rgb", "time")}
    sio.write_npz_points(tmp_path / "a.npz", PointCloud(scan["xyz"], fields))
    with np.load(tmp_path / "a.npz") as archive:  # independent reader
        assert sorted(archive.files) == sorted(["xyz", *fields])
        np.testing.assert_array_equal(archive["xyz"], scan["xyz"])
    cloud = sio.read_points(tmp_path / "a.npz")
    np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
    assert_fields_equal(cloud.fields, fields)


def test_ply_round_trip_keeps_fields(tmp_path, scan):
    pytest.importorskip("open3d")
    xyz = scan["xyz"].copy()
    xyz[0] = np.nan
    xyz[1, 2] = np.inf  # Open3D cannot write inf as float32: stored as double, read back exactly
    fields = {k: scan[k] for k in ("intensity", "ring", "rgb", "classification", "time")}
    fields["valid"] = np.arange(300) % 3 == 0  # bool -> uint8
    sio.write_ply(tmp_path / "a.ply", PointCloud(xyz, fields))
    cloud = sio.read_points(tmp_path / "a.ply")
    np.testing.assert_array_equal(cloud.xyz, xyz)
    fields["valid"] = fields["valid"].astype(np.uint8)
    assert_fields_equal(cloud.fields, fields)
    assert cloud.fields["intensity"].dtype == np.float32 and cloud.fields["rgb"].shape == (300, 3)
    np.testing.assert_array_equal(cloud.finite_mask(), np.arange(300) > 1)


def test_ply_written_by_hand(tmp_path, scan):
    """An ASCII PLY with 'intensities' (another tool's name) and an unused face element."""
    pytest.importorskip("open3d")
    n = 20
    header = (
        f"ply\nformat ascii 1.0\ncomment written by hand\nelement vertex {n}\nproperty float x\n"
        "property float y\nproperty float z\nproperty float intensities\nproperty uchar ring\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    )
    rows = np.column_stack([scan["xyz"][:n], scan["intensity"][:n]])
    body = "".join(f"{x!r} {y!r} {z!r} {i!r} {r}\n" for (x, y, z, i), r in zip(rows.tolist(), scan["ring"][:n]))
    (tmp_path / "h.ply").write_text(header + body + "3 0 1 2\n")
    cloud = sio.read_points(tmp_path / "h.ply")
    np.testing.assert_array_equal(cloud.xyz, scan["xyz"][:n])
    assert_fields_equal(cloud.fields, {"intensity": scan["intensity"][:n], "ring": scan["ring"][:n].astype(np.uint8)})


def write_pcd(o3d, path, pc, encoding: str) -> bool:
    ascii, compressed = encoding == "ascii", encoding == "binary_compressed"
    return o3d.t.io.write_point_cloud(path, pc, write_ascii=ascii, compressed=compressed)


@pytest.mark.parametrize("encoding", ["binary", "ascii", "binary_compressed"])
def test_pcd_written_by_open3d(tmp_path, scan, encoding):
    o3d = pytest.importorskip("open3d")
    pc = o3d.t.geometry.PointCloud()
    pc.point.positions = o3d.core.Tensor(scan["xyz"])
    pc.point.intensity = o3d.core.Tensor(scan["intensity"][:, None])
    pc.point.ring = o3d.core.Tensor(scan["ring"][:, None])
    pc.point.time = o3d.core.Tensor(scan["time"][:, None])
    path = str(tmp_path / "a.pcd")
    assert write_pcd(o3d, path, pc, encoding)
    with open(path, "rb") as f:
        assert f"DATA {encoding}".encode() in f.read(1000)
    cloud = sio.read_points(path)
    if encoding == "ascii":  # Open3D writes ASCII PCD with limited precision
        np.testing.assert_allclose(cloud.xyz, scan["xyz"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cloud.fields["intensity"], scan["intensity"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cloud.fields["time"], scan["time"], rtol=1e-9)
        np.testing.assert_array_equal(cloud.fields["ring"], scan["ring"])
        assert set(cloud.fields) == {"intensity", "ring", "time"}
    else:
        np.testing.assert_array_equal(cloud.xyz, scan["xyz"])
        assert_fields_equal(cloud.fields, {k: scan[k] for k in ("intensity", "ring", "time")})


@pytest.mark.parametrize("ext", [".las", ".laz"])
def test_las_laz_written_by_laspy(tmp_path, scan, ext):
    pytest.importorskip("laspy")
    if ext == ".laz":
        pytest.importorskip("lazrs")
    intensity = (scan["intensity"] * 65535).astype(np.uint16)
    stored = write_las(tmp_path / f"a{ext}", scan["xyz"], intensity, scan["classification"], scan["time"])
    cloud = sio.read_points(tmp_path / f"a{ext}")
    np.testing.assert_allclose(cloud.xyz, stored, rtol=0, atol=1e-5)  # float32 rounding of <= 60 m
    assert np.abs(cloud.xyz - scan["xyz"]).max() <= 0.0005 + 1e-5  # quantized to the 1 mm scale
    assert_fields_equal(cloud.fields, {
        "intensity": intensity, "classification": scan["classification"],
        "return_number": np.ones(300, np.uint8), "time": scan["time"],
    })


def test_las_without_gps_time(tmp_path, scan):
    pytest.importorskip("laspy")
    write_las(tmp_path / "a.las", scan["xyz"], np.arange(300, dtype=np.uint16), scan["classification"])
    cloud = sio.read_points(tmp_path / "a.las")
    assert set(cloud.fields) == {"intensity", "classification", "return_number"}
    np.testing.assert_array_equal(cloud.fields["intensity"], np.arange(300))


def test_labels(tmp_path):
    rng = np.random.default_rng(0)
    semantic = rng.integers(0, 260, 500).astype(np.uint16)
    instance = rng.integers(0, 65536, 500).astype(np.uint16)
    raw = semantic.astype(np.uint32) + instance.astype(np.uint32) * 65536
    raw.astype("<u4").tofile(tmp_path / "000000.label")
    sem, ins = sio.read_labels(tmp_path / "000000.label", num_points=500)
    assert sem.dtype == ins.dtype == np.uint16
    np.testing.assert_array_equal(sem, semantic)
    np.testing.assert_array_equal(ins, instance)
    sio.write_labels(tmp_path / "b.label", semantic.astype(np.int64), instance)
    assert (tmp_path / "b.label").read_bytes() == (tmp_path / "000000.label").read_bytes()
    sio.write_labels(tmp_path / "c.label", semantic)
    np.testing.assert_array_equal(sio.read_labels(tmp_path / "c.label")[1], np.zeros(500, np.uint16))
    with pytest.raises(ValueError, match=r"semantic labels must be in \[0, 65535\], got \[-1"):
        sio.write_labels(tmp_path / "d.label", np.array([-1, 3]))
    with pytest.raises(ValueError, match="semantic has 2 labels but instance has 3"):
        sio.write_labels(tmp_path / "d.label", np.array([1, 3]), np.array([1, 2, 3]))
    assert not (tmp_path / "d.label").exists()


def test_voxels(tmp_path):
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(2 * 6 * 5 * 4, generator=gen)[:40]
    coords = torch.stack([flat // 120, flat // 20 % 6, flat // 4 % 5, flat % 4], 1).int()
    x = SparseTensor(torch.randn(40, 3, generator=gen), coords, spatial_shape=(6, 5, 4), stride=(2, 2, 1), batch_size=3)
    counts = torch.randint(1, 9, (40,), generator=gen)
    path = tmp_path / "000000.voxels.npz"
    sio.save_voxels(path, x, voxel_size=(0.05, 0.05, 0.1), point_range=np.array([0, -40, -3, 70.4, 40, 1.0]),
                    counts=counts, path="000000.bin", num_points=12345)  # "path" is a meta name too
    y, meta = sio.load_voxels(path)
    torch.testing.assert_close(y.coords, x.coords, rtol=0, atol=0)
    torch.testing.assert_close(y.features, x.features, rtol=0, atol=0)
    assert (y.spatial_shape, y.stride, y.batch_size) == ((6, 5, 4), (2, 2, 1), 3)
    assert set(meta) == {"voxel_size", "point_range", "counts", "path", "num_points"}
    np.testing.assert_array_equal(meta["voxel_size"], [0.05, 0.05, 0.1])
    np.testing.assert_array_equal(meta["point_range"], [0, -40, -3, 70.4, 40, 1.0])
    np.testing.assert_array_equal(meta["counts"], counts.numpy())
    assert meta["path"] == "000000.bin" and meta["num_points"] == 12345
    with np.load(path) as archive:  # the documented layout, read independently
        assert archive["coords"].dtype == np.int32 and archive["coords"].shape == (40, 4)
        assert int(archive["version"]) == sio.VOXEL_FORMAT_VERSION and int(archive["batch_size"]) == 3
        np.testing.assert_array_equal(archive["spatial_shape"], [6, 5, 4])
    with pytest.raises(ValueError, match="'stride' is reserved"):
        sio.save_voxels(tmp_path / "bad.npz", x, stride=2)
    with pytest.raises(TypeError, match="'extra' must be numbers, strings"):
        sio.save_voxels(tmp_path / "bad.npz", x, extra={"a": 1})
    assert listing(tmp_path) == ["000000.voxels.npz"]


def test_empty_voxels_and_bfloat16(tmp_path):
    x = SparseTensor(torch.zeros(0, 2, dtype=torch.bfloat16), torch.zeros(0, 4, dtype=torch.int32), (3, 3, 3))
    sio.save_voxels(tmp_path / "e.npz", x)
    y, meta = sio.load_voxels(tmp_path / "e.npz")
    assert y.num_voxels == 0 and y.num_channels == 2 and y.dtype == torch.float32 and meta == {}


# =============================================================================== PointCloud
def test_point_cloud_methods():
    xyz = np.array([[0, 1, 2], [np.nan, 0, 0], [3, -1, 5], [1, np.inf, 0]], np.float64)
    cloud = PointCloud(xyz, {"intensity": np.array([0.1, 0.2, 0.3, 0.4]), "rgb": np.arange(12).reshape(4, 3)})
    assert len(cloud) == 4 and cloud.field_names == ("intensity", "rgb") and cloud.xyz.dtype == np.float32
    np.testing.assert_array_equal(cloud.finite_mask(), [True, False, True, False])
    lo, hi = cloud.bounds()
    np.testing.assert_array_equal(lo, [0, -1, 2])
    np.testing.assert_array_equal(hi, [3, 1, 5])
    arr = cloud.to_array(("intensity", "rgb"))
    assert arr.dtype == np.float32 and arr.shape == (4, 7)
    np.testing.assert_array_equal(arr[:, 3], np.float32([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_array_equal(arr[:, 4:], np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(cloud.to_array("intensity"), cloud.to_array())
    np.testing.assert_array_equal(cloud.to_array(()), cloud.xyz)
    with pytest.raises(KeyError, match=r"no field 'ring'; available fields: \['intensity', 'rgb'\]"):
        cloud.to_array(("intensity", "ring"))
    with pytest.raises(KeyError, match=r"from scan\.ply has no field 'intensity'; available fields: none"):
        PointCloud(xyz, path="scan.ply").to_array()
    with pytest.raises(ValueError, match=r"field 'ring' must be \[N\] or \[N, k\] with N = 4 points, got shape \(3,\)"):
        PointCloud(xyz, {"ring": np.zeros(3)})
    with pytest.raises(ValueError, match=r"xyz must be numbers \[N, 3\]"):
        PointCloud(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no finite points"):
        PointCloud(np.full((2, 3), np.nan)).bounds()


def test_non_finite_points_are_read(tmp_path, scan):
    data = np.column_stack([scan["xyz"], scan["intensity"]]).astype("<f4")
    data[5, 0], data[7, 2] = np.nan, -np.inf
    data.tofile(tmp_path / "a.bin")
    cloud = sio.read_points(tmp_path / "a.bin")
    assert len(cloud) == 300
    np.testing.assert_array_equal(np.flatnonzero(~cloud.finite_mask()), [5, 7])


@pytest.mark.skipif(not KITTI_SCANS, reason="no KITTI scans under ../shared/data/kitti/velodyne")
@pytest.mark.parametrize("path", KITTI_SCANS, ids=os.path.basename)
def test_real_kitti_scans(path):
    cloud = sio.read_points(path)
    assert 100_000 <= len(cloud) <= 140_000
    assert len(cloud) * 16 == os.path.getsize(path)
    intensity = cloud.fields["intensity"]
    assert intensity.dtype == np.float32 and 0 <= intensity.min() and intensity.max() <= 1
    assert cloud.finite_mask().all()
    lo, hi = cloud.bounds()
    assert (hi - lo)[:2].min() > 20 and np.abs(np.concatenate([lo, hi])).max() < 150  # a street, in metres
    assert cloud.to_array().shape == (len(cloud), 4)


# =============================================================================== bad files
def write_bytes(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def truncated(path, keep: float = 0.6) -> bytes:
    data = open(path, "rb").read()
    return data[: int(len(data) * keep)]


def test_bad_raw_scans(tmp_path):
    path = write_bytes(tmp_path, "scan.bin", bytes(18))
    problem = r"18 bytes is not a multiple of 16 \(4 float32 per point: x, y, z, intensity\); "
    problem += "the file is truncated or not a KITTI velodyne scan"
    with pytest.raises(PointCloudError, match=r"scan\.bin: " + problem):
        sio.read_points(path)
    path = write_bytes(tmp_path, "scan.pcd.bin", bytes(50))
    with pytest.raises(PointCloudError, match=r"scan\.pcd\.bin: 50 bytes is not a multiple of 20 .*ring.*nuScenes"):
        sio.read_points(path)


@pytest.mark.parametrize("array, problem", [
    (np.zeros((10, 2)), r"got float64 array of shape \(10, 2\)"),
    (np.zeros(30, np.float32), r"got float32 array of shape \(30,\)"),
    (np.zeros((10, 4), np.int32), r"got int32 array of shape \(10, 4\)"),
], ids=["two_columns", "flat", "int32"])  # fmt: skip
def test_npy_wrong_shape_or_dtype(tmp_path, array, problem):
    np.save(tmp_path / "pts.npy", array)
    expected = r"pts\.npy: the \.npy array must be a float array \[N, >=3\].*" + problem
    with pytest.raises(PointCloudError, match=expected):
        sio.read_points(tmp_path / "pts.npy")


def test_npy_corrupt(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((100, 4)))
    path = write_bytes(tmp_path, "cut.npy", truncated(tmp_path / "good.npy"))
    with pytest.raises(PointCloudError, match=r"cut\.npy: not a valid \.npy file"):
        sio.read_points(path)
    path = write_bytes(tmp_path, "junk.npy", b"this is not numpy data at all")
    with pytest.raises(PointCloudError, match=r"junk\.npy: not a valid \.npy file"):
        sio.read_points(path)
    np.savez(tmp_path / "arch.npz", xyz=np.zeros((3, 3)))
    os.rename(tmp_path / "arch.npz", tmp_path / "arch.npy")
    with pytest.raises(PointCloudError, match=r"arch\.npy: is an \.npz archive"):
        sio.read_points(tmp_path / "arch.npy")


def test_npz_corrupt(tmp_path):
    path = write_bytes(tmp_path, "junk.npz", b"\x93NUMPY not a zip")
    with pytest.raises(PointCloudError, match=r"junk\.npz: not a valid \.npz archive \(not a zip file\)"):
        sio.read_points(path)
    np.savez(tmp_path / "good.npz", xyz=np.random.rand(2000, 3), intensity=np.random.rand(2000))
    path = write_bytes(tmp_path, "cut.npz", truncated(tmp_path / "good.npz", 0.5))
    with pytest.raises(PointCloudError, match=r"cut\.npz: not a valid \.npz archive .*truncated or corrupt"):
        sio.read_points(path)
    np.savez(tmp_path / "nokey.npz", pts=np.zeros((3, 3)), label=np.zeros(3))
    problem = r"the \.npz archive has no 'xyz' or 'points' array \(keys: \['label', 'pts'\]\)"
    with pytest.raises(PointCloudError, match=r"nokey\.npz: " + problem):
        sio.read_points(tmp_path / "nokey.npz")
    np.savez(tmp_path / "shape.npz", xyz=np.zeros((3, 4)))
    problem = r"'xyz' must be a float array \[N, 3\], got float64 array of shape \(3, 4\)"
    with pytest.raises(PointCloudError, match=r"shape\.npz: " + problem):
        sio.read_points(tmp_path / "shape.npz")


def make_ply(tmp_path, n=200, seed=0) -> str:
    s = make_scan(n, seed)
    sio.write_ply(tmp_path / "good.ply", PointCloud(s["xyz"], {"intensity": s["intensity"]}))
    return str(tmp_path / "good.ply")


def test_ply_truncated(tmp_path):
    pytest.importorskip("open3d")
    path = write_bytes(tmp_path, "cut.ply", truncated(make_ply(tmp_path)))
    with pytest.raises(PointCloudError, match=r"cut\.ply: the PLY header declares 200 vertices \(3200 bytes\) "
                                              r"but the body has only \d+ bytes; the file is truncated"):
        sio.read_points(path)


def test_ply_ascii_truncated_or_garbled(tmp_path, scan):
    o3d = pytest.importorskip("open3d")
    pc = o3d.t.geometry.PointCloud(o3d.core.Tensor(scan["xyz"]))
    assert o3d.t.io.write_point_cloud(str(tmp_path / "a.ply"), pc, write_ascii=True)
    text = (tmp_path / "a.ply").read_text().splitlines(keepends=True)
    end = text.index("end_header\n") + 1
    path = write_bytes(tmp_path, "cut.ply", "".join(text[: end + 100]).encode())
    with pytest.raises(PointCloudError, match=r"cut\.ply: the PLY header declares 300 vertices but the ASCII body "
                                              r"has only 100 data lines; the file is truncated"):
        sio.read_points(path)
    text[end + 10] = "1.0 oops 2.0\n"
    path = write_bytes(tmp_path, "garbled.ply", "".join(text).encode())
    with pytest.raises(PointCloudError, match=r"garbled\.ply: Open3D could not read the file \(Read PLY failed.*\); "
                                              r"the file is truncated or corrupt"):
        sio.read_points(path)


PLY_START = b"ply\nformat binary_little_endian 1.0\n"


@pytest.mark.parametrize("content, problem", [
    (b"", r"not a PLY file \(it does not start with 'ply'\)"),
    (b"\x00\x01garbage", r"not a PLY file"),
    (PLY_START + b"element vertex 3\nproperty float x\n", r"the PLY header has no 'end_header' line"),
    (PLY_START + b"element vertex 3\nproperty float x\nproperty float y\nend_header\n" + bytes(24),
     r"the PLY file has no vertex element with x, y, z properties"),
    (PLY_START + b"element vertex many\nend_header\n", r"bad PLY header line 'element vertex many'"),
    (PLY_START + b"element vertex 1\nproperty float128 x\nend_header\n", r"bad PLY header line"),
    (b"ply\nformat zip 1.0\nelement vertex 1\nproperty float x\nend_header\n", r"unknown PLY format 'zip'"),
], ids=["empty", "garbage", "no_end_header", "no_z", "bad_count", "bad_type", "bad_format"])  # fmt: skip
def test_ply_bad_header(tmp_path, content, problem):
    path = write_bytes(tmp_path, "bad.ply", content)
    with pytest.raises(PointCloudError, match=r"bad\.ply: " + problem):
        sio.read_points(path)


@pytest.mark.parametrize("encoding", ["binary", "ascii", "binary_compressed"])
def test_pcd_truncated(tmp_path, scan, encoding):
    o3d = pytest.importorskip("open3d")
    pc = o3d.t.geometry.PointCloud(o3d.core.Tensor(scan["xyz"]))
    pc.point.intensity = o3d.core.Tensor(scan["intensity"][:, None])
    good = str(tmp_path / "good.pcd")
    assert write_pcd(o3d, good, pc, encoding)
    path = write_bytes(tmp_path, "cut.pcd", truncated(good))
    problem = {
        "binary": r"declares 300 points \(4800 bytes\) but the body has only \d+ bytes; the file is truncated",
        "ascii": r"declares 300 points but the ASCII body has only \d+ lines; the file is truncated",
        "binary_compressed": r"Open3D could not read the file \(.*\); the file is truncated or corrupt",
    }[encoding]
    with pytest.raises(PointCloudError, match=r"cut\.pcd: (the PCD header )?" + problem):
        sio.read_points(path)


def test_pcd_bad_header(tmp_path):
    path = write_bytes(tmp_path, "junk.pcd", b"hello world\n")
    problem = r"the PCD header has no 'DATA' line; the file is truncated or not a PCD file"
    with pytest.raises(PointCloudError, match=r"junk\.pcd: " + problem):
        sio.read_points(path)
    header = b"VERSION 0.7\nFIELDS a b\nSIZE 4 4\nTYPE F F\nPOINTS 1\nDATA ascii\n"
    path = write_bytes(tmp_path, "noxyz.pcd", header + b"1 2\n")
    with pytest.raises(PointCloudError, match=r"noxyz\.pcd: the PCD header has no x, y, z fields \(FIELDS 'a b'\)"):
        sio.read_points(path)


@pytest.mark.parametrize("case", ["signature", "short_header", "cut_records", "cut_bytes"])
def test_las_bad(tmp_path, scan, case):
    pytest.importorskip("laspy")
    write_las(tmp_path / "good.las", scan["xyz"], np.zeros(300, np.uint16), scan["classification"], scan["time"])
    data = (tmp_path / "good.las").read_bytes()
    record = 28  # point format 1
    content, problem = {
        "signature": (b"XXXX" + data[4:], r"not a valid LAS file \(LaspyException: Invalid file signature"),
        "short_header": (data[:60], r"not a valid LAS file \(.*"),
        # laspy itself returns the 297 points that are there without complaint
        "cut_records": (data[: -3 * record], r"the LAS header declares 300 points but the file holds 297; the file is "
                                             r"truncated"),
        "cut_bytes": (data[:-50], r"not a valid LAS file \(.*"),
    }[case]
    path = write_bytes(tmp_path, "bad.las", content)
    with pytest.raises(PointCloudError, match=r"bad\.las: " + problem):
        sio.read_points(path)


def test_laz_truncated(tmp_path, scan):
    pytest.importorskip("laspy")
    pytest.importorskip("lazrs")
    write_las(tmp_path / "good.laz", scan["xyz"], np.zeros(300, np.uint16), scan["classification"], scan["time"])
    path = write_bytes(tmp_path, "cut.laz", truncated(tmp_path / "good.laz", 0.8))
    with pytest.raises(PointCloudError, match=r"cut\.laz: not a valid LAZ file \(.*\)"):
        sio.read_points(path)


def test_bad_labels(tmp_path):
    path = write_bytes(tmp_path, "000007.label", bytes(7))
    problem = r"7 bytes is not a multiple of 4 \(one uint32 label per point\)"
    with pytest.raises(PointCloudError, match=r"000007\.label: " + problem):
        sio.read_labels(path)
    path = write_bytes(tmp_path, "000008.label", bytes(40))
    with pytest.raises(PointCloudError, match=r"000008\.label: 10 labels but the scan has 12 points"):
        sio.read_labels(path, num_points=12)


def test_bad_voxel_files(tmp_path):
    x = SparseTensor(torch.ones(2, 1), torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.int32), (2, 2, 2))
    path = write_bytes(tmp_path, "junk.npz", b"not an archive")
    with pytest.raises(PointCloudError, match=r"junk\.npz: not a valid \.npz archive"):
        sio.load_voxels(path)
    np.savez(tmp_path / "points.npz", xyz=np.zeros((3, 3)))
    with pytest.raises(PointCloudError, match=r"points\.npz: not a sparseconv voxel file: missing \['coords', 'feats'"):
        sio.load_voxels(tmp_path / "points.npz")

    def rewrite(name, **changes):
        with np.load(tmp_path / "good.npz") as archive:
            arrays = {k: archive[k] for k in archive.files}
        np.savez(tmp_path / name, **{**arrays, **changes})
        return tmp_path / name

    sio.save_voxels(tmp_path / "good.npz", x)
    with pytest.raises(PointCloudError, match=r"new\.npz: voxel file version 99 is not supported .*upgrade sparseconv"):
        sio.load_voxels(rewrite("new.npz", version=np.int64(99)))
    with pytest.raises(PointCloudError, match=r"dup\.npz: invalid voxel data: .*"):
        sio.load_voxels(rewrite("dup.npz", coords=np.zeros((2, 4), np.int32)))
    with pytest.raises(PointCloudError, match=r"out\.npz: invalid voxel data: .*outside spatial_shape"):
        sio.load_voxels(rewrite("out.npz", spatial_shape=np.array([1, 1, 1])))
    with pytest.raises(PointCloudError, match=r"fcoords\.npz: invalid voxel data: coords must be integers, got float"):
        sio.load_voxels(rewrite("fcoords.npz", coords=np.zeros((2, 4), np.float32)))
    path = write_bytes(tmp_path, "cut.npz", truncated(tmp_path / "good.npz", 0.7))
    with pytest.raises(PointCloudError, match=r"cut\.npz: not a valid \.npz archive"):
        sio.load_voxels(path)


def test_missing_empty_and_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*nowhere\.bin'"):
        sio.read_points(tmp_path / "nowhere.bin")
    with pytest.raises(FileNotFoundError, match=r"nothing\.label"):
        sio.read_labels(tmp_path / "nothing.label")
    with pytest.raises(FileNotFoundError, match=r"vox\.npz"):
        sio.load_voxels(tmp_path / "vox.npz")
    with pytest.raises(PointCloudError, match="empty path"):
        sio.read_points("")
    with pytest.raises(PointCloudError, match=r"is a directory"):
        sio.read_points(tmp_path)
    path = write_bytes(tmp_path, "scan.xyz", b"1 2 3\n")
    supported = r"supported formats: \.bin, \.pcd\.bin, \.npy, \.npz, \.ply, \.pcd, \.las, \.laz"
    with pytest.raises(PointCloudError, match=r"scan\.xyz: unknown point cloud extension \.xyz; " + supported):
        sio.read_points(path)
    path = write_bytes(tmp_path, "000000.label", bytes(8))
    with pytest.raises(PointCloudError, match=r"000000\.label: unknown point cloud extension \.label;.*read_labels"):
        sio.read_points(path)
    with pytest.raises(ValueError, match=r"unknown point cloud format 'e57'; supported: \.bin, "):
        sio.read_points(path, format="e57")
    assert set(SUPPORTED) == set(sio.SUPPORTED_FORMATS)


SUPPORTED = [".bin", ".pcd.bin", ".npy", ".npz", ".ply", ".pcd", ".las", ".laz"]


def test_missing_optional_packages(tmp_path, monkeypatch):
    for name in ("a.ply", "a.pcd", "a.las"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "open3d", None)  # makes `import open3d` raise ImportError
    monkeypatch.setitem(sys.modules, "laspy", None)
    with pytest.raises(ImportError, match=r"writing \.ply files needs Open3D: pip install open3d-cpu"):
        sio.write_ply(tmp_path / "b.ply", PointCloud(np.zeros((2, 3))))
    (tmp_path / "c.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                                     b"property float z\nend_header\n1 2 3\n")
    with pytest.raises(ImportError, match=r"reading \.ply files needs Open3D: pip install open3d-cpu"):
        sio.read_points(tmp_path / "c.ply")
    with pytest.raises(ImportError, match=r"reading \.las files needs laspy: pip install laspy"):
        sio.read_points(tmp_path / "a.las")
    assert not (tmp_path / "b.ply").exists()


# =============================================================================== atomic writes
def test_atomic_write_success_and_permissions(tmp_path):
    with sio.atomic_write(tmp_path / "a.txt", "w", encoding="utf-8") as f:
        f.write("hello")
        assert not (tmp_path / "a.txt").exists()  # only the temporary file exists until the end
    assert (tmp_path / "a.txt").read_text() == "hello"
    (tmp_path / "ref.txt").write_text("x")  # a file created the usual way
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == stat.S_IMODE(os.stat(tmp_path / "ref.txt").st_mode)
    with pytest.raises(FileNotFoundError, match=r"the output folder does not exist: '.*missing'"):
        sio.write_kitti_bin(tmp_path / "missing" / "a.bin", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="mode must be"):
        with sio.atomic_write(tmp_path / "b.txt", "a"):
            pass


def test_atomic_write_failure_leaves_nothing(tmp_path):
    (tmp_path / "old.bin").write_bytes(b"old contents")
    before = listing(tmp_path)
    for name in ("new.bin", "old.bin"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            with sio.atomic_write(tmp_path / name) as f:
                f.write(b"partial" * 1000)
                raise RuntimeError("disk on fire")
    assert listing(tmp_path) == before
    assert (tmp_path / "old.bin").read_bytes() == b"old contents"


def test_writers_fail_midway_leave_nothing(tmp_path, scan, monkeypatch):
    cloud = PointCloud(scan["xyz"], {"intensity": scan["intensity"]})
    x = SparseTensor(torch.ones(1, 1), torch.zeros(1, 4, dtype=torch.int32), (1, 1, 1))
    (tmp_path / "old.npz").write_bytes(b"old")
    before = listing(tmp_path)

    real_savez = np.savez_compressed

    def savez_then_fail(file, **arrays):
        real_savez(file, **arrays)  # the whole archive is written to the temporary file
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "savez_compressed", savez_then_fail)
    for write in (lambda p: sio.save_voxels(p, x), lambda p: sio.write_npz_points(p, cloud)):
        for name in ("new.npz", "old.npz"):
            with pytest.raises(OSError, match="no space left"):
                write(tmp_path / name)
    assert listing(tmp_path) == before and (tmp_path / "old.npz").read_bytes() == b"old"

    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for write in (lambda p: sio.write_kitti_bin(p, cloud), lambda p: sio.write_labels(p, np.zeros(3, np.uint16))):
        with pytest.raises(OSError, match="I/O error"):
            write(tmp_path / "new.bin")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert listing(tmp_path) == before


def test_write_ply_failure_leaves_nothing(tmp_path, scan, monkeypatch):
    o3d = pytest.importorskip("open3d")
    cloud = PointCloud(scan["xyz"], {"intensity": scan["intensity"]})
    before = listing(tmp_path)
    real_write = o3d.t.io.write_point_cloud

    def write_half(path, pc, *args, **kwargs):  # a writer that dies after writing part of the file
        assert real_write(path, pc)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(o3d.t.io, "write_point_cloud", write_half)
    with pytest.raises(RuntimeError, match="killed while writing"):
        sio.write_ply(tmp_path / "a.ply", cloud)

    def write_half_quietly(path, pc, *args, **kwargs):  # what RPly does when a value cannot be written
        assert real_write(path, pc)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        return True

    monkeypatch.setattr(o3d.t.io, "write_point_cloud", write_half_quietly)
    with pytest.raises(OSError, match=r"a\.ply: Open3D wrote an incomplete PLY file \(the PLY header declares 300 "):
        sio.write_ply(tmp_path / "a.ply", cloud)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"empty\.ply: cannot write a PLY with 0 points"):
        sio.write_ply(tmp_path / "empty.ply", PointCloud(np.zeros((0, 3))))
    assert listing(tmp_path) == before


def test_voxel_file_keeps_the_voxel_geometry(tmp_path):
    import sparseconv as sc

    pts = torch.rand(200, 4) * 10
    x, _ = sc.voxelize(pts, (0.5, 0.25, 1.0), (0, 0, 0, 10, 10, 10))
    path = tmp_path / "v.npz"
    sio.save_voxels(path, x)
    y, meta = sio.load_voxels(path)
    assert y.geometry == x.geometry and meta == {}
    torch.testing.assert_close(sc.devoxelize(y, pts), sc.devoxelize(x, pts))
