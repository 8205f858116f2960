"""The C++ operators of ``torch.ops.sparseconv`` against their pure-PyTorch twins.

* every op is compared with :mod:`sparseconv.reference` on random inputs (several
  geometries, anisotropic ones and empty inputs, float32 and float64);
* the references themselves are checked against dense ``torch.nn.functional`` ops
  (occupancy convolutions for output sites, ``conv3d`` / ``conv_transpose3d`` values);
* ``torch.autograd.gradcheck`` checks the registered autograd formulas;
* ``torch.library.opcheck`` checks schema, fake kernels and autograd registration;
* a small network gives the same forward and backward under ``torch.compile``.
"""
from __future__ import annotations

import math
import shutil
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseconv import SparseTensor, ops
from sparseconv import nn as snn
from sparseconv import reference as ref
from sparseconv.coords import conv_output_shape, conv_transpose_output_shape

DTYPES = [torch.float32, torch.float64]
HYPOTHESIS = settings(max_examples=30, deadline=None, derandomize=True)


# --------------------------------------------------------------------------- inputs
def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_coords(gen, batch_size, spatial, n) -> torch.Tensor:
    """``n`` distinct int32 coordinates (capped at the grid size) in random row order."""
    x, y, z = spatial
    total = batch_size * x * y * z
    cells = torch.randperm(total, generator=gen)[: min(n, total)]
    coords = torch.stack([cells // (x * y * z), cells // (y * z) % x, cells // z % y, cells % z], dim=1)
    return coords.to(torch.int32).contiguous()


def random_nbmap(gen, n_in, m, kvol, density=0.6) -> torch.Tensor:
    """A random valid kernel map ``[m, kvol]``: in each column the entries >= 0 are distinct rows < n_in.

    Unlike maps built from coordinates, these have output rows without any active input.
    """
    cols = []
    for _ in range(kvol):
        rows = torch.randperm(n_in, generator=gen)[:m]
        col = torch.full((m,), -1, dtype=torch.int64)
        col[: rows.numel()] = rows
        col = col[torch.randperm(m, generator=gen)]
        drop = torch.rand(m, generator=gen) > density
        cols.append(torch.where(drop, -1, col))
    if not cols:
        return torch.empty((m, 0), dtype=torch.int32)
    return torch.stack(cols, dim=1).to(torch.int32)


def dense_occupancy(coords, batch_size, spatial, dtype=torch.float64) -> torch.Tensor:
    occ = torch.zeros((batch_size, 1, *spatial), dtype=dtype)
    c = coords.long()
    occ[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1
    return occ


def dense_feats(feats, coords, batch_size, spatial) -> torch.Tensor:
    out = feats.new_zeros((batch_size, feats.shape[1], *spatial))
    c = coords.long()
    out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    return out


def read_sites(dense, coords) -> torch.Tensor:
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def to_dense_weight(weight, ks, transposed=False):
    w = weight.reshape(*ks, weight.shape[1], weight.shape[2])
    return w.permute(3, 4, 0, 1, 2) if transposed else w.permute(4, 3, 0, 1, 2)


# (spatial, batch_size, voxels, kernel_size, stride, padding, dilation)
GEOMETRIES = [
    ((6, 6, 6), 2, 40, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    ((7, 5, 9), 2, 50, (3, 1, 2), (2, 1, 3), (1, 0, 1), (1, 1, 2)),  # anisotropic
    ((5, 6, 4), 1, 30, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1)),
    ((8, 4, 6), 3, 60, (3, 3, 3), (1, 1, 1), (0, 2, 1), (2, 1, 1)),
    ((4, 9, 3), 2, 1, (1, 4, 2), (1, 3, 2), (0, 1, 0), (1, 1, 1)),  # a single voxel
    ((9, 9, 9), 1, 700, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),  # dense: 700 of 729 cells
    ((5, 5, 5), 2, 0, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),  # empty
    ((16, 12, 16), 2, 5000, (3, 2, 3), (2, 2, 2), (1, 0, 1), (1, 1, 1)),  # above the ops' parallel grain sizes
]
GEOMETRY_IDS = ["cubic", "anisotropic", "even", "dilated", "single", "dense", "empty", "parallel"]


def strided_case(geom, transposed, seed=0):
    """``(coords, grid, out_spatial)`` for one geometry; transposed cases use a coarser input grid."""
    spatial, batch, n, ks, stride, pad, dil = geom
    if transposed:
        coarse = tuple(max(1, s // 2) for s in spatial)
        if out_shape_or_none(coarse, ks, stride, pad, dil, True) is not None:
            spatial = coarse
        out_spatial = conv_transpose_output_shape(spatial, ks, stride, pad, dil, (0, 0, 0))
    else:
        out_spatial = conv_output_shape(spatial, ks, stride, pad, dil)
    coords = random_coords(seeded("strided", geom, transposed, seed), batch, spatial, n)
    return coords, [batch, *spatial], out_spatial


@st.composite
def strided_geometries(draw):
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(3))
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(0, 40))
    ks = tuple(draw(st.integers(1, 4)) for _ in range(3))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(3))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(3))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(3))
    transposed = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return spatial, batch, n, ks, stride, pad, dil, transposed, seed


def out_shape_or_none(spatial, ks, stride, pad, dil, transposed):
    try:
        if transposed:
            return conv_transpose_output_shape(spatial, ks, stride, pad, dil, (0, 0, 0))
        return conv_output_shape(spatial, ks, stride, pad, dil)
    except ValueError:  # empty output grid
        return None


# --------------------------------------------------------------------------- hash table
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOMETRY_IDS)
def test_hash_build_matches_reference(geom):
    spatial, batch, n = geom[:3]
    coords = random_coords(seeded("hash", geom), batch, spatial, n)
    grid = [batch, *spatial]
    keys, values = ops.hash_build(coords, grid)
    assert keys.dtype == values.dtype == torch.int64
    cap = keys.numel()
    assert cap >= max(16, 2 * n) and cap & (cap - 1) == 0  # power of two, depends on N only
    used = keys != -1
    ref_keys, ref_rows = ref.hash_build_reference(coords, grid)
    order = keys[used].argsort()
    torch.testing.assert_close(keys[used][order], ref_keys)
    torch.testing.assert_close(values[used][order], ref_rows)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOMETRY_IDS)
def test_hash_query_matches_reference(geom):
    spatial, batch, n = geom[:3]
    gen = seeded("query", geom)
    coords = random_coords(gen, batch, spatial, n)
    grid = [batch, *spatial]
    keys, values = ops.hash_build(coords, grid)
    # Queries: every stored coordinate, random cells of the grid, and cells just outside it on each axis.
    inside = random_coords(gen, batch, spatial, 30)
    outside = []
    for axis in range(4):
        for value in (-1, grid[axis], grid[axis] + 7):
            q = inside[:3].clone()
            q[:, axis] = value
            outside.append(q)
    queries = torch.cat([coords, inside, *outside]).contiguous()
    got = ops.hash_query(keys, values, queries, grid)
    expected = ref.hash_query_reference(coords, queries, grid)
    torch.testing.assert_close(got, expected)
    if n:
        torch.testing.assert_close(got[:n], torch.arange(n))  # every stored coordinate finds its own row


# --------------------------------------------------------------------------- kernel maps
SUBM_KERNELS = [((3, 3, 3), (1, 1, 1)), ((2, 2, 2), (1, 1, 1)), ((1, 3, 2), (1, 2, 1)), ((5, 1, 3), (2, 1, 3))]


@pytest.mark.parametrize("ks,dil", SUBM_KERNELS, ids=["3", "2", "aniso", "aniso-dilated"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOMETRY_IDS)
def test_kmap_submanifold_matches_reference(geom, ks, dil):
    spatial, batch, n = geom[:3]
    coords = random_coords(seeded("subm", geom, ks), batch, spatial, n)
    grid = [batch, *spatial]
    keys, values = ops.hash_build(coords, grid)
    got = ops.kmap_submanifold(keys, values, coords, grid, ks, dil)
    assert got.dtype == torch.int32 and got.shape == (coords.shape[0], math.prod(ks))
    torch.testing.assert_close(got, ref.kmap_submanifold_reference(coords, grid, ks, dil))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOMETRY_IDS)
def test_kmap_strided_matches_reference(geom, transposed):
    _, _, _, ks, stride, pad, dil = geom
    coords, grid, out_spatial = strided_case(geom, transposed)
    got_coords, got_map = ops.kmap_strided(coords, grid, out_spatial, ks, stride, pad, dil, transposed)
    exp_coords, exp_map = ref.kmap_strided_reference(coords, grid, out_spatial, ks, stride, pad, dil, transposed)
    assert got_coords.dtype == got_map.dtype == torch.int32
    torch.testing.assert_close(got_coords, exp_coords)
    torch.testing.assert_close(got_map, exp_map)


@HYPOTHESIS
@given(strided_geometries())
def test_kmap_random_geometries_match_reference(case):
    spatial, batch, n, ks, stride, pad, dil, transposed, seed = case
    coords = random_coords(seeded(case), batch, spatial, n)
    grid = [batch, *spatial]
    keys, values = ops.hash_build(coords, grid)
    torch.testing.assert_close(
        ops.kmap_submanifold(keys, values, coords, grid, ks, dil), ref.kmap_submanifold_reference(coords, grid, ks, dil)
    )
    out_spatial = out_shape_or_none(spatial, ks, stride, pad, dil, transposed)
    if out_spatial is None:
        return
    got = ops.kmap_strided(coords, grid, out_spatial, ks, stride, pad, dil, transposed)
    exp = ref.kmap_strided_reference(coords, grid, out_spatial, ks, stride, pad, dil, transposed)
    torch.testing.assert_close(got[0], exp[0])
    torch.testing.assert_close(got[1], exp[1])


# --------------------------------------------------------------------------- the references vs dense torch
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOMETRY_IDS)
def test_reference_kmap_strided_and_conv_match_dense(geom, transposed):
    """Output sites = cells where the occupancy convolution is > 0; values = dense conv at those cells."""
    _, batch, _, ks, stride, pad, dil = geom
    coords, grid, out_spatial = strided_case(geom, transposed)
    out_coords, nbmap = ref.kmap_strided_reference(coords, grid, out_spatial, ks, stride, pad, dil, transposed)
    gen = seeded("dense", geom, transposed)
    feats = torch.randn((coords.shape[0], 3), generator=gen, dtype=torch.float64)
    weight = torch.randn((math.prod(ks), 3, 2), generator=gen, dtype=torch.float64)
    x = dense_feats(feats, coords, batch, grid[1:])
    occ = dense_occupancy(coords, batch, grid[1:])
    if transposed:
        ones = torch.ones((1, 1, *ks), dtype=torch.float64)
        hits = F.conv_transpose3d(occ, ones, stride=stride, padding=pad, dilation=dil)
        dense_out = F.conv_transpose3d(x, to_dense_weight(weight, ks, True), stride=stride, padding=pad, dilation=dil)
    else:
        ones = torch.ones((1, 1, *ks), dtype=torch.float64)
        hits = F.conv3d(occ, ones, stride=stride, padding=pad, dilation=dil)
        dense_out = F.conv3d(x, to_dense_weight(weight, ks), stride=stride, padding=pad, dilation=dil)
    assert tuple(hits.shape[2:]) == tuple(out_spatial)
    torch.testing.assert_close(out_coords, (hits[:, 0] > 0).nonzero().int())
    out = ref.conv_forward_reference(feats, weight, nbmap, out_coords.shape[0], False)
    torch.testing.assert_close(out, read_sites(dense_out, out_coords))


@pytest.mark.parametrize("ks,dil", SUBM_KERNELS, ids=["3", "2", "aniso", "aniso-dilated"])
def test_reference_submanifold_conv_matches_dense(ks, dil):
    spatial, batch = (6, 5, 7), 2
    gen = seeded("subm-dense", ks, dil)
    coords = random_coords(gen, batch, spatial, 80)
    nbmap = ref.kmap_submanifold_reference(coords, [batch, *spatial], ks, dil)
    feats = torch.randn((coords.shape[0], 3), generator=gen, dtype=torch.float64)
    weight = torch.randn((math.prod(ks), 3, 4), generator=gen, dtype=torch.float64)
    pad = [d * (k // 2) for k, d in zip(ks, dil)]
    dense_out = F.conv3d(dense_feats(feats, coords, batch, spatial), to_dense_weight(weight, ks), padding=pad,
                         dilation=dil)
    expected = read_sites(dense_out, coords)  # crop: only cells inside the input grid are read
    torch.testing.assert_close(ref.conv_forward_reference(feats, weight, nbmap, coords.shape[0]), expected)


@pytest.mark.parametrize("count_inactive", [False, True])
def test_reference_pools_match_dense(count_inactive):
    spatial, batch, ks, stride, pad, dil = (7, 6, 5), 2, (2, 3, 2), (2, 2, 1), (1, 1, 0), (1, 1, 2)
    gen = seeded("pool-dense", count_inactive)
    coords = random_coords(gen, batch, spatial, 70)
    out_spatial = conv_output_shape(spatial, ks, stride, pad, dil)
    out_coords, nbmap = ref.kmap_strided_reference(coords, [batch, *spatial], out_spatial, ks, stride, pad, dil, False)
    feats = torch.randn((coords.shape[0], 3), generator=gen, dtype=torch.float64)
    x = dense_feats(feats, coords, batch, spatial)
    occ = dense_occupancy(coords, batch, spatial)
    # max: inactive cells read as -inf
    xm = torch.where(occ.bool(), x, -math.inf)
    dense_max = F.max_pool3d(xm, ks, stride, pad, dil)
    torch.testing.assert_close(ref.maxpool_forward_reference(feats, nbmap)[0], read_sites(dense_max, out_coords))
    # avg: dense avg_pool3d supports no dilation, so the window sums come from a ones-kernel conv3d.
    ones = torch.ones((1, 1, *ks), dtype=torch.float64)
    sums = F.conv3d(x.reshape(-1, 1, *spatial), ones, stride=stride, padding=pad, dilation=dil).reshape(
        batch, 3, *out_spatial)
    counts = F.conv3d(occ, ones, stride=stride, padding=pad, dilation=dil)
    dense_avg = sums / math.prod(ks) if count_inactive else sums / counts.clamp_min(1)
    torch.testing.assert_close(ref.avgpool_forward_reference(feats, nbmap, count_inactive),
                               read_sites(dense_avg, out_coords))


# --------------------------------------------------------------------------- convolution ops
def conv_maps():
    """``(name, nbmap, n_in)`` kernel maps: from coordinates, random, and empty ones."""
    maps = []
    geom = GEOMETRIES[1]
    coords, grid, out_spatial = strided_case(geom, False)
    _, _, _, ks, stride, pad, dil = geom
    maps.append(("strided", ops.kmap_strided(coords, grid, out_spatial, ks, stride, pad, dil, False)[1],
                 coords.shape[0]))
    keys, values = ops.hash_build(coords, grid)
    maps.append(("submanifold", ops.kmap_submanifold(keys, values, coords, grid, (3, 3, 3), (1, 1, 1)),
                 coords.shape[0]))
    maps.append(("random", random_nbmap(seeded("map"), 23, 17, 5), 23))
    maps.append(("no-inputs", torch.full((6, 4), -1, dtype=torch.int32), 0))
    maps.append(("no-outputs", torch.empty((0, 4), dtype=torch.int32), 5))
    maps.append(("all-empty", torch.empty((0, 8), dtype=torch.int32), 0))
    return maps


CONV_MAPS = conv_maps()


def tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward-map", "transposed"])
@pytest.mark.parametrize("name,nbmap,n_in", CONV_MAPS, ids=[m[0] for m in CONV_MAPS])
def test_conv_ops_match_reference(name, nbmap, n_in, transposed, dtype):
    gen = seeded("conv", name, transposed)
    m, kvol = nbmap.shape
    c_in, c_out = 5, 3
    # The map indexes the features (forward) or the output (transposed).
    n_feats, n_out = (m, n_in) if transposed else (n_in, m)
    feats = torch.randn((n_feats, c_in), generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn((kvol, c_in, c_out), generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn((n_out, c_out), generator=gen, dtype=torch.float64).to(dtype)
    tol = tolerances(dtype)

    out = ops.conv_forward(feats, weight, nbmap, n_out, transposed)
    assert out.dtype == dtype and out.shape == (n_out, c_out)
    torch.testing.assert_close(out, ref.conv_forward_reference(feats, weight, nbmap, n_out, transposed), **tol)

    grad_feats = ops.conv_input_grad(grad_out, weight, nbmap, n_feats, transposed)
    grad_weight = ops.conv_weight_grad(feats, grad_out, nbmap, transposed)
    torch.testing.assert_close(
        grad_feats, ref.conv_input_grad_reference(grad_out, weight, nbmap, n_feats, transposed), **tol)
    torch.testing.assert_close(
        grad_weight, ref.conv_weight_grad_reference(feats, grad_out, nbmap, transposed), **tol)

    # The backward ops are the gradients of the reference forward (autograd through plain torch).
    f = feats.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ref.conv_forward_reference(f, w, nbmap, n_out, transposed).backward(grad_out)
    torch.testing.assert_close(grad_feats, f.grad, **tol)
    torch.testing.assert_close(grad_weight, w.grad, **tol)

    # ... and what autograd gives through the op.
    f2 = feats.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    ops.conv_forward(f2, w2, nbmap, n_out, transposed).backward(grad_out)
    torch.testing.assert_close(f2.grad, grad_feats, **tol)
    torch.testing.assert_close(w2.grad, grad_weight, **tol)


def test_conv_forward_non_contiguous_inputs():
    gen = seeded("noncontig")
    nbmap = random_nbmap(gen, 12, 9, 6)
    feats = torch.randn((3, 12), generator=gen, dtype=torch.float64).t()  # [12, 3], column-major
    weight = torch.randn((6, 4, 3), generator=gen, dtype=torch.float64).transpose(1, 2)  # [6, 3, 4]
    torch.testing.assert_close(ops.conv_forward(feats, weight, nbmap, 9),
                               ref.conv_forward_reference(feats, weight, nbmap, 9))
    big = random_nbmap(gen, 12, 18, 6)
    torch.testing.assert_close(ops.conv_forward(feats, weight, big[::2], 9),
                               ref.conv_forward_reference(feats, weight, big[::2], 9))


# --------------------------------------------------------------------------- pooling ops
POOL_MAPS = [m for m in CONV_MAPS if m[0] != "submanifold"] + [
    ("sparse-random", random_nbmap(seeded("sparse-pool"), 9, 14, 6, density=0.2), 9),  # many rows without input
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,nbmap,n_in", POOL_MAPS, ids=[m[0] for m in POOL_MAPS])
def test_maxpool_ops_match_reference(name, nbmap, n_in, dtype):
    gen = seeded("maxpool", name)
    feats = torch.randn((n_in, 4), generator=gen, dtype=torch.float64).to(dtype)
    out, argmax = ops.maxpool_forward(feats, nbmap)
    exp_out, exp_arg = ref.maxpool_forward_reference(feats, nbmap)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=0)
    torch.testing.assert_close(argmax, exp_arg)
    no_input = (nbmap < 0).all(dim=1)
    assert bool((argmax[no_input] == -1).all()) and bool((out[no_input] == 0).all())
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(ops.maxpool_backward(grad_out, argmax, n_in),
                               ref.maxpool_backward_reference(grad_out, argmax, n_in), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_maxpool_ties_and_nan_match_reference(dtype):
    """Ties go to the first input in offset order; a NaN input wins (as in ``max_pool3d``)."""
    gen = seeded("ties")
    nbmap = random_nbmap(gen, 30, 20, 8, density=0.9)
    feats = torch.randint(0, 3, (30, 5), generator=gen).to(dtype)  # many ties
    feats[3, 1] = math.nan
    feats[7, 2] = -math.inf
    out, argmax = ops.maxpool_forward(feats, nbmap)
    exp_out, exp_arg = ref.maxpool_forward_reference(feats, nbmap)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(argmax, exp_arg)


@pytest.mark.parametrize("count_inactive", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,nbmap,n_in", POOL_MAPS, ids=[m[0] for m in POOL_MAPS])
def test_avgpool_ops_match_reference(name, nbmap, n_in, dtype, count_inactive):
    gen = seeded("avgpool", name)
    feats = torch.randn((n_in, 4), generator=gen, dtype=torch.float64).to(dtype)
    tol = tolerances(dtype)
    out = ops.avgpool_forward(feats, nbmap, count_inactive)
    torch.testing.assert_close(out, ref.avgpool_forward_reference(feats, nbmap, count_inactive), **tol)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = ops.avgpool_backward(grad_out, nbmap, n_in, count_inactive)
    torch.testing.assert_close(grad, ref.avgpool_backward_reference(grad_out, nbmap, n_in, count_inactive), **tol)
    f = feats.clone().requires_grad_()
    ref.avgpool_forward_reference(f, nbmap, count_inactive).backward(grad_out)
    torch.testing.assert_close(grad, f.grad, **tol)


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("transposed", [False, True], ids=["forward-map", "transposed"])
def test_conv_forward_gradcheck(transposed):
    gen = seeded("gradcheck-conv", transposed)
    n_in, m, kvol = 7, 6, 5
    nbmap = random_nbmap(gen, n_in, m, kvol, density=0.7)
    n_feats, n_out = (m, n_in) if transposed else (n_in, m)
    feats = torch.randn((n_feats, 3), generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn((kvol, 3, 2), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: ops.conv_forward(f, w, nbmap, n_out, transposed), (feats, weight))


def test_maxpool_forward_gradcheck():
    gen = seeded("gradcheck-max")
    n_in, c = 10, 3
    nbmap = random_nbmap(gen, n_in, 8, 6, density=0.5)
    # Distinct values one apart: the finite-difference step never changes the argmax.
    feats = torch.randperm(n_in * c, generator=gen).to(torch.float64).reshape(n_in, c).requires_grad_()
    assert torch.autograd.gradcheck(lambda f: ops.maxpool_forward(f, nbmap)[0], (feats,))


@pytest.mark.parametrize("count_inactive", [False, True])
def test_avgpool_forward_gradcheck(count_inactive):
    gen = seeded("gradcheck-avg", count_inactive)
    nbmap = random_nbmap(gen, 9, 7, 5, density=0.5)
    feats = torch.randn((9, 3), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: ops.avgpool_forward(f, nbmap, count_inactive), (feats,))


@pytest.mark.parametrize("transposed", [False, True], ids=["forward-map", "transposed"])
def test_conv_forward_gradgradcheck(transposed):
    gen = seeded("gradgradcheck-conv", transposed)
    n_in, m, kvol = 6, 5, 4
    nbmap = random_nbmap(gen, n_in, m, kvol, density=0.7)
    n_feats, n_out = (m, n_in) if transposed else (n_in, m)
    feats = torch.randn((n_feats, 3), generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn((kvol, 3, 2), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda f, w: ops.conv_forward(f, w, nbmap, n_out, transposed), (feats, weight))


def test_pool_gradgradcheck():
    gen = seeded("gradgradcheck-pool")
    nbmap = random_nbmap(gen, 9, 7, 5, density=0.5)
    feats = torch.randperm(27, generator=gen).to(torch.float64).reshape(9, 3).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda f: ops.maxpool_forward(f, nbmap)[0], (feats,))
    for count_inactive in (False, True):
        assert torch.autograd.gradgradcheck(lambda f: ops.avgpool_forward(f, nbmap, count_inactive), (feats,))


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    """Sample arguments for every op.

    The backward ops are differentiable too (double backward), so their inputs require grad.
    """
    gen = seeded("opcheck")
    coords = random_coords(gen, 2, (5, 4, 6), 25)
    grid = [2, 5, 4, 6]
    keys, values = ops.hash_build(coords, grid)
    subm = ops.kmap_submanifold(keys, values, coords, grid, (3, 3, 3), (1, 1, 1))
    out_spatial = conv_output_shape(grid[1:], (3, 2, 3), (2, 2, 1), (1, 0, 1), (1, 1, 1))
    out_coords, strided = ops.kmap_strided(coords, grid, out_spatial, (3, 2, 3), (2, 2, 1), (1, 0, 1), (1, 1, 1), False)
    n, m = coords.shape[0], out_coords.shape[0]

    def rand(*shape, grad=False):
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    _, argmax = ops.maxpool_forward(rand(n, 3), strided)
    att_off = torch.tensor([0, 4, 4, 5, 9])
    att_x, att_w, att_b = rand(9, 5), rand(12, 5), rand(12)
    att_idx = torch.randperm(9, generator=gen)
    _, att_out, att_lse = torch.ops.sparseconv.window_attention(att_x, att_w, att_b, rand(3, 4), None, att_off, att_idx,
                                                                2, 0.4)
    return {
        "hash_build": [(coords, grid), (coords[:0], grid)],
        "hash_query": [(keys, values, random_coords(gen, 2, (5, 4, 6), 40), grid)],
        "kmap_submanifold": [(keys, values, coords, grid, [3, 3, 3], [1, 1, 1]),
                             (keys, values, coords, grid, [2, 1, 3], [1, 2, 1])],
        "kmap_strided": [(coords, grid, list(out_spatial), [3, 2, 3], [2, 2, 1], [1, 0, 1], [1, 1, 1], False),
                         (coords, grid, [10, 8, 12], [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], True)],
        "conv_forward": [(rand(n, 3, grad=True), rand(27, 3, 2, grad=True), subm, n, False),
                         (rand(n, 3, grad=True), rand(18, 3, 2, grad=True), strided, m, False),
                         (rand(m, 3, grad=True), rand(18, 3, 2, grad=True), strided, n, True)],
        "conv_input_grad": [(rand(m, 2, grad=True), rand(18, 3, 2, grad=True), strided, n, False),
                            (rand(n, 2, grad=True), rand(18, 3, 2, grad=True), strided, m, True)],
        "conv_weight_grad": [(rand(n, 3, grad=True), rand(m, 2, grad=True), strided, False),
                             (rand(m, 3, grad=True), rand(n, 2, grad=True), strided, True)],
        "maxpool_forward": [(rand(n, 3, grad=True), strided)],
        "maxpool_backward": [(rand(m, 3, grad=True), argmax, n)],
        "avgpool_forward": [(rand(n, 3, grad=True), strided, False), (rand(n, 3, grad=True), strided, True)],
        "avgpool_backward": [(rand(m, 3, grad=True), strided, n, False), (rand(m, 3, grad=True), strided, n, True)],
        "sparse_rows_mm": [(torch.relu(rand(20, 7)).requires_grad_(), rand(7, 5, grad=True)),
                           (rand(0, 3, grad=True), rand(3, 4, grad=True))],
        "window_attention": [(rand(9, 5, grad=True), rand(12, 5, grad=True), rand(12, grad=True), rand(3, 4, grad=True),
                              rand(3, grad=True), att_off, None, 2, 0.4),
                             (rand(9, 5, grad=True), rand(12, 5, grad=True), None, rand(4, 4, grad=True), None, att_off,
                              att_idx, 2, 0.4),
                             (rand(0, 3, grad=True), rand(6, 3, grad=True), None, rand(2, 2, grad=True), None,
                              att_off[:1], None, 1, 1.0)],
        "window_attention_backward": [(rand(9, 4), att_x, att_w, att_b, att_out, att_lse, att_off, att_idx, 2, 0.4)],
        "voxelize": [(rand(60, 4) * 3, None, [0.5, 0.5, 0.5], [-3.0, -3.0, -3.0], [12, 12, 12], 1, -1, -1, "mean", False),
                     (rand(60, 5) * 3, torch.randint(0, 2, (60,), generator=gen), [1.0, 0.5, 2.0], [-3.0, -3.0, -3.0],
                      [6, 12, 3], 2, 2, 20, "pad", True)],
    }


OPCHECK_SAMPLES = _opcheck_samples()


def test_opcheck_covers_every_op():
    assert set(OPCHECK_SAMPLES) == set(ops.OP_NAMES)


# All four default opcheck utilities pass for every op, including hash_build and kmap_strided whose
# output sizes depend on the data: their fake kernels allocate unbacked sizes with
# ``ctx.new_dynamic_size()``, which test_faketensor and test_aot_dispatch_dynamic accept, so no
# ``test_utils`` restriction is needed (checked with torch 2.13).
@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_opcheck(name):
    op = getattr(torch.ops.sparseconv, name).default
    for args in OPCHECK_SAMPLES[name]:
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- torch.compile
class _UNet(torch.nn.Module):
    """SubMConv3d -> BatchNorm -> ReLU -> SparseConv3d(stride 2) -> SubMConv3d -> SparseInverseConv3d."""

    def __init__(self):
        super().__init__()
        self.conv1 = snn.SubMConv3d(3, 8, 3)
        self.norm = snn.BatchNorm(8)
        self.relu = snn.ReLU()
        self.down = snn.SparseConv3d(8, 8, 3, stride=2, padding=1, indice_key="down")
        self.conv2 = snn.SubMConv3d(8, 8, (3, 1, 3))
        self.up = snn.SparseInverseConv3d(8, 4, 3, indice_key="down")

    def forward(self, x: SparseTensor) -> torch.Tensor:
        y = self.relu(self.norm(self.conv1(x)))
        y = self.conv2(self.down(y))
        return self.up(y).features


def _compile_input(seed):
    gen = seeded("compile", seed)
    coords = random_coords(gen, 2, (8, 7, 8), 70)
    feats = torch.randn((coords.shape[0], 3), generator=gen, dtype=torch.float64, requires_grad=True)
    return SparseTensor(feats, coords, (8, 7, 8), batch_size=2)


def _forward_backward(model, x):
    x.features.grad = None
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), x.features.grad.clone(), [p.grad.clone() for p in model.parameters()]


def _check_compiled(backend):
    torch.manual_seed(0)
    model = _UNet().double()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend)
    for seed in range(2):  # a second input with another voxel count
        x = _compile_input(seed)
        got = _forward_backward(compiled, x)
        expected = _forward_backward(model, x)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
        for g, e in zip(got[2], expected[2]):
            torch.testing.assert_close(g, e)
    # Kernel-map building is torch.compiler.disable'd (graph breaks there); the convolutions are traced.
    conv = (torch.ops.sparseconv.conv_forward, torch.ops.sparseconv.conv_forward.default)
    traced = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and n.target in conv]
    assert len(traced) >= 3  # conv1, down, conv2, up (some may share a graph)
    # ... and no kernel-map op ends up in a graph: map building stays eager.
    kmap_ops = {op for name in ("hash_build", "kmap_submanifold", "kmap_strided")
                for op in (getattr(torch.ops.sparseconv, name), getattr(torch.ops.sparseconv, name).default)}
    assert not [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and n.target in kmap_ops]
    torch._dynamo.reset()


def test_compile_eager_backend_matches_eager():
    _check_compiled("eager")


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="inductor on CPU needs a C++ compiler",
)
def test_compile_inductor_matches_eager():
    # First run ~35 s on 2 cores (C++ codegen of several small graphs; ~10 s with a warm inductor cache).
    _check_compiled("inductor")


# --------------------------------------------------------------------------- validation parity
@pytest.mark.parametrize(
    "coords,grid",
    [
        (torch.tensor([[0, 1, 1, 1], [0, 4, 0, 0]], dtype=torch.int32), [1, 4, 4, 4]),  # x outside
        (torch.tensor([[0, 1, 1, 1], [0, 0, -1, 0]], dtype=torch.int32), [1, 4, 4, 4]),  # negative
        (torch.tensor([[1, 1, 1, 1]], dtype=torch.int32), [1, 4, 4, 4]),  # batch outside
        (torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 1, 1]], dtype=torch.int32), [1, 4, 4, 4]),  # duplicate
        (torch.tensor([[0, 0, 0, 0]], dtype=torch.int32), [2**4, 2**21, 2**21, 2**21]),  # > 2^62 cells
    ],
    ids=["outside", "negative", "batch", "duplicate", "too-large"],
)
def test_op_and_reference_reject_the_same_coordinates(coords, grid):
    with pytest.raises(ValueError):
        ops.hash_build(coords, grid)
    with pytest.raises(ValueError):
        ref.hash_build_reference(coords, grid)


# --------------------------------------------------------------------------- voxelize vs reference
@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "first", "count", "pad"])
@pytest.mark.parametrize("limits", [(-1, -1), (2, -1), (-1, 30), (3, 25)], ids=["none", "points", "voxels", "both"])
@pytest.mark.parametrize("order_by_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_voxelize_matches_reference(reduce, limits, order_by_first, dtype):
    gen = seeded("voxelize", reduce, limits, order_by_first, str(dtype))
    pts = (torch.rand((700, 5), generator=gen, dtype=dtype) * 14 - 2)
    pts[:200, :3] = pts[:200, :3] * 0.1 + 3  # dense cluster: many points per voxel
    pts[torch.randint(0, 700, (12,), generator=gen), 1] = float("nan")
    pts[torch.randint(0, 700, (6,), generator=gen), 2] = float("inf")
    batch = torch.randint(0, 2, (700,), generator=gen)
    max_points, max_voxels = limits
    if reduce == "pad" and max_points < 0:
        max_points = 4
    args = (pts, batch, [0.7, 0.5, 1.1], [-1.0, -1.5, -2.0], [16, 22, 11], 3, max_points, max_voxels, reduce,
            order_by_first)
    got = ops.voxelize(*args)
    want = ref.voxelize_reference(*args)
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w)
        else:
            assert torch.equal(g, w)
