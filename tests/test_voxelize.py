"""Voxelization and devoxelization against NumPy references (and spconv's PointToVoxel)."""
import os

import numpy as np
import pytest
import torch

import sparseconv as sc
from sparseconv import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KITTI = os.path.join(ROOT, "..", "shared", "data", "kitti", "velodyne", "000000.bin")
KITTI_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)


# ----------------------------------------------------------------------------------- references
def numpy_voxelize(points, voxel_size, point_range, reduce="mean", max_points=None, max_voxels=None, batch=None):
    """Plain NumPy, one point at a time: spconv PointToVoxel's rules written out.

    Returns (coords [V, 4] in first-appearance order, feats [V, F], counts [V], point_to_voxel [N], drops dict).
    """
    pts = np.asarray(points)
    dt = pts.dtype.type
    lo = np.asarray(point_range[:3], dtype=pts.dtype)
    vs = np.asarray(voxel_size, dtype=pts.dtype)
    grid = np.round((np.asarray(point_range[3:], np.float64) - np.asarray(point_range[:3], np.float64))
                    / np.asarray(voxel_size, np.float64)).astype(np.int64)
    index, coords, members = {}, [], []
    p2v = np.full(len(pts), -1, np.int64)
    drops = dict(nonfinite=0, outside=0, max_voxels=0, max_points=0)
    for i, p in enumerate(pts):
        if not np.isfinite(p[:3]).all():
            drops["nonfinite"] += 1
            continue
        q = np.floor((p[:3] - lo) / vs).astype(np.float64)
        if (q < 0).any() or (q >= grid).any():
            drops["outside"] += 1
            continue
        key = (0 if batch is None else int(batch[i]),) + tuple(int(v) for v in q)
        v = index.get(key)
        if v is None:
            if max_voxels is not None and len(coords) >= max_voxels:
                drops["max_voxels"] += 1
                continue
            v = index[key] = len(coords)
            coords.append(key)
            members.append([])
        if max_points is not None and len(members[v]) >= max_points:
            drops["max_points"] += 1
            continue
        members[v].append(i)
        p2v[i] = v
    feats = []
    for m in members:
        rows = pts[m]
        feats.append({"mean": rows.mean(0, dtype=np.float64).astype(dt), "max": rows.max(0),
                      "sum": rows.sum(0, dtype=np.float64).astype(dt), "first": rows[0],
                      "count": np.array([len(m)], dt)}[reduce])
    f = 1 if reduce == "count" else pts.shape[1]
    return (np.asarray(coords, np.int64).reshape(-1, 4), np.asarray(feats, dt).reshape(-1, f),
            np.asarray([len(m) for m in members], np.int64), p2v, drops)


def to_key_order(coords):
    """Permutation that sorts [V, 4] coordinates by (batch, x, y, z)."""
    return np.lexsort(coords[:, ::-1].T)


def lidar_like(n=3000, seed=0, c=4):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-np.pi, np.pi, n)
    r = rng.uniform(2, 60, n) ** 1.0
    pts = np.stack([r * np.cos(theta), r * np.sin(theta), rng.normal(-1.5, 0.6, n)], 1)
    # clusters: many points per voxel
    pts[: n // 3] = pts[: n // 3 : 1] * 0 + rng.normal([10, 2, -1], 0.2, (n // 3, 3))
    extra = rng.uniform(0, 1, (n, c - 3))
    return np.concatenate([pts, extra], 1).astype(np.float32)


def check_against_numpy(points, voxel_size, point_range, reduce, max_points=None, max_voxels=None, batch=None):
    pts = torch.from_numpy(points)
    b = None if batch is None else torch.from_numpy(batch)
    res = sc.voxelize(pts, voxel_size, point_range, reduce=reduce, max_points_per_voxel=max_points,
                      max_voxels=max_voxels, batch=b, return_counts=True)
    coords, feats, counts, p2v, drops = numpy_voxelize(points, voxel_size, point_range, reduce, max_points,
                                                       max_voxels, batch)
    order = to_key_order(coords)
    x = res.tensor
    np.testing.assert_array_equal(x.coords.numpy(), coords[order])
    rtol = 1e-6 if points.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(x.features.numpy(), feats[order], rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(res.counts.numpy(), counts[order])
    rank_of = np.empty(len(order), np.int64)
    rank_of[order] = np.arange(len(order))
    expected_p2v = np.where(p2v >= 0, rank_of[np.maximum(p2v, 0)], -1)
    np.testing.assert_array_equal(res.point_to_voxel.numpy(), expected_p2v)
    assert res.stats == {
        "points": len(points), "kept": int(counts.sum()), "voxels": len(counts),
        "dropped_nonfinite": drops["nonfinite"], "dropped_out_of_range": drops["outside"],
        "dropped_max_voxels": drops["max_voxels"], "dropped_max_points": drops["max_points"],
    }
    return res


# ----------------------------------------------------------------------------------- voxelize
@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "first", "count"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_reduce_matches_numpy(reduce, dtype):
    pts = lidar_like(2000, seed=1).astype(dtype)
    check_against_numpy(pts, (0.5, 0.5, 0.4), (-30, -30, -4, 30, 30, 2), reduce)


@pytest.mark.parametrize("max_points,max_voxels", [(1, None), (3, None), (None, 50), (2, 40), (5, 10000)])
def test_limits_follow_point_to_voxel_rules(max_points, max_voxels):
    pts = lidar_like(2500, seed=2)
    res = check_against_numpy(pts, (1.0, 1.0, 1.0), (-30, -30, -4, 30, 30, 2), "mean", max_points, max_voxels)
    if max_voxels is not None:
        assert res.tensor.num_voxels <= max_voxels


def test_random_inputs_with_nan_inf_and_out_of_range_points():
    rng = np.random.default_rng(3)
    pts = rng.uniform(-12, 12, (1500, 5)).astype(np.float32)
    pts[rng.choice(1500, 40, replace=False), rng.integers(0, 3, 40)] = np.nan
    pts[rng.choice(1500, 20, replace=False), 1] = np.inf
    pts[rng.choice(1500, 20, replace=False), 2] = -np.inf
    pts[5] = [1e30, 0, 0, 0, 0]  # would overflow an integer conversion
    res = check_against_numpy(pts, (0.7, 0.9, 1.1), (-10, -10, -10, 10, 10, 10), "max")
    assert res.stats["dropped_nonfinite"] > 0 and res.stats["dropped_out_of_range"] > 0


def test_batch_index_and_batch_size():
    pts = lidar_like(1200, seed=4)
    batch = np.random.default_rng(4).integers(0, 3, len(pts)).astype(np.int64)
    res = check_against_numpy(pts, (0.5, 0.5, 0.5), (-30, -30, -4, 30, 30, 2), "mean", batch=batch)
    assert res.tensor.batch_size == 3
    res = sc.voxelize(torch.from_numpy(pts), (0.5, 0.5, 0.5), (-30, -30, -4, 30, 30, 2),
                      batch=torch.from_numpy(batch), batch_size=5)
    assert res.tensor.batch_size == 5


def test_points_on_range_boundaries():
    vs, rng = (0.25, 0.25, 0.25), (0.0, 0.0, 0.0, 2.0, 2.0, 2.0)
    pts = np.array([[0, 0, 0], [2, 1, 1], [1.999, 1.999, 1.999], [-1e-7, 1, 1], [0.25, 0.5, 0.75]], np.float32)
    res = check_against_numpy(pts, vs, rng, "first")
    assert res.stats["dropped_out_of_range"] == 2


def test_empty_and_all_dropped_inputs():
    for pts in (np.zeros((0, 4), np.float32), np.full((5, 4), np.nan, np.float32)):
        res = sc.voxelize(torch.from_numpy(pts), (1, 1, 1), (0, 0, 0, 4, 4, 4), return_counts=True)
        assert res.tensor.num_voxels == 0 and res.tensor.features.shape == (0, 4)
        assert (res.point_to_voxel == -1).all() and res.stats["kept"] == 0
        padded = sc.voxelize_padded(torch.from_numpy(pts), (1, 1, 1), (0, 0, 0, 4, 4, 4), 3)
        assert padded.voxels.shape == (0, 3, 4)


def test_result_unpacks_and_carries_geometry_and_shape():
    pts = torch.from_numpy(lidar_like(500, seed=5))
    x, p2v = sc.voxelize(pts, (0.5, 0.4, 0.25), (-30, -30, -4, 30, 30, 2))
    assert x.spatial_shape == (120, 150, 24) and p2v.shape == (500,)
    assert x.geometry.voxel_size == (0.5, 0.4, 0.25) and x.geometry.origin == (-30.0, -30.0, -4.0)


def test_centroid_offset():
    pts = lidar_like(800, seed=6)
    res = sc.voxelize(torch.from_numpy(pts), (0.5, 0.5, 0.5), (-30, -30, -4, 30, 30, 2), reduce="max",
                      return_centroid_offset=True)
    coords, feats, *_ = numpy_voxelize(pts, (0.5, 0.5, 0.5), (-30, -30, -4, 30, 30, 2), "mean")
    order = to_key_order(coords)
    centre = np.array([-30, -30, -4], np.float32) + (coords[order][:, 1:] + 0.5) * 0.5
    np.testing.assert_allclose(res.centroid_offset.numpy(), feats[order][:, :3] - centre, atol=1e-5)


def test_padded_layout_matches_numpy():
    pts = lidar_like(2000, seed=7)
    out = sc.voxelize_padded(torch.from_numpy(pts), (1.0, 1.0, 1.0), (-30, -30, -4, 30, 30, 2), 4, 300)
    coords, _, counts, p2v, _ = numpy_voxelize(pts, (1.0, 1.0, 1.0), (-30, -30, -4, 30, 30, 2), "first", 4, 300)
    np.testing.assert_array_equal(out.coords.numpy(), coords)  # first-appearance order, as spconv
    np.testing.assert_array_equal(out.num_points.numpy(), counts)
    np.testing.assert_array_equal(out.point_to_voxel.numpy(), p2v)
    expected = np.zeros((len(coords), 4, 4), np.float32)
    fill = np.zeros(len(coords), np.int64)
    for i, v in enumerate(p2v):
        if v >= 0:
            expected[v, fill[v]] = pts[i]
            fill[v] += 1
    np.testing.assert_array_equal(out.voxels.numpy(), expected)


@pytest.mark.skipif(not os.path.exists(KITTI), reason="../shared/data/kitti is absent")
def test_real_kitti_scan_matches_vectorised_numpy():
    pts = np.fromfile(KITTI, np.float32).reshape(-1, 4)
    vs = (0.05, 0.05, 0.1)
    res = sc.voxelize(torch.from_numpy(pts), vs, KITTI_RANGE, return_counts=True)
    q = np.floor((pts[:, :3] - np.array(KITTI_RANGE[:3], np.float32)) / np.array(vs, np.float32))
    grid = np.round((np.array(KITTI_RANGE[3:]) - np.array(KITTI_RANGE[:3])) / np.array(vs)).astype(np.int64)
    keep = np.isfinite(pts[:, :3]).all(1) & (q >= 0).all(1) & (q < grid).all(1)
    uniq, inverse, counts = np.unique(q[keep].astype(np.int64), axis=0, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), 4))
    np.add.at(sums, inverse.reshape(-1), pts[keep].astype(np.float64))
    np.testing.assert_array_equal(res.tensor.coords[:, 1:].numpy(), uniq)
    np.testing.assert_allclose(res.tensor.features.numpy(), sums / counts[:, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.counts.numpy(), counts)
    assert res.tensor.num_voxels == 41281 and res.stats["kept"] == keep.sum()


# ----------------------------------------------------------------------------------- spconv parity
def _spconv_point_to_voxel(pts, vs, rng, max_points, max_voxels):
    spconv_utils = pytest.importorskip("spconv.pytorch.utils")
    torch.set_num_threads(1)  # spconv's CPU kernels race on several threads (docs/migration.md)
    try:
        gen = spconv_utils.PointToVoxel(vsize_xyz=list(vs), coors_range_xyz=list(rng), num_point_features=pts.shape[1],
                                        max_num_voxels=max_voxels, max_num_points_per_voxel=max_points)
        return gen(torch.from_numpy(pts))
    finally:
        torch.set_num_threads(torch.get_num_threads())


@pytest.mark.parametrize("vs,max_points,max_voxels", [((0.05, 0.05, 0.1), 5, 150000), ((0.16, 0.16, 4.0), 32, 40000),
                                                       ((0.4, 0.4, 0.4), 3, 2000)])
def test_padded_layout_equals_spconv_point_to_voxel(vs, max_points, max_voxels):
    if os.path.exists(KITTI):
        pts = np.fromfile(KITTI, np.float32).reshape(-1, 4)
    else:
        pts = lidar_like(20000, seed=8)
    voxels, indices, num = _spconv_point_to_voxel(pts, vs, KITTI_RANGE, max_points, max_voxels)
    ours = sc.voxelize_padded(torch.from_numpy(pts), vs, KITTI_RANGE, max_points, max_voxels)
    np.testing.assert_array_equal(ours.coords[:, 1:].numpy(), indices.numpy()[:, ::-1])  # spconv: (z, y, x)
    np.testing.assert_array_equal(ours.num_points.numpy(), num.numpy())
    np.testing.assert_array_equal(ours.voxels.numpy(), voxels.numpy())


# ----------------------------------------------------------------------------------- devoxelize
def numpy_devoxelize(coords, feats, pts, vs, origin, mode):
    table = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = np.zeros((len(pts), feats.shape[1]))
    for n, p in enumerate(pts):
        u = (p[:3].astype(np.float64) - origin) / vs
        if mode == "nearest":
            i = table.get((0,) + tuple(int(v) for v in np.floor(u)))
            if i is not None:
                out[n] = feats[i]
            continue
        u = u - 0.5
        base = np.floor(u)
        f = u - base
        acc, wsum = np.zeros(feats.shape[1]), 0.0
        for corner in np.ndindex(2, 2, 2):
            c = np.array(corner)
            i = table.get((0,) + tuple(int(v) for v in base + c))
            if i is None:
                continue
            w = np.prod(np.where(c == 1, f, 1 - f))
            acc += w * feats[i]
            wsum += w
        if wsum > 0:
            out[n] = acc / wsum
    return out


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_devoxelize_matches_numpy(mode):
    pts = lidar_like(1500, seed=9).astype(np.float64)
    vs, rng = (0.5, 0.5, 0.5), (-30, -30, -4, 30, 30, 2)
    x, p2v = sc.voxelize(torch.from_numpy(pts), vs, rng)
    feats = torch.randn(x.num_voxels, 3, dtype=torch.float64)
    x = x.replace_feature(feats)
    query = np.concatenate([pts, np.random.default_rng(9).uniform(-30, 30, (200, 4))])  # some in empty space
    got = sc.devoxelize(x, torch.from_numpy(query), mode)
    ref = numpy_devoxelize(x.coords.numpy(), feats.numpy(), query, np.array(vs), np.array(rng[:3], np.float64), mode)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)
    if mode == "trilinear":  # the voxel of every voxelized point is active: weights renormalise to 1
        kept = torch.from_numpy(pts)[p2v >= 0]
        ones = sc.devoxelize(x.replace_feature(torch.ones(x.num_voxels, 1, dtype=torch.float64)), kept, mode)
        torch.testing.assert_close(ones, torch.ones_like(ones))


def test_devoxelize_gradient():
    pts = torch.from_numpy(lidar_like(300, seed=10).astype(np.float64))
    x, _ = sc.voxelize(pts, (1.0, 1.0, 1.0), (-30, -30, -4, 30, 30, 2))
    feats = torch.randn(x.num_voxels, 2, dtype=torch.float64, requires_grad=True)
    for mode in ("nearest", "trilinear"):
        assert torch.autograd.gradcheck(lambda f: sc.devoxelize(x.replace_feature(f), pts[:50], mode), (feats,))


def test_devoxelize_after_strided_conv_uses_the_coarse_geometry():
    pts = torch.from_numpy(lidar_like(1000, seed=11).astype(np.float64))
    x, _ = sc.voxelize(pts, (0.5, 0.5, 0.5), (-30, -30, -4, 30, 30, 2))
    y = sc.nn.SparseConv3d(4, 2, 2, stride=2).double()(x)  # kernel 2 stride 2: voxel size 1.0, same origin
    assert y.geometry.voxel_size == (1.0, 1.0, 1.0) and y.geometry.origin == (-30.0, -30.0, -4.0)
    got = sc.devoxelize(y, pts, "nearest")
    ref = numpy_devoxelize(y.coords.numpy(), y.features.detach().numpy(), pts.numpy(), np.ones(3),
                           np.array([-30.0, -30.0, -4.0]), "nearest")
    np.testing.assert_allclose(got.detach().numpy(), ref)
    z = sc.nn.SparseConv3d(4, 2, 3, stride=2, padding=1).double()(x)  # centred on input voxel 2o
    centre = np.array(z.geometry.origin) + (z.coords[:, 1:].numpy() + 0.5) * np.array(z.geometry.voxel_size)
    fine_centre = np.array([-30.0, -30.0, -4.0]) + (2 * z.coords[:, 1:].numpy() + 0.5) * 0.5
    np.testing.assert_allclose(centre, fine_centre)


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(points=torch.zeros(4, 2)), ValueError, r"points must be \[N, C\] with C >= 3"),
    (dict(points=torch.zeros(4, 4, dtype=torch.int32)), TypeError, r"points must be floating point"),
    (dict(voxel_size=(0.1, 0, 0.1)), ValueError, r"voxel_size must be positive"),
    (dict(voxel_size=(0.1, 0.1)), ValueError, r"voxel_size must have 3 values"),
    (dict(point_range=(0, 0, 0, 1, 1)), ValueError, r"point_range must be"),
    (dict(point_range=(0, 0, 0, 0, 1, 1)), ValueError, r"is empty for voxel_size"),
    (dict(point_range=(0, 0, float("nan"), 1, 1, 1)), ValueError, r"point_range must be finite"),
    (dict(point_range=(0, 0, 0, float("inf"), 1, 1)), ValueError, r"point_range must be finite"),
    (dict(reduce="median"), ValueError, r"reduce must be one of"),
    (dict(max_points_per_voxel=0), ValueError, r"max_points_per_voxel must be >= 1"),
    (dict(max_voxels=-3), ValueError, r"max_voxels must be >= 1"),
    (dict(batch=torch.tensor([0, 1, 2, 3]), batch_size=2), ValueError, r"batch indices must be in \[0, 2\)"),
    (dict(batch=torch.tensor([0, -1, 0, 0])), ValueError, r"batch indices must be in"),
    (dict(batch=torch.tensor([0, 1])), ValueError, r"batch must be a \[N\] = \[4\]"),
    (dict(batch=torch.tensor([0.0, 1, 0, 0])), ValueError, r"batch must be an integer tensor"),
    (dict(points=torch.zeros(4, 4, dtype=torch.float16)), TypeError, r"float32 and float64"),
])
def test_voxelize_errors(kwargs, exc, match):
    args = dict(points=torch.rand(4, 4), voxel_size=(0.5, 0.5, 0.5), point_range=(0, 0, 0, 1, 1, 1))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sc.voxelize(**args)


def test_geometry_memo_only_for_tuples_of_plain_numbers():
    """voxelize memoises the checked grid of (voxel_size, point_range) for tuples of floats and ints
    only: lists and tuples of tensors (which can change in place) are checked again on every call."""
    from sparseconv.voxelize import _geometry, _geometry_memo

    rng = (0, 0, 0, 10, 10, 10)
    first = _geometry((0.5, 0.5, 0.5), rng)
    assert first == ((20, 20, 20), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0))
    assert _geometry([0.5, 0.5, 0.5], list(rng)) == first
    hits = _geometry_memo.cache_info().hits
    assert _geometry((0.5, 0.5, 0.5), rng) == first
    assert _geometry_memo.cache_info().hits == hits + 1
    size = torch.tensor(0.5)
    assert _geometry((size, size, size), rng)[0] == (20, 20, 20)
    size.fill_(1.0)
    assert _geometry((size, size, size), rng)[0] == (10, 10, 10)
    for _ in range(2):  # a bad tuple raises on every call (the memo keeps no failures)
        with pytest.raises(ValueError, match="voxel_size must be positive"):
            _geometry((0.5, -1.0, 0.5), rng)


def test_voxelize_grid_too_large_for_keys():
    with pytest.raises(ValueError, match="2\\^62"):
        sc.voxelize(torch.rand(4, 4), (1e-6, 1e-6, 1e-6), (0, 0, 0, 1000, 1000, 1000))


def test_devoxelize_errors():
    x = sc.SparseTensor(torch.rand(2, 3), torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs the voxel geometry"):
        sc.devoxelize(x, torch.rand(5, 3))
    y = sc.SparseTensor(torch.rand(2, 3), x.coords, voxel_size=(1, 1, 1), origin=(0, 0, 0))
    with pytest.raises(ValueError, match="mode must be"):
        sc.devoxelize(y, torch.rand(5, 3), mode="cubic")
    with pytest.raises(ValueError, match=r"points must be \[N, >= 3\]"):
        sc.devoxelize(y, torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"batch must be \[N\]"):
        sc.devoxelize(y, torch.rand(5, 3), batch=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="expects a SparseTensor"):
        sc.devoxelize(torch.rand(2, 3), torch.rand(5, 3))


def test_voxelize_op_is_deterministic_across_threads():
    pts = torch.from_numpy(lidar_like(60000, seed=12))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ops.voxelize(pts, None, (0.2, 0.2, 0.2), (-30, -30, -4), (300, 300, 30), 1, 3, 5000, "sum",
                                     False))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- op paths
def _both_thread_counts(fn):
    """fn() on 3, 2 and 1 threads (3: the first-appearance pass split over three groups).  The
    sequential pass last: the kernels' scratch keeps its contents between calls, so an earlier call
    on the same points could hide a slot that a later path failed to write."""
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (3, 2, 1):
            torch.set_num_threads(threads)
            outs.append(fn())
    finally:
        torch.set_num_threads(before)
    return outs


def _assert_matches_reference_on_every_thread_count(outs, ref):
    """Every thread count's outputs equal the reference (floats to 1e-6) and each other bit for bit."""
    for got in outs:
        for a, b in zip(got, ref):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, b)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduce", ["pad", "mean", "max", "first", "count"])
@pytest.mark.parametrize("order_by_first", [True, False])
@pytest.mark.parametrize("max_voxels", [-1, 4000, 100000])  # no limit, hit, not hit
def test_op_paths_match_reference_with_1_and_2_threads(reduce, order_by_first, max_voxels):
    """The op (hash pass, key-order sort) equals the pure-PyTorch reference, the same on
    1 and 2 threads, with several batches and enough points for the parallel key pass."""
    from sparseconv.reference import voxelize_reference

    rng = np.random.default_rng(13)
    pts = torch.from_numpy(lidar_like(90000, seed=13))
    pts[rng.choice(len(pts), 50, replace=False), 0] = float("nan")
    batch = torch.from_numpy(np.sort(rng.integers(0, 3, len(pts))))
    args = (pts, batch, (0.3, 0.3, 0.3), (-30, -30, -4), (200, 200, 20), 3, 3, max_voxels, reduce, order_by_first)
    outs = _both_thread_counts(lambda: ops.voxelize(*args))
    ref = voxelize_reference(*args)
    if max_voxels == 4000:
        assert int(outs[0][4][2]) > 0  # the limit is hit
    _assert_matches_reference_on_every_thread_count(outs, ref)


@pytest.mark.parametrize("num_points", [2, 300, 5000, 40000, 70000])
def test_key_order_sort_matches_reference_for_every_digit_width(num_points):
    """The voxel-key sort (one thread, digits of 8 to 14 bits chosen from the voxel count) puts the
    voxels in (batch, x, y, z) order for voxel counts from 2 to ~70k on a 27-bit key."""
    from sparseconv.reference import voxelize_reference

    rng = np.random.default_rng(num_points)
    grid = (1408, 1600, 40)  # KITTI at SECOND's voxel size: 27-bit keys
    cells = rng.choice(grid[0] * grid[1] * grid[2], size=num_points, replace=False)
    xyz = np.stack(np.unravel_index(cells, grid), 1).astype(np.float32) + 0.5
    pts = torch.from_numpy(np.concatenate([xyz, rng.random((num_points, 1), dtype=np.float32)], 1))
    args = (pts, None, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), grid, 1, 5, -1, "mean", False)
    got, ref = ops.voxelize(*args), voxelize_reference(*args)
    assert got[0].shape[0] == num_points  # every point opens its own voxel
    _assert_matches_reference_on_every_thread_count([got], ref)


@pytest.mark.parametrize("reduce", ["pad", "mean", "max", "first", "count"])
@pytest.mark.parametrize("order_by_first", [True, False])
@pytest.mark.parametrize("max_voxels,direct", [(-1, True), (2800, True), (2600, False), (300, False)])
def test_pillar_grid_direct_mapped_index_matches_reference(reduce, order_by_first, max_voxels, direct):
    """Grids of few cells (pillars) look voxels up in a direct-mapped array instead of the hash table
    (csrc/cpu/voxelize_cpu.cpp: at most 2^21 cells, and at most 16 per voxel the call may create).
    Both lookups equal the reference on the same points, with batches, NaNs and max_voxels hit."""
    from sparseconv.reference import voxelize_reference

    rng = np.random.default_rng(23)
    pts = torch.from_numpy(lidar_like(60000, seed=23))
    pts[rng.choice(len(pts), 30, replace=False), 1] = float("nan")
    batch = torch.from_numpy(rng.integers(0, 3, len(pts)))
    grid = (120, 120, 1)
    args = (pts, batch, (0.5, 0.5, 8.0), (-30, -30, -4), grid, 3, 4, max_voxels, reduce, order_by_first)
    cells = 3 * grid[0] * grid[1]
    cap = len(pts) if max_voxels < 0 else max_voxels
    assert (cells <= 16 * cap) == direct  # the parameters cover both lookups (the kernel's rule)
    outs = _both_thread_counts(lambda: ops.voxelize(*args))
    if max_voxels > 0:
        assert int(outs[0][4][2]) > 0  # the limit is hit
    _assert_matches_reference_on_every_thread_count(outs, voxelize_reference(*args))


@pytest.mark.parametrize("reduce", ["pad", "mean", "count"])
@pytest.mark.parametrize("order_by_first", [True, False])
@pytest.mark.parametrize("max_voxels", [-1, 60000])
def test_large_input_parallel_passes_match_reference(reduce, order_by_first, max_voxels):
    """Enough points (> 262144) and voxels (> 131072) for every pass to split over threads."""
    from sparseconv.reference import voxelize_reference

    rng = np.random.default_rng(18)
    pts = torch.from_numpy(rng.uniform((-30, -30, -3, 0), (30, 30, 3, 1), (330000, 4)).astype(np.float32))
    batch = torch.from_numpy(np.repeat(np.arange(2), len(pts) // 2))
    args = (pts, batch, (0.1, 0.1, 0.2), (-30, -30, -3), (600, 600, 30), 2, 2, max_voxels, reduce, order_by_first)
    outs = _both_thread_counts(lambda: ops.voxelize(*args))
    assert outs[0][0].shape[0] > (131072 if max_voxels < 0 else 59999)
    _assert_matches_reference_on_every_thread_count(outs, voxelize_reference(*args))


@pytest.mark.parametrize("reduce", ["mean", "max", "first"])
@pytest.mark.parametrize("order_by_first", [True, False])
def test_op_without_max_points_matches_reference(reduce, order_by_first):
    """Unlimited points per voxel: the path that ranks points in their voxel instead of listing them."""
    from sparseconv.reference import voxelize_reference

    pts = torch.from_numpy(lidar_like(70000, seed=17))
    batch = torch.from_numpy(np.random.default_rng(17).integers(0, 2, len(pts)))
    args = (pts, batch, (0.5, 0.5, 0.5), (-30, -30, -4), (120, 120, 12), 2, -1, 3000, reduce, order_by_first)
    outs = _both_thread_counts(lambda: ops.voxelize(*args))
    _assert_matches_reference_on_every_thread_count(outs, voxelize_reference(*args))


@pytest.mark.parametrize("reduce", ["pad", "sum", "max", "first"])
@pytest.mark.parametrize("order_by_first", [True, False])
@pytest.mark.parametrize("max_voxels", [-1, 20000])
def test_partitioned_hash_pass_matches_reference(reduce, order_by_first, max_voxels):
    """Enough valid points (>= 2^18) for the hash pass to be partitioned over the threads' own
    tables, with NaNs, several batches, max_points hit (dense voxels) and max_voxels hit or not:
    1, 2 and 3 threads (2 and 3 partitions, merged by first point) equal the reference bit for bit."""
    from sparseconv.reference import voxelize_reference

    rng = np.random.default_rng(21)
    pts = torch.from_numpy(rng.normal(0, 4, (300000, 4)).astype(np.float32))
    pts[rng.choice(len(pts), 40, replace=False), 1] = float("nan")
    pts[rng.choice(len(pts), 40, replace=False), 2] = float("inf")
    batch = torch.from_numpy(rng.integers(0, 2, len(pts)))
    args = (pts, batch, (0.25, 0.25, 0.25), (-12, -12, -12), (96, 96, 96), 2, 3, max_voxels, reduce, order_by_first)
    outs = _both_thread_counts(lambda: ops.voxelize(*args))
    drops = outs[0][4].tolist()
    assert drops[0] == 80 and drops[3] > 0 and (drops[2] > 0) == (max_voxels > 0)
    assert len(pts) - drops[0] - drops[1] >= 2 ** 18  # valid points: the partitioned pass runs
    _assert_matches_reference_on_every_thread_count(outs, voxelize_reference(*args))


def _key_range_case(case):
    """Inputs of test_two_thread_passes_match_reference: the op's arguments up to max_voxels."""
    rng = np.random.default_rng(31)
    if case.startswith("scan"):  # LiDAR-like points in scan (azimuth) order, NaNs, three scans
        pts = lidar_like(80000, seed=31)
        pts = pts[np.argsort(np.arctan2(pts[:, 1], pts[:, 0]), kind="stable")]
        pts[rng.choice(len(pts), 40, replace=False), 2] = np.nan
        batch = torch.from_numpy(np.sort(rng.integers(0, 3, len(pts))))
        max_voxels = 5000 if case == "scan_max_voxels" else -1
        return (torch.from_numpy(pts), batch, (0.2, 0.2, 0.2), (-30, -30, -4), (300, 300, 40), 3, 3, max_voxels)
    if case == "three_voxels":  # every range but a few is empty (the sampled bounds repeat)
        centres = np.array([[1.5, 1.5, 1.5], [7.5, 2.5, 0.5], [3.5, 9.5, 4.5]], np.float32)
        xyz = centres[rng.integers(0, 3, 40000)] + rng.uniform(-0.4, 0.4, (40000, 3)).astype(np.float32)
        pts = np.concatenate([xyz, rng.random((40000, 1), dtype=np.float32)], 1)
        return (torch.from_numpy(pts), None, (1.0, 1.0, 1.0), (0, 0, 0), (10, 10, 10), 1, 5, -1)
    if case == "wide_keys":  # a grid of more than 2^32 cells (64-bit keys), float64 points of 5 columns
        pts = lidar_like(60000, seed=32, c=5).astype(np.float64)
        return (torch.from_numpy(pts), None, (0.01, 0.01, 0.1), (-60, -60, -4), (12000, 12000, 80), 1, 2, 20000)
    # pillars: the direct-mapped cells, shared by the ranges (each writes its own), max_voxels hit
    pts = lidar_like(70000, seed=33)
    batch = torch.from_numpy(np.sort(rng.integers(0, 2, len(pts))))
    return (torch.from_numpy(pts), batch, (0.5, 0.5, 8.0), (-30, -30, -4), (120, 120, 1), 2, 4, 2000)


@pytest.mark.parametrize("reduce,order_by_first", [("mean", False), ("sum", False), ("max", False),
                                                    ("first", False), ("count", False), ("pad", True)])
@pytest.mark.parametrize("case", ["scan", "scan_max_voxels", "three_voxels", "wide_keys", "pillars"])
def test_two_thread_passes_match_reference(reduce, order_by_first, case):
    """With at least 2^15 valid points on several threads, key order splits the pass over key ranges
    (csrc/cpu/voxelize_cpu.cpp, assign_ranges: two ranges per thread, each range from its pass to its
    rows) and the padded layout (first-appearance order) runs the pass as a producer/consumer
    pipeline of two threads (assign_pipelined).  On 1 thread (the sequential pass), 2, 3 and 4
    threads the op equals the reference, and the thread counts each other bit for bit: points in
    scan order with NaNs and three scans, max_points hit, max_voxels hit or not; all points in three
    voxels (most ranges empty); 64-bit keys with float64 points of 5 columns; a pillar grid (the
    direct-mapped index)."""
    from sparseconv.reference import voxelize_reference

    args = _key_range_case(case) + (reduce, order_by_first)
    before = torch.get_num_threads()
    outs = []
    try:
        # The sequential pass last: the kernels' scratch keeps its contents between calls, so an
        # earlier call on the same points could hide a slot that a later path failed to write.
        for threads in (4, 3, 2, 1):
            torch.set_num_threads(threads)
            outs.append(ops.voxelize(*args))
    finally:
        torch.set_num_threads(before)
    drops = outs[0][4].tolist()
    assert len(args[0]) - drops[0] - drops[1] >= 2 ** 15  # valid points: the ranges are used
    assert (drops[2] > 0) == (args[7] > 0)  # max_voxels hit exactly where it is set
    if case.startswith("scan"):
        assert drops[3] > 0  # and max_points
    _assert_matches_reference_on_every_thread_count(outs, voxelize_reference(*args))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_key_kernel_variant_matches_reference(isa):
    """The point-key kernels (portable, AVX2 eight points per step, AVX-512 sixteen per step, picked
    like the convolution micro-kernels and capped by SPARSECONV_CPU_ISA) and the padded-row writers
    (16-byte stores, or 64-byte stores of four slots with AVX-512) give the reference's voxels, with
    and without a batch, with NaN/inf and out-of-range points, a point count that leaves a
    remainder after the vector steps, and padded sizes that are and are not multiples of four."""
    import json
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import sparseconv._C as C
        from sparseconv import ops
        from sparseconv.reference import voxelize_reference
        from test_voxelize import lidar_like
        pts = torch.from_numpy(lidar_like(20011, seed=22))
        pts[::97, 0] = float("nan")
        pts[5::89, 2] = float("-inf")
        pts[7::83, 1] = 1e30
        batch = torch.from_numpy(np.random.default_rng(22).integers(0, 3, len(pts)))
        bad = []
        for b, bs in ((None, 1), (batch, 3)):
            for reduce, mp in (("pad", 4), ("pad", 1), ("pad", 7), ("pad", 32), ("mean", 4)):
                args = (pts, b, (0.2, 0.2, 0.3), (-30, -30, -4), (300, 300, 20), bs, mp, -1, reduce, reduce == "pad")
                for got, ref in zip(ops.voxelize(*args), voxelize_reference(*args)):
                    ok = torch.allclose(got, ref, rtol=1e-6, atol=1e-6) if got.is_floating_point() else torch.equal(got, ref)
                    bad += [] if ok else [reduce + str(mp)]
        print(json.dumps({{"isa": C.cpu_isa(), "bad": bad}}))
    """)
    env = dict(os.environ, SPARSECONV_CPU_ISA=isa)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    order = ["generic", "avx2", "avx512"]
    assert order.index(res["isa"]) <= order.index(isa), res  # the cap only lowers the choice
    assert res["bad"] == [], res


def test_padded_outputs_are_independent_across_calls():
    """A result still referenced is never overwritten by later calls (workspaces are reused across calls)."""
    pts = torch.from_numpy(lidar_like(60000, seed=14))
    first = sc.voxelize_padded(pts, (0.2, 0.2, 0.2), (-30, -30, -4, 30, 30, 2), 4)
    keep = first.voxels.clone(), first.point_to_voxel.clone()
    for seed in (15, 16):  # other inputs, while `first` is alive
        other = sc.voxelize_padded(torch.from_numpy(lidar_like(60000, seed=seed)), (0.2, 0.2, 0.2),
                                   (-30, -30, -4, 30, 30, 2), 4)
        assert other.voxels.data_ptr() != first.voxels.data_ptr()
        del other
    assert torch.equal(first.voxels, keep[0]) and torch.equal(first.point_to_voxel, keep[1])
    view = first.voxels[:10]
    del first
    again = sc.voxelize_padded(pts, (0.2, 0.2, 0.2), (-30, -30, -4, 30, 30, 2), 4)
    assert torch.equal(view, keep[0][:10]) and torch.equal(again.voxels, keep[0])
    shared = again.voxels.share_memory_()
    assert torch.equal(shared, keep[0])


def test_devoxelize_nearest_uses_voxelize_arithmetic_at_a_voxel_face():
    """A float32 point within rounding of a face: float32 and float64 place it in different voxels;
    devoxelize must find the voxel voxelize put it in."""
    x = np.float32(0.7999998)  # float32: voxel 33, float64: voxel 32
    assert np.floor((x - np.float32(-12.4)) / np.float32(0.4)) != np.floor((np.float64(x) + 12.4) / 0.4)
    pts = torch.tensor([[x, 0.1, 0.1, 7.0], [1.0, 0.1, 0.1, 3.0]], dtype=torch.float32)
    vox = sc.voxelize(pts, (0.4, 0.4, 0.4), (-12.4, -2, -2, 12.4, 2, 2))
    back = sc.devoxelize(vox.tensor, pts, mode="nearest")
    torch.testing.assert_close(back, vox.tensor.features[vox.point_to_voxel], rtol=0, atol=0)
