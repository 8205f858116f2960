"""The SparseTensor API: properties, immutability, shared coordinate sets, dense round trips."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseconv
from sparseconv import SparseTensor
from sparseconv.nn import SubMConv3d

DTYPE = torch.float64


def _coords(gen, batch_size, shape, occupancy=0.3, shuffle=True):
    mask = torch.rand((batch_size, *shape), generator=gen) < occupancy
    coords = mask.nonzero().int()
    if shuffle:
        coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    return coords.contiguous()


def _tensor(seed=0, batch_size=2, shape=(4, 5, 3), channels=3, **kw):
    gen = torch.Generator().manual_seed(seed)
    coords = _coords(gen, batch_size, shape)
    feats = torch.randn(coords.shape[0], channels, generator=gen, dtype=DTYPE)
    return SparseTensor(feats, coords, shape, batch_size=batch_size, **kw)


def _scatter_reference(feats, coords, batch_size, shape):
    """Dense ``[B, C, X, Y, Z]`` built one site at a time."""
    out = torch.zeros((batch_size, feats.shape[1], *shape), dtype=feats.dtype)
    for row, (b, x, y, z) in enumerate(coords.tolist()):
        out[b, :, x, y, z] = feats[row]
    return out


# ----------------------------------------------------------------------------- properties
def test_properties_from_arguments():
    x = _tensor(seed=1, batch_size=3, shape=(4, 5, 3), channels=2)
    n = x.coords.shape[0]
    assert x.num_voxels == n == x.features.shape[0]
    assert x.num_channels == 2
    assert x.batch_size == 3
    assert x.spatial_shape == (4, 5, 3)
    assert x.stride == (1, 1, 1)
    assert x.dtype == DTYPE and x.device == torch.device("cpu")
    assert x.feats is x.features and x.indices is x.coords
    assert x.coords.dtype == torch.int32 and x.coords.shape == (n, 4)


def test_defaults_from_coords():
    gen = torch.Generator().manual_seed(2)
    coords = _coords(gen, 2, (6, 3, 7), occupancy=0.2)
    x = SparseTensor(torch.randn(coords.shape[0], 4, generator=gen), coords)
    expected_shape = tuple(int(v) + 1 for v in coords[:, 1:].max(0).values)
    assert x.spatial_shape == expected_shape
    assert x.batch_size == int(coords[:, 0].max()) + 1
    # A batch_size larger than the largest batch index is kept (trailing empty batch elements).
    y = SparseTensor(x.features, coords, batch_size=x.batch_size + 2)
    assert y.batch_size == x.batch_size + 2
    assert y.dense().shape[0] == x.batch_size + 2


def test_stride_int_or_triple():
    gen = torch.Generator().manual_seed(3)
    coords = _coords(gen, 1, (3, 3, 3))
    feats = torch.randn(coords.shape[0], 1, generator=gen)
    assert SparseTensor(feats, coords, stride=2).stride == (2, 2, 2)
    assert SparseTensor(feats, coords, stride=(1, 2, 4)).stride == (1, 2, 4)
    assert SparseTensor(feats, coords, stride=[4, 4, 1]).stride == (4, 4, 1)
    with pytest.raises(ValueError):
        SparseTensor(feats, coords, stride=(1, 2))
    with pytest.raises(ValueError):
        SparseTensor(feats, coords, stride=0)


def test_immutable():
    x = _tensor()
    feats, coords = x.features, x.coords
    with pytest.raises(AttributeError):
        x.features = feats * 2
    with pytest.raises(AttributeError):
        x._feats = feats * 2
    with pytest.raises(AttributeError):
        x.anything = 1
    with pytest.raises(AttributeError):
        del x.coords
    with pytest.raises(AttributeError):
        del x._cset
    assert x.features is feats and x.coords is coords


# ----------------------------------------------------------------------------- shared coordinate sets
def test_replace_feature_shares_coordinate_set_and_kernel_maps():
    x = _tensor(seed=4)
    new = torch.randn(x.num_voxels, 7, dtype=DTYPE)
    y = x.replace_feature(new)
    assert y.features is new and y.num_channels == 7
    assert y.coordinate_set is x.coordinate_set
    assert y.coords is x.coords
    assert (y.spatial_shape, y.stride, y.batch_size) == (x.spatial_shape, x.stride, x.batch_size)
    # A kernel map built through one tensor is the cached object the other one gets.
    nbmap = x.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1))
    assert y.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1)) is nbmap
    # And layers reuse it: a SubMConv3d on y keeps the same set.
    out = SubMConv3d(7, 2, 3).double()(y)
    assert out.coordinate_set is x.coordinate_set
    with pytest.raises(ValueError):
        x.replace_feature(torch.randn(x.num_voxels + 1, 2, dtype=DTYPE))
    with pytest.raises(ValueError):
        x.replace_feature(torch.randn(x.num_voxels, dtype=DTYPE))


def test_to_dtype_and_device_keep_the_set():
    x = _tensor(seed=5).to(torch.float32)
    assert x.dtype == torch.float32
    y = x.to(torch.float64)
    assert y.dtype == torch.float64 and y.coordinate_set is x.coordinate_set
    torch.testing.assert_close(y.features, x.features.double(), rtol=0, atol=0)
    z = x.to("cpu")
    assert z.coordinate_set is x.coordinate_set and z.device == torch.device("cpu")
    assert x.cpu().coordinate_set is x.coordinate_set
    w = x.to(torch.device("cpu"), torch.float64)
    assert w.dtype == torch.float64 and w.coordinate_set is x.coordinate_set
    d = x.replace_feature(x.features.clone().requires_grad_()).detach()
    assert not d.features.requires_grad and d.coordinate_set is x.coordinate_set


# ----------------------------------------------------------------------------- dense
@pytest.mark.parametrize("channels_first", [True, False])
def test_dense_matches_scatter_reference(channels_first):
    x = _tensor(seed=6, batch_size=3, shape=(4, 5, 3), channels=2)
    ref = _scatter_reference(x.features, x.coords, x.batch_size, x.spatial_shape)
    out = x.dense(channels_first=channels_first)
    if not channels_first:
        ref = ref.permute(0, 2, 3, 4, 1)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dense_gradient():
    x = _tensor(seed=7, batch_size=2, shape=(3, 4, 5), channels=3)
    feats = x.features.clone().requires_grad_()
    x = x.replace_feature(feats)
    g = torch.randn((x.batch_size, 3, *x.spatial_shape), dtype=DTYPE, generator=torch.Generator().manual_seed(8))
    (x.dense() * g).sum().backward()
    expected = torch.stack([g[b, :, i, j, k] for b, i, j, k in x.coords.tolist()])
    torch.testing.assert_close(feats.grad, expected, rtol=0, atol=0)
    torch.autograd.gradcheck(lambda f: x.replace_feature(f).dense(channels_first=False),
                             (feats.detach()[:, :2].clone().requires_grad_(),))


def _expected_sites(dense_cl, mask):
    """(coords, feats) of a channels-last dense grid at ``mask``, in (b, x, y, z) order, by loop."""
    coords, feats = [], []
    for site in itertools.product(*(range(s) for s in mask.shape)):
        if mask[site]:
            coords.append(site)
            feats.append(dense_cl[site])
    c = dense_cl.shape[-1]
    return (torch.tensor(coords, dtype=torch.int32).reshape(-1, 4),
            torch.stack(feats) if feats else dense_cl.new_zeros((0, c)))


def test_from_dense_default_mask():
    gen = torch.Generator().manual_seed(9)
    dense = torch.randn(2, 3, 4, 3, 5, generator=gen, dtype=DTYPE)
    keep = torch.rand(2, 4, 3, 5, generator=gen) < 0.3
    single = torch.rand(2, 4, 3, 5, generator=gen) < 0.2  # sites with only channel 1 non-zero
    dense = dense * keep.unsqueeze(1)
    dense[:, 0][single & ~keep] = 0.0
    dense[:, 2][single & ~keep] = 0.0
    dense[:, 1][single & ~keep] = 1.5
    x = SparseTensor.from_dense(dense)
    cl = dense.permute(0, 2, 3, 4, 1)
    coords, feats = _expected_sites(cl, (cl != 0).any(-1))
    assert x.num_voxels == int((keep | single).sum())
    torch.testing.assert_close(x.coords, coords, rtol=0, atol=0)
    torch.testing.assert_close(x.features, feats, rtol=0, atol=0)
    assert (x.spatial_shape, x.batch_size, x.stride) == ((4, 3, 5), 2, (1, 1, 1))
    torch.testing.assert_close(x.dense(), dense, rtol=0, atol=0)


def test_from_dense_explicit_mask_and_channels_last():
    gen = torch.Generator().manual_seed(10)
    dense_cl = torch.randn(2, 3, 4, 2, 5, generator=gen, dtype=DTYPE)
    dense_cl[0, 1, 1, 1] = 0.0  # an all-zero site that the mask keeps
    mask = torch.rand(2, 3, 4, 2, generator=gen) < 0.4
    mask[0, 1, 1, 1] = True
    x = SparseTensor.from_dense(dense_cl, mask=mask, channels_first=False, stride=(2, 1, 2))
    coords, feats = _expected_sites(dense_cl, mask)
    torch.testing.assert_close(x.coords, coords, rtol=0, atol=0)
    torch.testing.assert_close(x.features, feats, rtol=0, atol=0)
    assert x.stride == (2, 1, 2) and x.spatial_shape == (3, 4, 2)
    # Same result from the channels-first layout.
    y = SparseTensor.from_dense(dense_cl.permute(0, 4, 1, 2, 3), mask=mask)
    torch.testing.assert_close(y.coords, x.coords, rtol=0, atol=0)
    torch.testing.assert_close(y.features, x.features, rtol=0, atol=0)
    with pytest.raises(ValueError):
        SparseTensor.from_dense(dense_cl, mask=mask.int(), channels_first=False)
    with pytest.raises(ValueError):
        SparseTensor.from_dense(dense_cl, mask=mask[:, :2], channels_first=False)
    # The result is a valid tensor whose hash and kernel maps can be built.
    SubMConv3d(5, 2, 3).double()(x)


def test_from_dense_rejects_integer_grid():
    grid = torch.ones(1, 1, 2, 2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        SparseTensor.from_dense(grid)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch_size=st.integers(1, 3),
       shape=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))
def test_dense_from_dense_round_trip(seed, batch_size, shape):
    gen = torch.Generator().manual_seed(seed)
    coords = _coords(gen, batch_size, shape, occupancy=0.5)
    feats = torch.randn(coords.shape[0], 2, generator=gen, dtype=DTYPE)
    x = SparseTensor(feats, coords, shape, batch_size=batch_size)
    occupancy = torch.zeros((batch_size, *shape), dtype=torch.bool)
    occupancy[tuple(coords.long().t())] = True
    y = SparseTensor.from_dense(x.dense(), mask=occupancy)
    order = sorted(range(coords.shape[0]), key=lambda i: tuple(coords[i].tolist()))
    torch.testing.assert_close(y.coords, coords[order], rtol=0, atol=0)
    torch.testing.assert_close(y.features, feats[order], rtol=0, atol=0)
    torch.testing.assert_close(y.dense(), x.dense(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- cat and +
def test_cat_same_sites():
    x = _tensor(seed=11)
    y = x.replace_feature(torch.randn(x.num_voxels, 5, dtype=DTYPE))
    out = sparseconv.cat([x, y])
    assert out.coordinate_set is x.coordinate_set
    torch.testing.assert_close(out.features, torch.cat([x.features, y.features], 1), rtol=0, atol=0)
    # Equal sites held by a different coordinate set are accepted too.
    z = SparseTensor(x.features * 2, x.coords.clone(), x.spatial_shape, batch_size=x.batch_size)
    out = sparseconv.cat((x, z))
    torch.testing.assert_close(out.features, torch.cat([x.features, z.features], 1), rtol=0, atol=0)


def test_cat_different_sites_raises():
    x = _tensor(seed=12)
    other = _tensor(seed=13)
    assert not torch.equal(x.coords, other.coords) or x.num_voxels != other.num_voxels
    with pytest.raises(ValueError):
        sparseconv.cat([x, other])
    # Same rows but another grid.
    bigger = SparseTensor(x.features, x.coords, tuple(s + 1 for s in x.spatial_shape), batch_size=x.batch_size)
    with pytest.raises(ValueError):
        sparseconv.cat([x, bigger])
    # Same sites in another row order are different rows: rejected as well.
    perm = torch.arange(x.num_voxels - 1, -1, -1)
    flipped = SparseTensor(x.features[perm], x.coords[perm], x.spatial_shape, batch_size=x.batch_size)
    with pytest.raises(ValueError):
        sparseconv.cat([x, flipped])
    with pytest.raises(ValueError):
        sparseconv.cat([])
    with pytest.raises(TypeError):
        sparseconv.cat([x, x.features])


def test_add_same_sites():
    x = _tensor(seed=14)
    y = x.replace_feature(torch.randn(x.num_voxels, x.num_channels, dtype=DTYPE))
    s = x + y
    assert s.coordinate_set is x.coordinate_set
    torch.testing.assert_close(s.features, x.features + y.features, rtol=0, atol=0)
    torch.testing.assert_close((x + 1.5).features, x.features + 1.5, rtol=0, atol=0)
    torch.testing.assert_close((1.5 + x).features, x.features + 1.5, rtol=0, atol=0)
    with pytest.raises(ValueError):
        x + _tensor(seed=15)


def test_repr():
    x = _tensor(seed=16, batch_size=2, shape=(4, 5, 3), channels=3, stride=(1, 2, 2))
    r = repr(x)
    assert r.startswith("SparseTensor(")
    for part in (f"num_voxels={x.coords.shape[0]}", f"channels={x.features.shape[1]}",
                 f"spatial_shape={x.spatial_shape}", f"stride={x.stride}", f"batch_size={x.batch_size}",
                 f"dtype={x.features.dtype}", f"device={x.features.device}"):
        assert part in r, (part, r)


def test_pickle_round_trip_keeps_data_and_geometry():
    import pickle

    import sparseconv as sc

    x, _ = sc.voxelize(torch.rand(200, 4) * 5, (0.5, 0.5, 0.5), (0, 0, 0, 5, 5, 5))
    y = pickle.loads(pickle.dumps(x))
    assert torch.equal(y.coords, x.coords) and torch.equal(y.features, x.features)
    assert (y.spatial_shape, y.stride, y.batch_size, y.geometry) == (x.spatial_shape, x.stride, x.batch_size,
                                                                      x.geometry)
    conv = sc.nn.SubMConv3d(4, 3)
    torch.testing.assert_close(conv(y).features, conv(x).features)
