"""Every sparse conv / pool layer against its dense torch.nn.functional twin, in float64.

Random sparse grids (20-40 % occupancy, batch 1-3, rows in random order) are scattered to a dense
grid; output sites, spatial_shape, features and the gradients of the input features, weight and
bias are compared with dense conv3d / conv_transpose3d / max_pool3d / avg_pool3d (see _dense.py).
"""
import itertools

import pytest
import torch

import sparseconv as sc
from sparseconv import nn as snn

from _dense import (
    DTYPE,
    assert_matches_dense,
    conv_output_shape,
    gather_sites,
    leaf,
    random_coords,
    random_feats,
    ref_avg_pool,
    ref_conv,
    ref_conv_transpose,
    ref_inverse,
    ref_max_pool,
    ref_subm,
    scatter_dense,
    seeded,
    triple,
)

KERNELS = [1, 2, 3, 5, (1, 1, 3), (3, 1, 2)]
STRIDES = [1, 2, 3, (1, 1, 2), (2, 1, 3)]
# (padding, dilation) pairs covering 0 / 1 / anisotropic paddings and 1 / 2 / anisotropic dilations.
PAD_DIL = [(0, 1), (1, 1), (0, 2), (1, 2), ((1, 0, 2), 1), (0, (2, 1, 1)), ((0, 2, 1), (1, 2, 2))]
SUBM_DIL = [1, 2, (2, 1, 1), (1, 2, 3)]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The problems here are tiny: extra intra-op threads only add synchronisation cost (a lot of it
    on a loaded 2-core machine).  Thread-count independence is tested in test_properties.py."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _geom_cases():
    cases = []
    for i, (ks, st, (pad, dil)) in enumerate(itertools.product(KERNELS, STRIDES, PAD_DIL)):
        batch = 1 + i % 3
        name = f"k{_id(ks)}-s{_id(st)}-p{_id(pad)}-d{_id(dil)}-b{batch}"
        cases.append(pytest.param(ks, st, pad, dil, batch, id=name))
    return cases


GEOM = _geom_cases()
# Half of the grid (every other case) for the slower or doubled-up variants; every kernel size,
# stride and (padding, dilation) pair still occurs in it.
GEOM_HALF = GEOM[::2]


def _grid_for_conv(gen, ks, pad, dil, lo=4, hi=9):
    """A random spatial shape (lo..hi per axis, larger where the dilated kernel needs it) whose
    conv3d output grid is non-empty."""
    dims = []
    for k, p, d in zip(ks, pad, dil):
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        dims.append(max(n, d * (k - 1) + 1 - 2 * p, 1))
    return tuple(dims)


def _input(gen, batch, shape, channels):
    occ = 0.2 + 0.2 * float(torch.rand((), generator=gen, dtype=DTYPE))
    coords = random_coords(gen, batch, shape, occ)
    feats = random_feats(gen, coords.shape[0], channels)
    return feats, coords


def _set_params(module, gen):
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=DTYPE))
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=DTYPE))
    return module


# ------------------------------------------------------------------------- SubMConv3d
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dilation", SUBM_DIL, ids=_id)
@pytest.mark.parametrize("kernel_size", KERNELS, ids=_id)
def test_subm_conv(kernel_size, dilation, bias):
    gen = seeded("subm", kernel_size, dilation, bias)
    ks, dil = triple(kernel_size), triple(dilation)
    batch = 1 + int(torch.randint(3, (1,), generator=gen))
    shape = _grid_for_conv(gen, (1, 1, 1), (0, 0, 0), (1, 1, 1), 3, 9)
    feats, coords = _input(gen, batch, shape, 3)
    conv = _set_params(snn.SubMConv3d(3, 4, kernel_size, dilation=dilation, bias=bias, dtype=DTYPE), gen)
    f_s = leaf(feats)
    x = sc.SparseTensor(f_s, coords, spatial_shape=shape, batch_size=batch)
    out = conv(x)
    assert out.coordinate_set is x.coordinate_set
    f_d, w_d, b_d = leaf(feats), leaf(conv.weight), leaf(conv.bias)
    ref, active = ref_subm(f_d, coords, batch, shape, w_d, b_d, ks, dil)
    assert_matches_dense(out, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], gen, expected_coords=coords)


# ------------------------------------------------------------------------- SparseConv3d
@pytest.mark.parametrize("kernel_size, stride, padding, dilation, batch", GEOM)
def test_sparse_conv(kernel_size, stride, padding, dilation, batch):
    gen = seeded("conv", kernel_size, stride, padding, dilation, batch)
    ks, st, pad, dil = triple(kernel_size), triple(stride), triple(padding), triple(dilation)
    shape = _grid_for_conv(gen, ks, pad, dil)
    feats, coords = _input(gen, batch, shape, 2)
    conv = _set_params(snn.SparseConv3d(2, 3, kernel_size, stride, padding, dilation, dtype=DTYPE), gen)
    f_s = leaf(feats)
    out = conv(sc.SparseTensor(f_s, coords, spatial_shape=shape, batch_size=batch))
    assert out.stride == st
    assert out.batch_size == batch
    f_d, w_d, b_d = leaf(feats), leaf(conv.weight), leaf(conv.bias)
    ref, active = ref_conv(f_d, coords, batch, shape, w_d, b_d, ks, st, pad, dil)
    assert active.any(), "test grid should give a non-empty output"
    assert_matches_dense(out, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], gen)


# ------------------------------------------------------------------------- SparseConvTranspose3d
@pytest.mark.parametrize("kernel_size, stride, padding, dilation, batch", GEOM_HALF)
def test_sparse_conv_transpose(kernel_size, stride, padding, dilation, batch):
    gen = seeded("convT", kernel_size, stride, padding, dilation, batch)
    ks, st, pad, dil = triple(kernel_size), triple(stride), triple(padding), triple(dilation)
    # Non-zero output_padding (< max(stride, dilation), as conv_transpose3d requires) on every other case.
    use_opad = int(torch.randint(2, (1,), generator=gen)) == 1
    opad = tuple(min(1, max(s, d) - 1) if use_opad else 0 for s, d in zip(st, dil))
    dims = []
    for k, s, p, d, o in zip(ks, st, pad, dil, opad):
        n = int(torch.randint(2, 6, (1,), generator=gen))
        while (n - 1) * s - 2 * p + d * (k - 1) + o + 1 < 2:
            n += 1
        dims.append(n)
    shape = tuple(dims)
    feats, coords = _input(gen, batch, shape, 2)
    conv = _set_params(
        snn.SparseConvTranspose3d(2, 3, kernel_size, stride, padding, dilation, output_padding=opad, dtype=DTYPE), gen
    )
    f_s = leaf(feats)
    out = conv(sc.SparseTensor(f_s, coords, spatial_shape=shape, batch_size=batch))
    f_d, w_d, b_d = leaf(feats), leaf(conv.weight), leaf(conv.bias)
    ref, active = ref_conv_transpose(f_d, coords, batch, shape, w_d, b_d, ks, st, pad, dil, opad)
    assert_matches_dense(out, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], gen)


# ------------------------------------------------------------------------- SparseInverseConv3d
INVERSE_CASES = [
    pytest.param(*case.values, i % 2 == 1, id=f"{case.id}-{'indice_key' if i % 2 else 'parent'}")
    for i, case in enumerate(GEOM[1::2])
]


@pytest.mark.parametrize("kernel_size, stride, padding, dilation, batch, via_key", INVERSE_CASES)
def test_sparse_inverse_conv(kernel_size, stride, padding, dilation, batch, via_key):
    gen = seeded("inverse", kernel_size, stride, padding, dilation, batch, via_key)
    ks, st, pad, dil = triple(kernel_size), triple(stride), triple(padding), triple(dilation)
    shape = _grid_for_conv(gen, ks, pad, dil)
    feats, coords = _input(gen, batch, shape, 2)
    key = "down" if via_key else None
    down = _set_params(snn.SparseConv3d(2, 3, kernel_size, stride, padding, dilation, indice_key=key, dtype=DTYPE), gen)
    up = _set_params(snn.SparseInverseConv3d(3, 2, kernel_size, indice_key=key, dtype=DTYPE), gen)
    x = sc.SparseTensor(feats, coords, spatial_shape=shape, batch_size=batch)
    y = down(x)
    # The inverse conv is checked on its own: its input features are a fresh leaf on y's sites.
    coarse = random_feats(gen, y.num_voxels, 3)
    c_s = leaf(coarse)
    y_in = y.replace_feature(c_s)
    if via_key:
        # A 1x1x1 SparseConv3d keeps the sites but makes a new set whose parent is itself, so only
        # the key leads back to `down` (with the parent, x's sites would not come back).
        mid = snn.SparseConv3d(3, 3, 1, dtype=DTYPE)(y.detach())
        assert mid.coordinate_set is not y.coordinate_set
        torch.testing.assert_close(mid.coords, y.coords, rtol=0, atol=0)
        y_in = mid.replace_feature(c_s)
    out = up(y_in)
    assert out.coordinate_set is x.coordinate_set
    assert out.spatial_shape == shape and out.stride == (1, 1, 1)
    c_d, w_d, b_d = leaf(coarse), leaf(up.weight), leaf(up.bias)
    ref, active = ref_inverse(c_d, y.coords, batch, y.spatial_shape, coords, shape, w_d, b_d, ks, st, pad, dil)
    assert_matches_dense(out, ref, active, [c_s, up.weight, up.bias], [c_d, w_d, b_d], gen, expected_coords=coords)


# ------------------------------------------------------------------------- pools
@pytest.mark.parametrize("kernel_size, stride, padding, dilation, batch", GEOM)
def test_sparse_max_pool(kernel_size, stride, padding, dilation, batch):
    gen = seeded("maxpool", kernel_size, stride, padding, dilation, batch)
    ks, st, pad, dil = triple(kernel_size), triple(stride), triple(padding), triple(dilation)
    shape = _grid_for_conv(gen, ks, pad, dil)
    feats, coords = _input(gen, batch, shape, 3)
    f_s = leaf(feats)
    out = snn.SparseMaxPool3d(kernel_size, stride, padding, dilation)(
        sc.SparseTensor(f_s, coords, spatial_shape=shape, batch_size=batch)
    )
    assert out.stride == st
    f_d = leaf(feats)
    ref, active = ref_max_pool(f_d, coords, batch, shape, ks, st, pad, dil)
    assert_matches_dense(out, ref, active, [f_s], [f_d], gen)


@pytest.mark.parametrize("count_inactive", [False, True])
@pytest.mark.parametrize("kernel_size, stride, padding, dilation, batch", GEOM_HALF)
def test_sparse_avg_pool(kernel_size, stride, padding, dilation, batch, count_inactive):
    gen = seeded("avgpool", kernel_size, stride, padding, dilation, batch, count_inactive)
    ks, st, pad, dil = triple(kernel_size), triple(stride), triple(padding), triple(dilation)
    shape = _grid_for_conv(gen, ks, pad, dil)
    feats, coords = _input(gen, batch, shape, 3)
    f_s = leaf(feats)
    pool = snn.SparseAvgPool3d(kernel_size, stride, padding, dilation, count_inactive=count_inactive)
    out = pool(sc.SparseTensor(f_s, coords, spatial_shape=shape, batch_size=batch))
    f_d = leaf(feats)
    ref, active = ref_avg_pool(f_d, coords, batch, shape, ks, st, pad, dil, count_inactive)
    assert_matches_dense(out, ref, active, [f_s], [f_d], gen)


@pytest.mark.parametrize("kernel_size", [2, 3, (1, 2, 3)], ids=_id)
def test_pool_default_stride_is_kernel_size(kernel_size):
    gen = seeded("pool-default-stride", kernel_size)
    ks = triple(kernel_size)
    shape = (7, 8, 6)
    feats, coords = _input(gen, 2, shape, 2)
    x = sc.SparseTensor(feats, coords, spatial_shape=shape, batch_size=2)
    args = (coords, 2, shape, ks, ks, (0, 0, 0), (1, 1, 1))
    for pool, ref in [
        (snn.SparseMaxPool3d(kernel_size), lambda f: ref_max_pool(f, *args)),
        (snn.SparseAvgPool3d(kernel_size), lambda f: ref_avg_pool(f, *args, False)),
    ]:
        out = pool(x)
        assert out.spatial_shape == conv_output_shape(shape, ks, ks, (0,) * 3, (1,) * 3)
        want, active = ref(feats)
        assert_matches_dense(out, want, active, [], [], gen)


# ------------------------------------------------------------------------- U-Net chain
@pytest.mark.parametrize("use_keys", [False, True], ids=["parent", "indice_key"])
@pytest.mark.parametrize("batch", [1, 3])
def test_unet_chain_restores_coordinates(use_keys, batch):
    """Two strided convs down, a middle layer, two inverse convs up: the original sites come back
    (in the input's row order) and the whole chain equals the dense chain with masking.

    With ``use_keys`` the middle layer is a 1x1x1 SparseConv3d, which makes a new coordinate set
    (same sites) whose parent is itself: only the indice_keys lead the inverse convs back."""
    gen = seeded("unet", use_keys, batch)
    shape = (9, 8, 7)
    feats, coords = _input(gen, batch, shape, 2)
    k1, k2 = (3, 3, 3), (2, 3, 2)
    st1, st2 = (2, 2, 2), (2, 1, 2)
    pad1, pad2 = (1, 1, 1), (0, 1, 0)
    key1, key2 = ("d1", "d2") if use_keys else (None, None)
    down1 = snn.SparseConv3d(2, 4, k1, st1, pad1, indice_key=key1, dtype=DTYPE)
    down2 = snn.SparseConv3d(4, 5, k2, st2, pad2, indice_key=key2, dtype=DTYPE)
    mid = snn.SparseConv3d(5, 5, 1, dtype=DTYPE) if use_keys else snn.SubMConv3d(5, 5, 3, dtype=DTYPE)
    up2 = snn.SparseInverseConv3d(5, 4, k2, indice_key=key2, dtype=DTYPE)
    up1 = snn.SparseInverseConv3d(4, 3, k1, indice_key=key1, dtype=DTYPE)
    mods = [_set_params(m, gen) for m in (down1, down2, mid, up2, up1)]

    f_s = leaf(feats)
    x = sc.SparseTensor(f_s, coords, spatial_shape=shape, batch_size=batch)
    h1 = down1(x)
    h2 = down2(h1)
    m = mid(h2)
    torch.testing.assert_close(m.coords, h2.coords, rtol=0, atol=0)
    if use_keys:
        assert m.coordinate_set is not h2.coordinate_set
        # Without the key the inverse conv would undo the 1x1x1 conv (kernel size mismatch here).
        with pytest.raises(ValueError):
            snn.SparseInverseConv3d(5, 4, k2, dtype=DTYPE)(m)
    else:
        assert m.coordinate_set is h2.coordinate_set
    u2 = up2(m)
    out = up1(u2)
    assert u2.coordinate_set is h1.coordinate_set
    assert u2.spatial_shape == h1.spatial_shape and u2.stride == st1
    assert out.coordinate_set is x.coordinate_set
    torch.testing.assert_close(out.coords, coords, rtol=0, atol=0)
    assert out.spatial_shape == shape and out.stride == (1, 1, 1)

    # Dense chain: each layer's dense output is read at the sparse layer's active sites.
    one = (1, 1, 1)
    f_d = leaf(feats)
    params = [(leaf(mod.weight), leaf(mod.bias)) for mod in mods]
    d1, a1 = ref_conv(f_d, coords, batch, shape, *params[0], k1, st1, pad1, one)
    c1 = a1.nonzero().int()
    d2, a2 = ref_conv(gather_sites(d1, c1), c1, batch, h1.spatial_shape, *params[1], k2, st2, pad2, one)
    c2 = a2.nonzero().int()
    if use_keys:
        dm, _ = ref_conv(gather_sites(d2, c2), c2, batch, h2.spatial_shape, *params[2], one, one, (0, 0, 0), one)
    else:
        dm, _ = ref_subm(gather_sites(d2, c2), c2, batch, h2.spatial_shape, *params[2], (3, 3, 3), one)
    du2, _ = ref_inverse(gather_sites(dm, c2), c2, batch, h2.spatial_shape, c1, h1.spatial_shape, *params[3],
                         k2, st2, pad2, one)
    du1, a0 = ref_inverse(gather_sites(du2, c1), c1, batch, h1.spatial_shape, coords, shape, *params[4],
                          k1, st1, pad1, one)
    sparse_leaves = [f_s] + [t for mod in mods for t in (mod.weight, mod.bias)]
    dense_leaves = [f_d] + [t for p in params for t in p]
    assert_matches_dense(out, du1, a0, sparse_leaves, dense_leaves, gen, expected_coords=coords)


def test_inverse_conv_without_parent_or_key_raises():
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 3, 1]], dtype=torch.int32)
    x = sc.SparseTensor(torch.randn(2, 2, dtype=DTYPE), coords, spatial_shape=(4, 4, 4))
    with pytest.raises(ValueError):
        snn.SparseInverseConv3d(2, 2, 3, dtype=DTYPE)(x)
    with pytest.raises(ValueError):
        snn.SparseInverseConv3d(2, 2, 3, indice_key="missing", dtype=DTYPE)(x)


# ------------------------------------------------------------------------- kernel-map cache
def test_subm_layers_reuse_cached_kernel_map(monkeypatch):
    gen = seeded("subm-cache")
    shape = (8, 7, 6)
    feats, coords = _input(gen, 2, shape, 3)
    x = sc.SparseTensor(feats, coords, spatial_shape=shape, batch_size=2)
    calls = []
    real = sc.ops.kmap_submanifold

    def counting(*args, **kwargs):
        calls.append(args[4:])
        return real(*args, **kwargs)

    monkeypatch.setattr(sc.ops, "kmap_submanifold", counting)
    net = snn.SparseSequential(
        snn.SubMConv3d(3, 4, 3, dtype=DTYPE), snn.ReLU(),
        snn.SubMConv3d(4, 4, 3, dtype=DTYPE), snn.ReLU(),
        snn.SubMConv3d(4, 2, 3, dtype=DTYPE),
        snn.SubMConv3d(2, 2, (1, 1, 3), dtype=DTYPE),
    )
    y = net(x)
    assert y.coordinate_set is x.coordinate_set
    nbmap = x.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1))
    assert y.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1)) is nbmap
    net(x)  # a second pass builds nothing either
    assert x.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1)) is nbmap
    # One build per distinct (kernel_size, dilation), none for the repeated 3x3x3 layers.
    assert len(calls) == 2
    assert sorted(tuple(map(tuple, c)) for c in calls) == sorted([((1, 1, 3), (1, 1, 1)), ((3, 3, 3), (1, 1, 1))])
    # The cached map is the one used: the output equals the dense chain.
    f = feats
    for mod in (net[0], net[2], net[4], net[5]):
        d, _ = ref_subm(f, coords, 2, shape, mod.weight.detach(), mod.bias.detach(), mod.kernel_size, (1, 1, 1))
        f = gather_sites(d, coords)
        if mod is not net[4] and mod is not net[5]:
            f = torch.relu(f)
    torch.testing.assert_close(y.features.detach(), f)


def test_dense_matches_scatter_reference():
    """Self-check of the reference scatter against SparseTensor.dense()."""
    gen = seeded("dense")
    shape = (5, 4, 6)
    feats, coords = _input(gen, 3, shape, 2)
    x = sc.SparseTensor(feats, coords, spatial_shape=shape, batch_size=3)
    torch.testing.assert_close(x.dense(), scatter_dense(feats, coords, 3, shape), rtol=0, atol=0)
