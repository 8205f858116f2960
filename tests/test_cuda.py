"""CPU-vs-CUDA parity of every operator of ``torch.ops.sparseconv``.

Each op runs on the same random LiDAR-like input on both devices: integer outputs (tables, kernel
maps, coordinates, argmax, point-to-voxel maps, counts) must be equal, floating-point outputs equal
within a tight tolerance in float32/float64 and a loose one in float16/bfloat16 (compared with the
CPU float32 result of the same rounded inputs).  Errors raise the same exception with the same
message on both devices.  Skipped when no GPU is visible (or the extension was built without CUDA).
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from sparseconv import ops
from sparseconv.coords import conv_output_shape, conv_transpose_output_shape

DEV = os.environ.get("SPARSECONV_TEST_DEVICE", "cuda")
CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("sparseconv::conv_forward", "CUDA")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not CUDA, reason="needs a GPU and a CUDA build of sparseconv")
# float16/bfloat16 on CUDA vs float32 on CPU (same rounded inputs): relative to the output's scale.
LOOSE = {torch.float16: 2e-2, torch.bfloat16: 8e-2}
low_precision = pytest.mark.skipif(DEV == "cpu", reason="float16/bfloat16 are for the CUDA kernels")


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def lidar_points(gen, n=20000, c=4) -> torch.Tensor:
    """A ground plane in an annulus around the sensor, with a few box-shaped objects, plus a
    handful of NaN/inf and far-away points; float32 ``[n, c]`` (x, y, z, intensity, ...)."""
    r = 2 + 48 * torch.rand(n, generator=gen) ** 2
    a = 2 * math.pi * torch.rand(n, generator=gen)
    x, y = r * torch.cos(a), r * torch.sin(a)
    z = -1.7 + 0.05 * torch.randn(n, generator=gen)
    obj = torch.rand(n, generator=gen) < 0.3
    z = torch.where(obj, -1.7 + 2.0 * torch.rand(n, generator=gen), z)
    extra = torch.rand(n, c - 3, generator=gen)
    pts = torch.cat([torch.stack([x, y, z], 1), extra], 1)
    pts[:5, 0] = float("nan")
    pts[5:8, 1] = float("inf")
    pts[8:20, :3] += 500.0  # outside the range
    return pts.contiguous()


RANGE_LO, VOXEL = (-51.2, -51.2, -3.0), (0.4, 0.4, 0.2)
GRID = (256, 256, 20)


def lidar_coords(seed=0, batch_size=2, shuffle=True):
    """Distinct voxel coordinates of ``batch_size`` scans (sorted by key, or shuffled)."""
    gen = seeded("coords", seed)
    pts = torch.cat([lidar_points(gen, 12000) for _ in range(batch_size)])
    batch = torch.arange(batch_size).repeat_interleave(12000)
    coords = ops.voxelize(pts, batch, VOXEL, RANGE_LO, GRID, batch_size, -1, -1, "count", False)[0]
    if shuffle:
        coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    return coords.contiguous(), [batch_size, *GRID]


def cuda(x):
    return x.to(DEV) if isinstance(x, torch.Tensor) else x


def assert_equal_on_cpu(got, expected):
    got = got.cpu()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def assert_close_loose(got, expected, dtype):
    """``got`` (CUDA, low precision) against ``expected`` (CPU float32), relative to the output scale."""
    got = got.cpu().float()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    tol = LOOSE[dtype] * max(scale, 1e-6)
    torch.testing.assert_close(got, expected, atol=tol, rtol=LOOSE[dtype])


def same_error(fn, *args):
    """``fn`` raises the same exception type and message with CPU and CUDA arguments."""
    with pytest.raises(Exception) as cpu_err:
        fn(*args)
    with pytest.raises(type(cpu_err.value)) as cuda_err:
        fn(*[cuda(a) for a in args])
        if DEV == "cuda":
            torch.cuda.synchronize()
    first_line = lambda e: str(e.value).splitlines()[0]  # noqa: E731  (C++ errors append a trace)
    assert first_line(cuda_err) == first_line(cpu_err)


# --------------------------------------------------------------------------- registration
def test_every_op_has_a_kernel():
    key = "CUDA" if DEV == "cuda" else "CPU"
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseconv::{name}", key), name


# --------------------------------------------------------------------------- hash table
@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
def test_hash_build_and_query(shuffle):
    coords, grid = lidar_coords(1, shuffle=shuffle)
    keys, values = ops.hash_build(coords, grid)
    ckeys, cvalues = ops.hash_build(cuda(coords), grid)
    assert ckeys.device.type == DEV and ckeys.shape == keys.shape  # same capacity rule
    # The same (key, row) entries (slots may differ where inserts raced).
    for k, v in ((keys, values), (ckeys.cpu(), cvalues.cpu())):
        assert int((k != -1).sum()) == coords.shape[0]
    order, corder = keys.argsort(), ckeys.cpu().argsort()
    assert torch.equal(keys[order], ckeys.cpu()[corder]) and torch.equal(values[order], cvalues.cpu()[corder])
    # Queries: stored coordinates, shifted ones (mostly absent) and some outside the grid.
    shifted = coords.clone()
    shifted[:, 1:] += torch.tensor([1, -1, 1], dtype=torch.int32)
    outside = coords[:50].clone()
    outside[:, 3] = grid[3] + 3
    queries = torch.cat([coords, shifted, outside]).contiguous()
    expected = ops.hash_query(keys, values, queries, grid)
    assert_equal_on_cpu(ops.hash_query(ckeys, cvalues, cuda(queries), grid), expected)
    # A table built on one device answers queries on the other (same layout rule).
    assert_equal_on_cpu(ops.hash_query(cuda(keys), cuda(values), cuda(queries), grid), expected)
    assert torch.equal(ops.hash_query(ckeys.cpu(), cvalues.cpu(), queries, grid), expected)


def test_hash_build_errors_match_cpu():
    coords, grid = lidar_coords(2)
    dup = torch.cat([coords, coords[10:11]]).contiguous()  # one repeated coordinate: a deterministic message
    same_error(ops.hash_build, dup, grid)
    bad = coords.clone()
    bad[7, 2] = grid[2]
    same_error(ops.hash_build, bad, grid)


def test_hash_build_empty():
    keys, values = ops.hash_build(torch.empty((0, 4), dtype=torch.int32, device=DEV), [1, 4, 4, 4])
    assert keys.shape == (16,) and bool((keys == -1).all())


# --------------------------------------------------------------------------- kernel maps
@pytest.mark.parametrize("ks,dil", [((3, 3, 3), (1, 1, 1)), ((2, 2, 2), (1, 1, 1)), ((5, 1, 3), (2, 1, 3))],
                         ids=["3", "2", "aniso-dilated"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
def test_kmap_submanifold(ks, dil, shuffle):
    coords, grid = lidar_coords(3, shuffle=shuffle)
    keys, values = ops.hash_build(coords, grid)
    expected = ops.kmap_submanifold(keys, values, coords, grid, ks, dil)
    ckeys, cvalues = ops.hash_build(cuda(coords), grid)
    assert_equal_on_cpu(ops.kmap_submanifold(ckeys, cvalues, cuda(coords), grid, ks, dil), expected)


STRIDED = [
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    ((2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1)),
    ((3, 1, 2), (2, 1, 3), (1, 0, 1), (1, 1, 2)),
    ((3, 3, 3), (1, 1, 1), (0, 2, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("geom", STRIDED, ids=["cubic", "even", "anisotropic", "dilated"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_kmap_strided(geom, transposed):
    ks, stride, pad, dil = geom
    coords, grid = lidar_coords(4)
    if transposed:
        coords = coords[(coords[:, 1:] < torch.tensor([128, 128, 10], dtype=torch.int32)).all(1)].contiguous()
        grid = [grid[0], 128, 128, 10]
        out_spatial = conv_transpose_output_shape(grid[1:], ks, stride, pad, dil, (0, 0, 0))
    else:
        out_spatial = conv_output_shape(grid[1:], ks, stride, pad, dil)
    out_c, nbmap = ops.kmap_strided(coords, grid, out_spatial, ks, stride, pad, dil, transposed)
    got_c, got_map = ops.kmap_strided(cuda(coords), grid, out_spatial, ks, stride, pad, dil, transposed)
    assert_equal_on_cpu(got_c, out_c)
    assert_equal_on_cpu(got_map, nbmap)


def test_kmap_errors_match_cpu():
    coords, grid = lidar_coords(5)
    bad = coords.clone()
    bad[4, 1] = -1
    same_error(ops.kmap_strided, bad, grid, [128, 128, 10], (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), False)
    keys, values = ops.hash_build(coords, grid)
    same_error(ops.kmap_submanifold, keys, values, coords[:-1].contiguous(), grid, (3, 3, 3), (1, 1, 1))


# --------------------------------------------------------------------------- convolution
def conv_case(transposed, seed=0, cin=16, cout=24):
    coords, grid = lidar_coords(6 + seed)
    gen = seeded("conv", transposed, seed)
    ks = (3, 3, 3)
    if transposed:  # the inverse of a strided conv: features on its output, map read backwards
        out_spatial = conv_output_shape(grid[1:], ks, (2, 2, 2), (1, 1, 1), (1, 1, 1))
        _, nbmap = ops.kmap_strided(coords, grid, out_spatial, ks, (2, 2, 2), (1, 1, 1), (1, 1, 1), False)
        n_in, num_out = nbmap.shape[0], coords.shape[0]
    else:
        keys, values = ops.hash_build(coords, grid)
        nbmap = ops.kmap_submanifold(keys, values, coords, grid, ks, (1, 1, 1))
        n_in = num_out = coords.shape[0]
    feats = torch.randn(n_in, cin, generator=gen)
    weight = torch.randn(27, cin, cout, generator=gen) / math.sqrt(27 * cin)
    grad = torch.randn(num_out, cout, generator=gen)
    return feats, weight, nbmap, num_out, grad


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_conv_forward_and_backward(transposed, dtype):
    feats, weight, nbmap, num_out, grad = conv_case(transposed)
    feats, weight, grad = feats.to(dtype), weight.to(dtype), grad.to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    results = {}
    for dev in ("cpu", DEV):
        f = feats.to(dev).requires_grad_()
        w = weight.to(dev).requires_grad_()
        out = ops.conv_forward(f, w, nbmap.to(dev), num_out, transposed)
        out.backward(grad.to(dev))
        results[dev] = (out.detach().cpu(), f.grad.cpu(), w.grad.cpu())
    for got, expected in zip(results[DEV], results["cpu"]):
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **tol)
    # The backward ops called directly.
    num_in = feats.shape[0]
    torch.testing.assert_close(
        ops.conv_input_grad(cuda(grad), cuda(weight), cuda(nbmap), num_in, transposed).cpu(),
        ops.conv_input_grad(grad, weight, nbmap, num_in, transposed), **tol)
    torch.testing.assert_close(ops.conv_weight_grad(cuda(feats), cuda(grad), cuda(nbmap), transposed).cpu(),
                               ops.conv_weight_grad(feats, grad, nbmap, transposed), **tol)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@low_precision
def test_conv_low_precision(transposed, dtype):
    feats, weight, nbmap, num_out, grad = conv_case(transposed, seed=1)
    # The CPU float32 result of the same rounded inputs.
    feats, weight, grad = (t.to(dtype).float() for t in (feats, weight, grad))
    out = ops.conv_forward(cuda(feats).to(dtype), cuda(weight).to(dtype), cuda(nbmap), num_out, transposed)
    assert out.dtype == dtype
    assert_close_loose(out, ops.conv_forward(feats, weight, nbmap, num_out, transposed), dtype)
    gi = ops.conv_input_grad(cuda(grad).to(dtype), cuda(weight).to(dtype), cuda(nbmap), feats.shape[0], transposed)
    assert_close_loose(gi, ops.conv_input_grad(grad, weight, nbmap, feats.shape[0], transposed), dtype)
    gw = ops.conv_weight_grad(cuda(feats).to(dtype), cuda(grad).to(dtype), cuda(nbmap), transposed)
    assert_close_loose(gw, ops.conv_weight_grad(feats, grad, nbmap, transposed), dtype)


def test_conv_is_deterministic():
    feats, weight, nbmap, num_out, _ = conv_case(False, seed=2)
    a = ops.conv_forward(cuda(feats), cuda(weight), cuda(nbmap), num_out, False)
    b = ops.conv_forward(cuda(feats), cuda(weight), cuda(nbmap), num_out, False)
    assert torch.equal(a, b)


def test_conv_errors_match_cpu():
    feats, weight, nbmap, num_out, grad = conv_case(False, seed=3)
    bad = nbmap.clone()
    bad[5, 3] = feats.shape[0] + 10
    same_error(ops.conv_forward, feats, weight, bad, num_out, False)
    same_error(ops.conv_forward, feats, weight, nbmap, num_out + 1, False)
    same_error(ops.conv_forward, feats, weight[:, :3].contiguous(), nbmap, num_out, False)
    same_error(ops.conv_weight_grad, feats, grad[:-1].contiguous(), nbmap, False)


def test_conv_empty():
    feats = torch.empty((0, 4), device=DEV)
    weight = torch.randn(27, 4, 5, device=DEV)
    nbmap = torch.empty((0, 27), dtype=torch.int32, device=DEV)
    assert ops.conv_forward(feats, weight, nbmap, 0, False).shape == (0, 5)
    assert ops.conv_weight_grad(feats, torch.empty((0, 5), device=DEV), nbmap, False).shape == (27, 4, 5)


# --------------------------------------------------------------------------- pooling
def pool_case(seed=0, c=8):
    coords, grid = lidar_coords(10 + seed)
    out_spatial = conv_output_shape(grid[1:], (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1))
    _, nbmap = ops.kmap_strided(coords, grid, out_spatial, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), False)
    gen = seeded("pool", seed)
    feats = torch.randn(coords.shape[0], c, generator=gen)
    feats[::7, 1] = feats[1::7, 1].mean()  # some ties
    grad = torch.randn(nbmap.shape[0], c, generator=gen)
    return feats, nbmap, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_maxpool(dtype):
    feats, nbmap, grad = pool_case(0)
    feats, grad = feats.to(dtype), grad.to(dtype)
    out, arg = ops.maxpool_forward(feats, nbmap)
    cout, carg = ops.maxpool_forward(cuda(feats), cuda(nbmap))
    assert_equal_on_cpu(cout, out)
    assert_equal_on_cpu(carg, arg)
    torch.testing.assert_close(ops.maxpool_backward(cuda(grad), carg, feats.shape[0]).cpu(),
                               ops.maxpool_backward(grad, arg, feats.shape[0]))


@pytest.mark.parametrize("count_inactive", [False, True], ids=["active", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_avgpool(dtype, count_inactive):
    feats, nbmap, grad = pool_case(1)
    feats, grad = feats.to(dtype), grad.to(dtype)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ops.avgpool_forward(cuda(feats), cuda(nbmap), count_inactive).cpu(),
                               ops.avgpool_forward(feats, nbmap, count_inactive), **tol)
    torch.testing.assert_close(ops.avgpool_backward(cuda(grad), cuda(nbmap), feats.shape[0], count_inactive).cpu(),
                               ops.avgpool_backward(grad, nbmap, feats.shape[0], count_inactive), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@low_precision
def test_pool_low_precision(dtype):
    feats, nbmap, grad = pool_case(2)
    feats, grad = feats.to(dtype).float(), grad.to(dtype).float()
    out, arg = ops.maxpool_forward(feats, nbmap)
    cout, carg = ops.maxpool_forward(cuda(feats).to(dtype), cuda(nbmap))
    assert torch.equal(cout.cpu().float(), out) and torch.equal(carg.cpu(), arg)  # max is exact
    assert_close_loose(ops.maxpool_backward(cuda(grad).to(dtype), carg, feats.shape[0]),
                       ops.maxpool_backward(grad, arg, feats.shape[0]), dtype)
    assert_close_loose(ops.avgpool_forward(cuda(feats).to(dtype), cuda(nbmap), False),
                       ops.avgpool_forward(feats, nbmap, False), dtype)
    assert_close_loose(ops.avgpool_backward(cuda(grad).to(dtype), cuda(nbmap), feats.shape[0], False),
                       ops.avgpool_backward(grad, nbmap, feats.shape[0], False), dtype)


def test_pool_autograd():
    feats, nbmap, _ = pool_case(3)
    for fn in (lambda f, m: ops.maxpool_forward(f, m)[0], lambda f, m: ops.avgpool_forward(f, m, False)):
        grads = []
        for dev in ("cpu", DEV):
            f = feats.to(dev).requires_grad_()
            fn(f, nbmap.to(dev)).sum().backward()
            grads.append(f.grad.cpu())
        torch.testing.assert_close(grads[1], grads[0])


def test_pool_errors_match_cpu():
    feats, nbmap, grad = pool_case(4)
    bad = nbmap.clone()
    bad[0, 0] = -5
    same_error(ops.maxpool_forward, feats, bad)
    same_error(ops.avgpool_forward, feats, bad, False)
    same_error(ops.avgpool_backward, grad[:-1].contiguous(), nbmap, feats.shape[0], False)


# --------------------------------------------------------------------------- voxelization
@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "first", "count", "pad"])
@pytest.mark.parametrize("limits", [(-1, -1, False), (5, 3000, False), (3, 2000, True), (-1, -1, True)],
                         ids=["free", "limited", "limited-first-order", "first-order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_voxelize(reduce, limits, dtype):
    max_points, max_voxels, order_by_first = limits
    if reduce == "pad" and max_points < 1:
        max_points = 4
    gen = seeded("voxelize", reduce, limits)
    pts = torch.cat([lidar_points(gen, 15000, c=5) for _ in range(2)]).to(dtype)
    batch = torch.arange(2).repeat_interleave(15000)
    args = (VOXEL, RANGE_LO, GRID, 2, max_points, max_voxels, reduce, order_by_first)
    expected = ops.voxelize(pts, batch, *args)
    got = ops.voxelize(cuda(pts), cuda(batch), *args)
    names = ["coords", "feats", "point_voxel", "counts", "drops"]
    for name, g, e in zip(names, got, expected):
        assert g.device.type == DEV, name
        if name == "feats" and reduce in ("mean", "sum"):
            torch.testing.assert_close(g.cpu(), e, atol=1e-5, rtol=1e-6, msg=name)
        else:
            assert_equal_on_cpu(g, e)


def test_voxelize_without_batch_and_empty():
    pts = lidar_points(seeded("vox-nobatch"), 5000)
    args = (VOXEL, RANGE_LO, GRID, 1, -1, -1, "mean", False)
    for e, g in zip(ops.voxelize(pts, None, *args), ops.voxelize(cuda(pts), None, *args)):
        torch.testing.assert_close(g.cpu(), e)
    empty = ops.voxelize(torch.empty((0, 4), device=DEV), None, *args)
    assert empty[0].shape == (0, 4) and empty[4].tolist() == [0, 0, 0, 0]


def test_voxelize_errors_match_cpu():
    pts = lidar_points(seeded("vox-err"), 100)
    same_error(ops.voxelize, pts, torch.full((100,), 3), VOXEL, RANGE_LO, GRID, 2, -1, -1, "mean", False)
    same_error(ops.voxelize, pts, None, VOXEL, RANGE_LO, GRID, 1, -1, -1, "median", False)
    same_error(ops.voxelize, pts, None, (0.0, 0.1, 0.1), RANGE_LO, GRID, 1, -1, -1, "mean", False)


# --------------------------------------------------------------------------- sparse_rows_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_rows_mm_matches_cpu(dtype):
    gen = seeded("sparse-rows-mm", str(dtype))
    a = torch.relu(torch.randn(3000, 256, generator=gen, dtype=dtype) - 1.0).requires_grad_()
    b = torch.randn(256, 64, generator=gen, dtype=dtype, requires_grad=True)
    ca, cb = cuda(a.detach()).requires_grad_(), cuda(b.detach()).requires_grad_()
    out, cout = ops.sparse_rows_mm(a, b), ops.sparse_rows_mm(ca, cb)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(cout.cpu(), out, rtol=tol, atol=tol)
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    out.backward(g)
    cout.backward(cuda(g))
    torch.testing.assert_close(ca.grad.cpu(), a.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(cb.grad.cpu(), b.grad, rtol=tol, atol=tol)
    same_error(ops.sparse_rows_mm, a.detach(), b.detach()[:5])


# --------------------------------------------------------------------------- window_attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_attention_matches_cpu(dtype):
    gen = seeded("window-attention", str(dtype))
    sizes = torch.randint(0, 40, (300,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    n = int(offsets[-1])
    index = torch.randperm(n, generator=gen)
    args = [torch.randn(n, 32, generator=gen, dtype=dtype), torch.randn(96, 32, generator=gen, dtype=dtype) / 6,
            torch.randn(96, generator=gen, dtype=dtype), torch.randn(24, 32, generator=gen, dtype=dtype) / 6,
            torch.randn(24, generator=gen, dtype=dtype)]
    cpu_args = [a.clone().requires_grad_() for a in args]
    dev_args = [cuda(a).requires_grad_() for a in args]
    out = ops.window_attention(*cpu_args, offsets, 4, 0.35, index)
    cout = ops.window_attention(*dev_args, cuda(offsets), 4, 0.35, cuda(index))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(cout.cpu(), out, rtol=tol, atol=tol)
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    out.backward(g)
    cout.backward(cuda(g))
    for a, ca in zip(cpu_args, dev_args):
        torch.testing.assert_close(ca.grad.cpu(), a.grad, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- a small network
def test_network_forward_backward_matches_cpu():
    """Submanifold conv -> strided conv -> max pool -> transposed conv back, as ops, on both devices."""
    coords, grid = lidar_coords(20)
    gen = seeded("net")
    feats = torch.randn(coords.shape[0], 4, generator=gen)
    w1 = torch.randn(27, 4, 16, generator=gen) / 10
    w2 = torch.randn(8, 16, 32, generator=gen) / 20
    results = []
    for dev in ("cpu", DEV):
        c = coords.to(dev)
        keys, values = ops.hash_build(c, grid)
        m1 = ops.kmap_submanifold(keys, values, c, grid, (3, 3, 3), (1, 1, 1))
        out_spatial = conv_output_shape(grid[1:], (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1))
        c2, m2 = ops.kmap_strided(c, grid, out_spatial, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), False)
        f = feats.to(dev).requires_grad_()
        a, b = w1.to(dev).requires_grad_(), w2.to(dev).requires_grad_()
        h = torch.relu(ops.conv_forward(f, a, m1, c.shape[0], False))
        h = ops.conv_forward(h, b, m2, c2.shape[0], False)
        up = ops.conv_forward(h, b.transpose(1, 2).contiguous(), m2, c.shape[0], True)
        loss = (up ** 2).mean() + h.mean()
        loss.backward()
        results.append([loss.detach().cpu(), f.grad.cpu(), a.grad.cpu(), b.grad.cpu()])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

