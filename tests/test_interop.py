"""spconv 2.x interoperability: tensor conversion, weight conversion, per-layer and network parity.

spconv (``ConvAlgo.Native``, the only algorithm of its CPU build) is the oracle for the layer
tests.  Its CPU convolutions race when OpenMP runs more than one thread (see
``test_spconv_default_algo_race``), so every spconv call used as an oracle runs under
``torch.set_num_threads(1)``: spconv's OpenMP regions share torch's libgomp thread setting.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

spconv = pytest.importorskip("spconv.pytorch")

import sparseconv  # noqa: E402
import sparseconv.nn as scn  # noqa: E402
from sparseconv.interop import (  # noqa: E402
    convert_spconv_weight,
    convert_to_spconv_weight,
    from_spconv,
    load_spconv_state_dict,
    to_spconv,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # spconv's dense()

NATIVE = spconv.ConvAlgo.Native
ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def serial(fn, *args):
    """Runs a spconv call with one OpenMP thread (its CPU scatter-add races otherwise)."""
    with threads(1), torch.no_grad():
        return fn(*args)


def rev(v):
    """(z, y, x) <-> (x, y, z) for per-axis layer arguments."""
    return tuple(reversed(v)) if isinstance(v, (tuple, list)) else v


def random_tensor(seed, shape=(10, 9, 8), batch_size=2, occupancy=0.3, channels=4, nonneg=False):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand((batch_size, *shape), generator=g) < occupancy
    coords = occ.nonzero().int()
    coords = coords[torch.randperm(coords.shape[0], generator=g)].contiguous()  # unsorted rows
    feats = torch.randn(coords.shape[0], channels, generator=g)
    if nonneg:
        feats = feats.abs()
    return sparseconv.SparseTensor(feats, coords, shape, batch_size=batch_size)


def sorted_sites(t: sparseconv.SparseTensor):
    """(coords, feats) sorted by (batch, x, y, z)."""
    c = t.coords.long()
    key = ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]
    order = torch.argsort(key)
    return t.coords[order], t.features[order]


def assert_same_sparse(ours: sparseconv.SparseTensor, theirs, atol=ATOL):
    """Our output equals spconv's after reordering spconv's coordinates and sorting both by site."""
    theirs = from_spconv(theirs)
    assert ours.spatial_shape == theirs.spatial_shape
    assert ours.batch_size == theirs.batch_size
    ca, fa = sorted_sites(ours)
    cb, fb = sorted_sites(theirs)
    assert torch.equal(ca, cb), f"sites differ: {ca.shape[0]} vs {cb.shape[0]} voxels"
    torch.testing.assert_close(fa, fb, atol=atol, rtol=1e-4)


def copy_params(theirs, ours, **kw):
    with torch.no_grad():
        ours.weight.copy_(convert_spconv_weight(theirs.weight.detach(), **kw))
        if theirs.bias is not None:
            ours.bias.copy_(theirs.bias.detach())


def dense_subm_reference(x: sparseconv.SparseTensor, w_krsc: torch.Tensor) -> torch.Tensor:
    """Dense conv3d in spconv's (z, y, x) frame with a KRSC weight, read at x's sites (float64)."""
    b, (X, Y, Z) = x.batch_size, x.spatial_shape
    c = x.coords.long()
    grid = torch.zeros(b, x.num_channels, Z, Y, X, dtype=torch.float64)
    grid[c[:, 0], :, c[:, 3], c[:, 2], c[:, 1]] = x.features.double()
    w = w_krsc.double().permute(0, 4, 1, 2, 3)  # [C_out, C_in, kz, ky, kx]
    out = F.conv3d(grid, w, padding=[k // 2 for k in w.shape[2:]])
    return out[c[:, 0], :, c[:, 3], c[:, 2], c[:, 1]]


# ----------------------------------------------------------------------------- tensors
def test_round_trip_and_coordinate_order():
    x = random_tensor(0, shape=(7, 5, 3))
    s = to_spconv(x)
    assert isinstance(s, spconv.SparseConvTensor)
    assert list(s.spatial_shape) == [3, 5, 7]
    assert s.batch_size == x.batch_size
    assert s.indices.dtype == torch.int32 and s.indices.is_contiguous()
    # indices are (batch, z, y, x)
    assert torch.equal(s.indices[:, 0], x.coords[:, 0])
    assert torch.equal(s.indices[:, 1], x.coords[:, 3])
    assert torch.equal(s.indices[:, 2], x.coords[:, 2])
    assert torch.equal(s.indices[:, 3], x.coords[:, 1])
    assert s.features.data_ptr() == x.features.data_ptr()  # no copy
    # spconv's dense grid is ours with the spatial axes reversed
    torch.testing.assert_close(s.dense(), x.dense().permute(0, 1, 4, 3, 2))

    y = from_spconv(s)
    assert y.spatial_shape == x.spatial_shape and y.batch_size == x.batch_size
    assert torch.equal(y.coords, x.coords)
    assert y.features.data_ptr() == x.features.data_ptr()
    assert y.stride == (1, 1, 1)
    assert from_spconv(s, stride=(2, 2, 1)).stride == (2, 2, 1)


def test_round_trip_keeps_empty_batch_elements():
    coords = torch.tensor([[0, 1, 2, 3], [0, 4, 0, 1]], dtype=torch.int32)
    x = sparseconv.SparseTensor(torch.randn(2, 3), coords, (5, 3, 4), batch_size=3)
    y = from_spconv(to_spconv(x))
    assert y.batch_size == 3 and y.spatial_shape == (5, 3, 4)
    torch.testing.assert_close(y.dense(), x.dense())


def test_from_spconv_rejects_other_types():
    with pytest.raises(TypeError, match="SparseConvTensor"):
        from_spconv(random_tensor(1))
    with pytest.raises(TypeError, match="SparseTensor"):
        to_spconv(to_spconv(random_tensor(1)))


def test_to_spconv_makes_noncontiguous_coords_contiguous():
    # torch.nonzero() returns a column-major tensor; spconv's CPU index generation silently reads such
    # an index buffer as if it were row-major.  to_spconv must always hand spconv contiguous indices.
    occ = torch.zeros(1, 6, 5, 4, dtype=torch.bool)
    occ[0, 1:4, 1:3, 0:3] = True
    coords = occ.nonzero().int()
    x = sparseconv.SparseTensor(torch.randn(coords.shape[0], 2), coords, (6, 5, 4))
    assert to_spconv(x).indices.is_contiguous()


def test_spconv_reads_noncontiguous_indices_wrongly():
    """Documents a spconv hazard that to_spconv avoids: a column-major index tensor (what
    ``mask.nonzero().int()`` returns) gives wrong SubMConv3d results, with no error."""
    x = random_tensor(3, shape=(6, 5, 4), batch_size=1, occupancy=0.5)
    conv = spconv.SubMConv3d(4, 3, 3, bias=False, algo=NATIVE)
    idx = to_spconv(x).indices
    col_major = idx.t().contiguous().t()
    assert torch.equal(col_major, idx) and not col_major.is_contiguous()
    good = serial(conv, spconv.SparseConvTensor(x.features, idx, [4, 5, 6], 1)).features
    bad = serial(conv, spconv.SparseConvTensor(x.features, col_major, [4, 5, 6], 1)).features
    ref = dense_subm_reference(x, conv.weight.detach())
    torch.testing.assert_close(good.double(), ref, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(bad.double(), ref, atol=ATOL), "spconv now handles non-contiguous indices"


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("ks", [(3, 3, 3), (3, 1, 5), (1, 3, 5)])
def test_krsc_weight_is_conv3d_in_spconv_frame(ks):
    """Independent of spconv's kernels: convert_spconv_weight(w) used by our SubMConv3d equals dense
    conv3d with weight w.permute(0, 4, 1, 2, 3) on the (z, y, x) grid (spconv's definition, checked
    against spconv itself in the parity tests)."""
    x = random_tensor(4, shape=(7, 6, 5))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, *ks, 4, generator=g)  # KRSC, (kz, ky, kx)
    conv = scn.SubMConv3d(4, 3, rev(ks), bias=False)
    with torch.no_grad():
        conv.weight.copy_(convert_spconv_weight(w))
    torch.testing.assert_close(conv(x).features.double(), dense_subm_reference(x, w), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("ks", [(3, 3, 3), (3, 1, 5), (1, 2, 4), (1, 1, 1)])
@pytest.mark.parametrize("layout", ["KRSC", "RSCK"])
def test_weight_conversion_round_trip(ks, layout):
    g = torch.Generator().manual_seed(6)
    ours = torch.randn(ks[0] * ks[1] * ks[2], 5, 7, generator=g)
    theirs = convert_to_spconv_weight(ours, ks, layout)
    expected = (7, *rev(ks), 5) if layout == "KRSC" else (*rev(ks), 5, 7)
    assert tuple(theirs.shape) == expected
    assert torch.equal(convert_spconv_weight(theirs, layout), ours)
    if ks == (1, 1, 1):
        assert torch.equal(convert_spconv_weight(convert_to_spconv_weight(ours, ks, layout, pointwise=False),
                                                 layout, pointwise=False), ours)


def test_rsck_layout_matches_spconv_loader_permutation():
    # spconv's SPCONV_SAVED_WEIGHT_LAYOUT=RSCK loader turns [k0, k1, k2, C_in, C_out] into KRSC with
    # permute(4, 0, 1, 2, 3) (spconv/pytorch/conv.py, _load_weight_different_layout).
    g = torch.Generator().manual_seed(7)
    rsck = torch.randn(3, 1, 5, 4, 6, generator=g)
    krsc = rsck.permute(4, 0, 1, 2, 3).contiguous()
    assert torch.equal(convert_spconv_weight(rsck, "RSCK"), convert_spconv_weight(krsc, "KRSC"))


def test_weight_conversion_errors():
    with pytest.raises(ValueError, match="layout"):
        convert_spconv_weight(torch.zeros(2, 3, 3, 3, 2), "HWIO")
    with pytest.raises(ValueError, match="5-D"):
        convert_spconv_weight(torch.zeros(27, 2, 2))
    with pytest.raises(ValueError, match="pointwise"):
        convert_spconv_weight(torch.zeros(2, 3, 3, 3, 2), pointwise=True)
    with pytest.raises(ValueError, match="kernel_size"):
        convert_to_spconv_weight(torch.zeros(27, 2, 2), (3, 3, 1))


# ----------------------------------------------------------------------------- per-layer parity
@pytest.mark.parametrize("ks", [3, (3, 1, 5), (1, 3, 3), 1])  # spconv order (z, y, x)
def test_subm_conv_parity(ks):
    x = random_tensor(10)
    theirs = spconv.SubMConv3d(4, 6, ks, algo=NATIVE)
    ours = scn.SubMConv3d(4, 6, rev(ks))
    copy_params(theirs, ours)
    assert_same_sparse(ours(x), serial(theirs, to_spconv(x)))


@pytest.mark.parametrize(
    "ks,stride,padding",
    [
        (3, 2, 1),
        ((3, 1, 1), (2, 1, 1), 0),  # OpenPCDet's last encoder layer (spconv order)
        ((3, 2, 1), (2, 1, 2), (1, 0, 1)),
        (2, 2, 0),
        (3, 1, 0),
    ],
)
def test_sparse_conv_parity(ks, stride, padding):
    x = random_tensor(11)
    theirs = spconv.SparseConv3d(4, 6, ks, stride=stride, padding=padding, algo=NATIVE)
    ours = scn.SparseConv3d(4, 6, rev(ks), stride=rev(stride), padding=rev(padding))
    copy_params(theirs, ours)
    assert_same_sparse(ours(x), serial(theirs, to_spconv(x)))


def test_pointwise_layers_use_spconv_1x1_semantics():
    # spconv runs 1x1x1 stride-1 convs as features @ w.view(C_in, C_out) but a 1x1x1 stride-2 conv
    # with the general KRSC formula.
    x = random_tensor(12)
    theirs = spconv.SparseConv3d(4, 6, 1, stride=1, algo=NATIVE)
    ours = scn.SparseConv3d(4, 6, 1)
    copy_params(theirs, ours)  # pointwise=None -> kernel volume 1 -> pointwise
    assert_same_sparse(ours(x), serial(theirs, to_spconv(x)))

    theirs = spconv.SparseConv3d(4, 6, 1, stride=2, algo=NATIVE)
    ours = scn.SparseConv3d(4, 6, 1, stride=2)
    copy_params(theirs, ours, pointwise=False)
    assert_same_sparse(ours(x), serial(theirs, to_spconv(x)))
    # and the two readings of a 1x1 KRSC buffer really differ (C_in != C_out)
    w = theirs.weight.detach()
    assert not torch.equal(convert_spconv_weight(w, pointwise=True), convert_spconv_weight(w, pointwise=False))


@pytest.mark.parametrize("ks,stride,padding", [(3, 2, 1), ((3, 1, 1), (2, 1, 1), 0), (2, 2, 0)])
def test_inverse_conv_parity(ks, stride, padding):
    x = random_tensor(13)
    t_down = spconv.SparseConv3d(4, 6, ks, stride=stride, padding=padding, indice_key="d", algo=NATIVE)
    t_up = spconv.SparseInverseConv3d(6, 5, ks, indice_key="d", algo=NATIVE)
    o_down = scn.SparseConv3d(4, 6, rev(ks), stride=rev(stride), padding=rev(padding), indice_key="d")
    o_up = scn.SparseInverseConv3d(6, 5, rev(ks), indice_key="d")
    copy_params(t_down, o_down)
    copy_params(t_up, o_up)
    y_ours = o_up(o_down(x))
    y_theirs = serial(lambda s: t_up(t_down(s)), to_spconv(x))
    assert_same_sparse(y_ours, y_theirs)
    assert torch.equal(sorted_sites(y_ours)[0], sorted_sites(x)[0])  # the input sites are restored


@pytest.mark.parametrize("ks,stride,padding", [(3, 2, 1), (2, 2, 0), ((3, 1, 2), (2, 1, 1), (1, 0, 0))])
def test_conv_transpose_parity(ks, stride, padding):
    x = random_tensor(14, shape=(6, 5, 4))
    theirs = spconv.SparseConvTranspose3d(4, 3, ks, stride=stride, padding=padding, algo=NATIVE)
    ours = scn.SparseConvTranspose3d(4, 3, rev(ks), stride=rev(stride), padding=rev(padding))
    copy_params(theirs, ours)
    assert_same_sparse(ours(x), serial(theirs, to_spconv(x)))


@pytest.mark.parametrize("ks,stride,padding", [(2, 2, 0), (3, 2, 1), ((3, 1, 2), (2, 1, 2), (1, 0, 0))])
def test_max_pool_parity(ks, stride, padding):
    x = random_tensor(15, nonneg=True)  # spconv's max pool starts from 0 (see below)
    theirs = spconv.SparseMaxPool3d(ks, stride, padding, algo=NATIVE)
    ours = scn.SparseMaxPool3d(rev(ks), rev(stride), rev(padding))
    assert_same_sparse(ours(x), serial(theirs, to_spconv(x)))


def test_spconv_max_pool_clamps_at_zero():
    """Documented difference: spconv's max pool returns max(0, max of the active inputs)."""
    x = random_tensor(16)
    ours = scn.SparseMaxPool3d(2)(x)
    theirs = from_spconv(serial(spconv.SparseMaxPool3d(2, 2, algo=NATIVE), to_spconv(x)))
    ca, fa = sorted_sites(ours)
    cb, fb = sorted_sites(theirs)
    assert torch.equal(ca, cb)
    assert (fa < 0).any()
    torch.testing.assert_close(fb, fa.clamp_min(0))


# ----------------------------------------------------------------------------- networks
def lidar_like_batch(seed: int, batch_size: int = 2, shape=(100, 100, 20), channels: int = 4):
    """Ground plane plus a few box-shaped objects, voxelized with numpy.unique (coords (b, x, y, z))."""
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    all_coords, all_feats = [], []
    for b in range(batch_size):
        n_ground = 6000
        ground = np.stack([rng.uniform(0, X, n_ground), rng.uniform(0, Y, n_ground),
                           2.0 + 0.03 * rng.uniform(0, X, n_ground) + rng.normal(0, 0.3, n_ground)], 1)
        boxes = []
        for _ in range(6):
            cx, cy = rng.uniform(10, X - 10), rng.uniform(10, Y - 10)
            lx, ly, lz = rng.uniform(3, 8), rng.uniform(2, 4), rng.uniform(2, 6)
            n = 400
            face = rng.integers(0, 3, n)
            p = rng.uniform(-0.5, 0.5, (n, 3)) * (lx, ly, lz)
            p[face == 0, 0] = np.sign(p[face == 0, 0]) * lx / 2  # side walls
            p[face == 1, 1] = np.sign(p[face == 1, 1]) * ly / 2
            p[face == 2, 2] = lz / 2  # roof
            boxes.append(p + (cx, cy, 3.0 + lz / 2))
        pts = np.concatenate([ground, *boxes])
        vox = np.floor(pts).astype(np.int64)
        keep = np.all((vox >= 0) & (vox < np.array(shape)), axis=1)
        vox, pts = vox[keep], pts[keep]
        uniq, inv = np.unique(vox, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        mean = np.zeros((uniq.shape[0], 3))
        np.add.at(mean, inv, pts)
        mean /= np.bincount(inv, minlength=uniq.shape[0])[:, None]
        feats = np.concatenate([mean - uniq, rng.uniform(0, 1, (uniq.shape[0], channels - 3))], 1)
        all_coords.append(np.concatenate([np.full((uniq.shape[0], 1), b), uniq], 1))
        all_feats.append(feats)
    coords = torch.from_numpy(np.concatenate(all_coords)).int()
    feats = torch.from_numpy(np.concatenate(all_feats)).float()
    return sparseconv.SparseTensor(feats, coords, shape, batch_size=batch_size)


class SpconvNet(torch.nn.Module):
    """A small OpenPCDet-style encoder/decoder; all per-axis arguments in spconv's (z, y, x) order."""

    def __init__(self, c_in=4):
        super().__init__()
        bn = lambda c: torch.nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)  # noqa: E731
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(c_in, 16, 3, padding=1, bias=False, indice_key="subm1", algo=NATIVE),
            bn(16), torch.nn.ReLU())
        self.conv1 = spconv.SparseSequential(
            spconv.SubMConv3d(16, 16, (3, 1, 3), bias=False, indice_key="subm1a", algo=NATIVE),
            bn(16), torch.nn.ReLU())
        self.down = spconv.SparseSequential(
            spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False, indice_key="spconv2", algo=NATIVE),
            bn(32), torch.nn.ReLU())
        self.conv2 = spconv.SparseSequential(
            spconv.SubMConv3d(32, 32, 3, padding=1, bias=False, indice_key="subm2", algo=NATIVE),
            bn(32), torch.nn.ReLU())
        self.up = spconv.SparseSequential(
            spconv.SparseInverseConv3d(32, 16, 3, indice_key="spconv2", bias=False, algo=NATIVE),
            bn(16), torch.nn.ReLU())
        self.head = spconv.SubMConv3d(16, 8, 1, algo=NATIVE)  # pointwise: spconv's 1x1 path
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(32, 24, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, algo=NATIVE),
            bn(24), torch.nn.ReLU())

    def forward(self, x):
        x = self.conv1(self.conv_input(x))
        d = self.conv2(self.down(x))
        return self.head(self.up(d)), self.conv_out(d)


class OurNet(torch.nn.Module):
    """SpconvNet with our layers: same module names, per-axis arguments reversed to (x, y, z)."""

    def __init__(self, c_in=4):
        super().__init__()
        self.conv_input = scn.SparseSequential(
            scn.SubMConv3d(c_in, 16, 3, bias=False), scn.BatchNorm(16, eps=1e-3, momentum=0.01), scn.ReLU())
        self.conv1 = scn.SparseSequential(
            scn.SubMConv3d(16, 16, (3, 1, 3), bias=False), torch.nn.BatchNorm1d(16, eps=1e-3), torch.nn.ReLU())
        self.down = scn.SparseSequential(
            scn.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False, indice_key="spconv2"),
            scn.BatchNorm(32, eps=1e-3), scn.ReLU())
        self.conv2 = scn.SparseSequential(
            scn.SubMConv3d(32, 32, 3, bias=False), scn.BatchNorm(32, eps=1e-3), scn.ReLU())
        self.up = scn.SparseSequential(
            scn.SparseInverseConv3d(32, 16, 3, indice_key="spconv2", bias=False), scn.BatchNorm(16, eps=1e-3),
            scn.ReLU())
        self.head = scn.SubMConv3d(16, 8, 1)
        self.conv_out = scn.SparseSequential(
            scn.SparseConv3d(32, 24, (1, 1, 3), stride=(1, 1, 2), padding=0, bias=False),
            scn.BatchNorm(24, eps=1e-3), scn.ReLU())

    def forward(self, x):
        x = self.conv1(self.conv_input(x))
        d = self.conv2(self.down(x))
        return self.head(self.up(d)), self.conv_out(d)


def _randomize_bn(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)


def test_network_parity_with_loaded_spconv_checkpoint():
    torch.manual_seed(20)
    theirs = SpconvNet().eval()
    _randomize_bn(theirs, 21)
    ours = OurNet().eval()
    result = load_spconv_state_dict(ours, theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert int(ours.conv_input[1].num_batches_tracked) == 7

    x = lidar_like_batch(22)
    assert 2000 < x.num_voxels < 20000 and x.batch_size == 2
    with torch.no_grad():
        fine_ours, coarse_ours = ours(x)
    fine_theirs, coarse_theirs = serial(theirs, to_spconv(x))
    assert fine_ours.spatial_shape == (100, 100, 20) and coarse_ours.spatial_shape == (50, 50, 4)
    assert_same_sparse(fine_ours, fine_theirs, atol=2e-4)
    assert_same_sparse(coarse_ours, coarse_theirs, atol=2e-4)
    assert coarse_ours.features.abs().max() > 0.1  # not a vacuous comparison


def test_load_spconv_state_dict_round_trip_through_our_weights():
    # ours -> spconv via convert_to_spconv_weight, then back via load_spconv_state_dict: identical weights
    torch.manual_seed(23)
    ours = OurNet()
    sd = ours.state_dict()
    for name, m in ours.named_modules():
        if isinstance(m, (scn.SubMConv3d, scn.SparseConv3d, scn.SparseInverseConv3d)):
            sd[f"{name}.weight"] = convert_to_spconv_weight(m.weight.detach(), m.kernel_size,
                                                            pointwise=m.weight.shape[0] == 1)
    other = OurNet()
    load_spconv_state_dict(other, sd)
    for key, value in ours.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_load_spconv_state_dict_drops_spconv_only_buffers():
    theirs = spconv.SparseSequential(spconv.SparseConv3d(2, 3, 3, stride=2, record_voxel_count=True, algo=NATIVE))
    assert "0.max_num_voxels_during_training" in theirs.state_dict()
    ours = scn.SparseSequential(scn.SparseConv3d(2, 3, 3, stride=2))
    result = load_spconv_state_dict(ours, theirs.state_dict())
    assert not result.unexpected_keys and not result.missing_keys
    torch.testing.assert_close(ours[0].weight, convert_spconv_weight(theirs[0].weight.detach()))


def test_load_spconv_state_dict_errors():
    theirs = spconv.SparseSequential(spconv.SubMConv3d(4, 8, (3, 1, 5), algo=NATIVE), torch.nn.BatchNorm1d(8))
    sd = theirs.state_dict()
    # kernel not reversed to (x, y, z)
    wrong_axes = scn.SparseSequential(scn.SubMConv3d(4, 8, (3, 1, 5)), torch.nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match=r"0\.weight.*reversed"):
        load_spconv_state_dict(wrong_axes, sd)
    # channel mismatch
    wrong_channels = scn.SparseSequential(scn.SubMConv3d(4, 6, (5, 1, 3)), torch.nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match=r"0\.weight"):
        load_spconv_state_dict(wrong_channels, sd)
    # a non-conv tensor with the wrong shape
    wrong_bn = scn.SparseSequential(scn.SubMConv3d(4, 8, (5, 1, 3)), torch.nn.BatchNorm1d(8))
    bad = dict(sd)
    bad["1.running_mean"] = torch.zeros(9)
    with pytest.raises(ValueError, match=r"1\.running_mean"):
        load_spconv_state_dict(wrong_bn, bad)
    # a weight that is already in our layout
    bad = dict(sd)
    bad["0.weight"] = torch.zeros(15, 4, 8)
    with pytest.raises(ValueError, match=r"0\.weight.*5-D"):
        load_spconv_state_dict(wrong_bn, bad)
    # missing / unexpected keys: strict raises, non-strict reports
    partial = {k: v for k, v in sd.items() if not k.startswith("1.")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_spconv_state_dict(wrong_bn, partial)
    result = load_spconv_state_dict(wrong_bn, partial, strict=False)
    assert "1.running_mean" in result.missing_keys and result.unexpected_keys == ["extra.weight"]
    torch.testing.assert_close(wrong_bn[0].weight, convert_spconv_weight(sd["0.weight"]))


# ----------------------------------------------------------------------------- spconv's CPU race
def test_spconv_default_algo_race():
    """spconv 2.3.8 CPU SubMConv3d (default algorithm = Native on the CPU build) vs dense conv3d on
    seeded random 9x8x7 grids at 30% occupancy, with at least 2 OpenMP threads.

    Cause (spconv/csrc/sparse/gather.py, GatherCPU::scatter_add): the per-row pointers ``buf`` and
    ``out_ptr`` are declared outside the OpenMP-parallel lambda and captured by reference, so threads
    overwrite each other's destination row.  Every Native CPU convolution (and its backward) goes
    through it; results are wrong at random, only with more than one thread.  Ours must match dense
    on every grid; how many grids spconv gets wrong (in any of ``calls`` calls) is recorded: it varies
    from run to run.
    """
    n_grids, calls = 40, 3
    torch.manual_seed(30)
    theirs = spconv.SubMConv3d(16, 16, 3, bias=False)  # default algorithm
    assert theirs.algo == NATIVE  # CPU-only build: Native is the default
    ours = scn.SubMConv3d(16, 16, 3, bias=False)
    copy_params(theirs, ours)
    wrong = []
    with threads(max(2, torch.get_num_threads())), torch.no_grad():
        for seed in range(n_grids):
            x = random_tensor(100 + seed, shape=(9, 8, 7), batch_size=2, channels=16)
            ref = dense_subm_reference(x, theirs.weight.detach())
            torch.testing.assert_close(ours(x).features.double(), ref, atol=ATOL, rtol=1e-4)
            s = to_spconv(x)
            for _ in range(calls):
                y = theirs(s)
                assert torch.equal(y.indices, s.indices)  # sites are right; only the values go wrong
                if not torch.allclose(y.features.double(), ref, atol=ATOL, rtol=1e-4):
                    wrong.append(seed)
                    break
    # the same calls with one thread are right: the error is the race, not the layer definition
    for seed in wrong:
        x = random_tensor(100 + seed, shape=(9, 8, 7), batch_size=2, channels=16)
        again = serial(theirs, to_spconv(x)).features
        torch.testing.assert_close(again.double(), dense_subm_reference(x, theirs.weight.detach()),
                                   atol=ATOL, rtol=1e-4)
    print(f"spconv default-algo SubMConv3d wrong on {len(wrong)}/{n_grids} grids: {wrong}")
    if not wrong:
        pytest.xfail(f"spconv's CPU scatter-add race did not show up on {n_grids} grids x {calls} calls in this "
                     "run (it needs >1 OpenMP thread and is timing-dependent)")
    warnings.warn(f"documented spconv bug: default-algo CPU SubMConv3d gave wrong results on {len(wrong)} of "
                  f"{n_grids} random 9x8x7 grids (OpenMP race in GatherCPU::scatter_add)", UserWarning)
