"""VFEs, 3D sparse backbones and the BEV neck of the reference detectors (models/vfe.py, backbones3d.py,
backbones2d.py): shapes and strides against NumPy site references, dense-conv references, invariances,
gradients, registry and argument errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparseconv as sc
import sparseconv.models as M
from sparseconv import SparseTensor
from sparseconv.voxelize import grid_shape, voxelize_padded

torch.set_num_threads(1)

BACKBONES = ["voxel_backbone8x", "voxel_res_backbone8x", "voxel_backbone8x_attn"]
KITTI_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)


def _scan(grid, n, batch_size=2, channels=4, seed=0, dtype=torch.float32):
    """About ``n`` random distinct voxels on the voxel grid ``grid`` (what collate gives)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.stack([torch.randint(0, batch_size, (n,), generator=g)] +
                    [torch.randint(0, s, (n,), generator=g) for s in grid], 1)
    c = torch.unique(c, dim=0).int()
    return SparseTensor(torch.randn(c.shape[0], channels, generator=g, dtype=dtype), c, grid, batch_size=batch_size)


def _strided_sites(coords: np.ndarray, shape, k, s, p):
    """Brute-force output sites of a dense conv (kernel k, stride s, padding p per axis) fed by ``coords``:
    ``o`` is active iff some active ``i`` has ``i = o * s - p + j`` with ``0 <= j < k``.  Returns
    ``(set of (b, x, y, z), out_shape)``."""
    out_shape = tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(shape, k, s, p))
    sites = set()
    for row in coords.tolist():
        b, i = row[0], row[1:]
        cands = []
        for a in range(3):
            cands.append([(i[a] + p[a] - j) // s[a] for j in range(k[a])
                          if (i[a] + p[a] - j) % s[a] == 0 and 0 <= (i[a] + p[a] - j) // s[a] < out_shape[a]])
        for o in itertools.product(*cands):
            sites.add((b, *o))
    return sites, out_shape


def _site_set(x: SparseTensor):
    return set(map(tuple, x.coords.tolist()))


def _expected_stages(coords, grid, last_pad_z):
    """Sites and grids of x_conv1..x_conv4 and encoded by the documented geometry (module docstring)."""
    shape = (grid[0], grid[1], grid[2] + 1)
    sites = set(map(tuple, coords.tolist()))
    out = {"x_conv1": (sites, shape)}
    for name in ("x_conv2", "x_conv3", "x_conv4"):
        pz = 1
        if name == "x_conv4":
            pz = 0 if shape[2] >= 3 else 1
        sites, shape = _strided_sites(np.array(sorted(sites)), shape, (3, 3, 3), (2, 2, 2), (1, 1, pz))
        out[name] = (sites, shape)
    out["encoded"] = _strided_sites(np.array(sorted(sites)), shape, (1, 1, 3), (1, 1, 2), (0, 0, last_pad_z))
    return out


# --------------------------------------------------------------------------- registry
def test_registry_has_every_name_and_builds_it():
    names = set(M.list_models())
    expected = {"mean_vfe": M.MeanVFE, "pointnet_vfe": M.PointNetVFE, "voxel_backbone8x": M.VoxelBackBone8x,
                "voxel_res_backbone8x": M.VoxelResBackBone8x, "voxel_backbone8x_attn": M.VoxelBackBone8xAttn,
                "base_bev_backbone": M.BaseBEVBackbone}
    assert set(expected) <= names
    kwargs = {"voxel_backbone8x": dict(input_channels=4, grid_size=(16, 16, 8)),
              "voxel_res_backbone8x": dict(input_channels=4, grid_size=(16, 16, 8)),
              "voxel_backbone8x_attn": dict(input_channels=4, grid_size=(16, 16, 8)),
              "base_bev_backbone": dict(input_channels=8)}
    for name, cls in expected.items():
        assert type(M.create_model(name, **kwargs.get(name, {}))) is cls
    assert M.list_models("voxel_*") == ["voxel_backbone8x", "voxel_backbone8x_attn", "voxel_res_backbone8x"]


# --------------------------------------------------------------------------- 3D backbones
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("grid", [(24, 20, 20), (21, 19, 40)])
def test_backbone_forward_backward_shapes_and_sites(name, grid):
    net = M.create_model(name, input_channels=4, grid_size=grid)
    x = _scan(grid, 700, seed=len(name) + grid[2])
    out = net(x)
    enc, ms = out["encoded"], out["multi_scale"]
    z_out = 1 if grid[2] == 20 else 2  # Z = 20: z4 = 2, automatic conv_out z padding 1; Z = 40: OpenPCDet's 5 -> 2
    expected = _expected_stages(x.coords.numpy(), grid, 1 if grid[2] == 20 else 0)
    strides = {"x_conv1": (1, 1, 1), "x_conv2": (2, 2, 2), "x_conv3": (4, 4, 4), "x_conv4": (8, 8, 8),
               "encoded": (8, 8, 16)}
    for key, t in [*ms.items(), ("encoded", enc)]:
        sites, shape = expected[key]
        assert t.spatial_shape == shape, key
        assert t.stride == strides[key], key
        assert _site_set(t) == sites, key
        assert t.batch_size == 2
        assert t.num_channels == (128 if key == "encoded" else net.backbone_channels[key]), key
    assert net.sparse_shape == (grid[0], grid[1], grid[2] + 1)
    assert enc.spatial_shape == net.out_spatial_shape == ((grid[0] + 7) // 8, (grid[1] + 7) // 8, z_out)
    bev = M.height_compression(enc)
    assert bev.shape == (2, net.num_bev_features, enc.spatial_shape[1], enc.spatial_shape[0])
    assert net.num_bev_features == 128 * z_out
    # Backward: every parameter receives a non-zero gradient.
    w = torch.randn(bev.shape, generator=torch.Generator().manual_seed(1))
    (bev * w).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_accepts_coarse_kitti_grid(name):
    grid = grid_shape((0.2, 0.2, 0.2), KITTI_RANGE)
    assert grid == (352, 400, 20)
    net = M.create_model(name, input_channels=4, grid_size=grid).eval()
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(600, 4, generator=g) * torch.tensor([70.4, 80.0, 4.0, 1.0]) + torch.tensor([0.0, -40.0, -3.0, 0.0])
    batch = torch.arange(600) % 2
    x = sc.voxelize(pts, (0.2, 0.2, 0.2), KITTI_RANGE, batch=batch, batch_size=2).tensor  # collate's voxels
    with torch.no_grad():
        enc = net(x)["encoded"]
    assert enc.spatial_shape == net.out_spatial_shape == (44, 50, 1)
    assert M.height_compression(enc).shape == (2, 128, 50, 44)
    sites, shape = _expected_stages(x.coords.numpy(), grid, 1)["encoded"]
    assert _site_set(enc) == sites and shape == (44, 50, 1)
    # The output carries world geometry: stride-8 voxels of 1.6 m in x and y.
    assert enc.geometry is not None and np.allclose(enc.geometry.voxel_size[:2], (1.6, 1.6))


@pytest.mark.parametrize("z", [1, 2, 3, 4, 5, 6, 8, 11, 20, 40, 41])
def test_out_spatial_shape_matches_forward_for_any_height(z):
    grid = (9, 10, z)
    net = M.VoxelBackBone8x(2, grid).eval()
    x = _scan(grid, 120, batch_size=1, channels=2, seed=z)
    with torch.no_grad():
        enc = net(x)["encoded"]
    assert enc.spatial_shape == net.out_spatial_shape
    assert net.out_spatial_shape[:2] == (2, 2) and net.out_spatial_shape[2] >= 1


def test_last_pad_explicit_and_errors():
    assert M.VoxelBackBone8x(4, (16, 16, 40), last_pad=1).out_spatial_shape == (2, 2, 3)  # (5 + 2 - 3) // 2 + 1
    assert M.VoxelBackBone8x(4, (16, 16, 40), last_pad=0).out_spatial_shape == (2, 2, 2)
    with pytest.raises(ValueError, match="last_pad"):
        M.VoxelBackBone8x(4, (352, 400, 20), last_pad=0)  # conv4 leaves 2 z-sites: kernel 3 cannot fit
    with pytest.raises(ValueError, match="last_pad"):
        M.VoxelResBackBone8x(4, (16, 16, 40), last_pad=-1)


def test_backbone_input_on_either_grid_gives_the_same_output():
    grid = (16, 24, 12)
    torch.manual_seed(0)
    net = M.VoxelResBackBone8x(3, grid).eval()
    x = _scan(grid, 300, channels=3, seed=5)
    x_sparse = SparseTensor(x.features, x.coords, net.sparse_shape, batch_size=2)
    with torch.no_grad():
        a, b = net(x)["encoded"], net(x_sparse)["encoded"]
    assert torch.equal(a.coords, b.coords) and torch.equal(a.features, b.features)
    with pytest.raises(ValueError, match=r"grid_size \(16, 24, 12\)"):
        net(SparseTensor(x.features, x.coords, (16, 24, 14), batch_size=2))
    with pytest.raises(TypeError, match="SparseTensor"):
        net(x.features)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid_size=(16, 16)), "grid_size"), (dict(grid_size=(16, 0, 8)), "grid_size"),
    (dict(grid_size=(16, 16, 8.5)), "grid_size"), (dict(input_channels=0), "input_channels"),
    (dict(input_channels=True), "input_channels")])
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_argument_errors(name, kwargs, match):
    args = dict(input_channels=4, grid_size=(16, 16, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        M.create_model(name, **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ffn_activation="gelu"), "ffn_activation"), (dict(heads=5), "heads"), (dict(n_blocks=-1), "n_blocks"),
    (dict(ffn_k=4), "ffn_k"), (dict(ffn_activation="topk", ffn_k=0), "ffn_k"),
    (dict(ffn_activation="topk", hidden=8, ffn_k=9), "ffn_k"), (dict(window=(8, 8)), "window"),
    (dict(window=0), "window"), (dict(hidden=0), "hidden"), (dict(attn_topk=0), "attn_topk"),
    (dict(max_group=0), "max_group")])
def test_attention_backbone_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.VoxelBackBone8xAttn(4, (16, 16, 8), **kwargs)


# --------------------------------------------------------------------------- residual block
def _dense_subm(x_dense, mask, weight, bias):
    """Submanifold 3^3 conv as dense conv3d (``weight`` in the sparse ``[27, Cin, Cout]`` layout), masked."""
    cin, cout = weight.shape[1:]
    w = weight.reshape(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2)
    out = F.conv3d(x_dense, w, bias, padding=1)
    return out * mask[:, None]


def _dense_bn(x, bn):
    shape = (1, -1, 1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def test_sparse_basic_block_matches_dense_reference():
    g = torch.Generator().manual_seed(7)
    block = M.SparseBasicBlock(6, 6).double().eval()
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
            bn.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    x = _scan((7, 6, 5), 90, batch_size=2, channels=6, seed=11, dtype=torch.float64)
    y = block(x)
    assert torch.equal(y.coords, x.coords)
    dense_x = x.dense()
    mask = (dense_x.abs().sum(1) > 0).to(dense_x.dtype)
    h = torch.relu(_dense_bn(_dense_subm(dense_x, mask, block.conv1.weight, block.conv1.bias), block.bn1)) * mask[:, None]
    h = _dense_bn(_dense_subm(h, mask, block.conv2.weight, block.conv2.bias), block.bn2) * mask[:, None]
    ref = torch.relu(h + dense_x)
    c = x.coords.long()
    torch.testing.assert_close(y.features, ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]])
    assert set(dict(block.named_parameters())) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                                                   "conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"}
    with pytest.raises(ValueError, match="inplanes"):
        M.SparseBasicBlock(4, 8)


def test_res_backbone_with_zeroed_second_convs_is_the_plain_chain():
    """With conv2 of every block zeroed (weights and bias) and identity BN statistics, each block is
    ``relu(0 + x) = x`` (x is a ReLU output), so the network is conv_input -> the three strided blocks -> conv_out."""
    grid = (24, 20, 12)
    torch.manual_seed(2)
    net = M.VoxelResBackBone8x(4, grid).eval()
    blocks = [m for m in net.modules() if isinstance(m, M.SparseBasicBlock)]
    assert len(blocks) == 8
    with torch.no_grad():
        for b in blocks:
            b.conv2.weight.zero_()
            b.conv2.bias.zero_()
    x = _scan(grid, 500, seed=3)
    with torch.no_grad():
        out = net(x)
        ref = SparseTensor(x.features, x.coords, net.sparse_shape, batch_size=2)
        ref = net.conv_input(ref)
        ref1 = ref
        for stage in (net.conv2, net.conv3, net.conv4):
            ref = stage[0](ref)
        ref = net.conv_out(ref)
    assert torch.equal(out["encoded"].coords, ref.coords)
    torch.testing.assert_close(out["encoded"].features, ref.features)
    torch.testing.assert_close(out["multi_scale"]["x_conv1"].features, ref1.features)
    # ... and the blocks do matter once conv2 is not zero.
    with torch.no_grad():
        blocks[0].conv2.weight.normal_()
        assert not torch.allclose(net(x)["encoded"].features, ref.features)


# --------------------------------------------------------------------------- attention backbone
@pytest.mark.parametrize("ffn_activation", ["relu", "topk"])
def test_attention_backbone_preserves_sites_and_reduces_to_plain(ffn_activation):
    grid = (32, 24, 20)
    torch.manual_seed(4)
    attn = M.VoxelBackBone8xAttn(4, grid, n_blocks=3, window=(4, 4, 2), ffn_activation=ffn_activation).eval()
    plain = M.VoxelBackBone8x(4, grid).eval()
    missing, unexpected = plain.load_state_dict(attn.state_dict(), strict=False)
    assert not missing and all(k.startswith("attn_blocks.") for k in unexpected)
    assert [b.attn.shift for b in attn.attn_blocks] == [False, True, False]
    assert all(b.attn.window == (4, 4, 2) and b.ffn.activation == ffn_activation for b in attn.attn_blocks)
    if ffn_activation == "topk":
        assert all(b.ffn.k == 32 for b in attn.attn_blocks)  # hidden // 4
    x = _scan(grid, 800, seed=9)
    with torch.no_grad():
        a, p = attn(x), plain(x)
    for key in ("x_conv1", "x_conv2", "x_conv3", "x_conv4"):
        assert torch.equal(a["multi_scale"][key].coords, p["multi_scale"][key].coords), key
    assert torch.equal(a["encoded"].coords, p["encoded"].coords)
    torch.testing.assert_close(a["multi_scale"]["x_conv3"].features, p["multi_scale"]["x_conv3"].features)
    assert not torch.allclose(a["encoded"].features, p["encoded"].features)  # the blocks change the features
    # With no blocks it is VoxelBackBone8x.
    zero = M.VoxelBackBone8xAttn(4, grid, n_blocks=0).eval()
    zero.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(zero(x)["encoded"].features, p["encoded"].features)


# --------------------------------------------------------------------------- VFEs
def _padded_scan(n=400, max_points=4, seed=0, voxel=(8.0, 8.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 4, generator=g) * torch.tensor([70.4, 80.0, 4.0, 1.0]) + torch.tensor([0.0, -40.0, -3.0, 0.0])
    batch = (torch.arange(n) >= n // 2).long()
    return pts, batch, voxelize_padded(pts, voxel, KITTI_RANGE, max_points, batch=batch, batch_size=2)


def test_mean_vfe_padded_equals_numpy_mean_of_kept_points():
    pts, batch, pv = _padded_scan()
    counts = pv.num_points.numpy()
    assert counts.max() == 4 and (counts < 4).any()  # some voxels capped, some padded
    out = M.MeanVFE(4)(pv)
    p, ptv = pts.numpy(), pv.point_to_voxel.numpy()
    ref = np.stack([p[ptv == v].mean(0) for v in range(len(counts))])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    # Padding rows are never read: garbage in them changes nothing (tensor form of the input).
    junk = pv.voxels.clone()
    pad = torch.arange(junk.shape[1])[None, :] >= pv.num_points[:, None].long()
    junk[pad] = float("nan")
    torch.testing.assert_close(M.MeanVFE(4)(junk, pv.num_points), out)
    # Without a cap, it is the mean voxelization collate uses.
    _, _, full = _padded_scan(max_points=400)
    mean = sc.voxelize(pts, (8.0, 8.0, 1.0), KITTI_RANGE, batch=batch, batch_size=2).tensor
    order = {tuple(c): i for i, c in enumerate(mean.coords.tolist())}
    rows = torch.tensor([order[tuple(c)] for c in full.coords.tolist()])
    torch.testing.assert_close(M.MeanVFE(4)(full), mean.features[rows])


def test_mean_vfe_passes_a_sparse_tensor_through_and_checks_input():
    x = _scan((8, 8, 8), 50)
    vfe = M.create_model("mean_vfe", num_point_features=4)
    assert vfe(x) is x and vfe.get_output_feature_dim() == 4
    assert torch.equal(vfe(torch.zeros(3, 2, 4), torch.tensor([0, 1, 2])), torch.zeros(3, 4))  # empty voxel: 0
    with pytest.raises(ValueError, match="channels"):
        M.MeanVFE(5)(x)
    with pytest.raises(ValueError, match="num_points"):
        vfe(torch.zeros(3, 2, 4), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="num_points"):
        vfe(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="C = 3"):
        vfe(torch.zeros(3, 2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_point_features"):
        M.MeanVFE(0)


def _pointnet_reference(vfe, pv):
    """Per-voxel loop in NumPy (eval mode): augmented features, Linear, BN (running stats), ReLU, max."""
    vs, lo = np.array(vfe.voxel_size), np.array(vfe.point_range[:3])
    params = [(lin.weight.detach().double().numpy(),
               None if lin.bias is None else lin.bias.detach().double().numpy(), bn) for lin, bn in
              zip(vfe.linears, vfe.norms)]
    out = []
    for v in range(pv.voxels.shape[0]):
        n = int(pv.num_points[v])
        p = pv.voxels[v, :n].double().numpy()
        xyz = p[:, :3]
        centre = lo + (pv.coords[v, 1:].numpy() + 0.5) * vs
        f = np.concatenate([p if vfe.use_absolute_xyz else p[:, 3:], xyz - xyz.mean(0), xyz - centre], 1)
        if vfe.with_distance:
            f = np.concatenate([f, np.linalg.norm(xyz, axis=1, keepdims=True)], 1)
        for i, (w, b, bn) in enumerate(params):
            h = f @ w.T + (0 if b is None else b)
            if isinstance(bn, torch.nn.BatchNorm1d):
                h = (h - bn.running_mean.double().numpy()) / np.sqrt(bn.running_var.double().numpy() + bn.eps) \
                    * bn.weight.detach().double().numpy() + bn.bias.detach().double().numpy()
            h = np.maximum(h, 0)
            m = h.max(0)
            f = np.concatenate([h, np.repeat(m[None], n, 0)], 1)
        out.append(m)
    return np.stack(out)


@pytest.mark.parametrize("cfg", [dict(num_filters=(16,)), dict(num_filters=(8, 12), with_distance=True),
                                 dict(num_filters=(10,), use_absolute_xyz=False, use_norm=False)])
def test_pointnet_vfe_matches_per_voxel_reference(cfg):
    voxel = (8.0, 8.0, 1.0)
    _, _, pv = _padded_scan(voxel=voxel, seed=1)
    torch.manual_seed(0)
    vfe = M.PointNetVFE(4, voxel, KITTI_RANGE, **cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bn in vfe.norms:
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    vfe.eval()
    out = vfe(pv)
    assert out.shape == (pv.voxels.shape[0], cfg["num_filters"][-1]) == (out.shape[0], vfe.out_channels)
    assert vfe.num_input_features == 4 + (6 if cfg.get("use_absolute_xyz", True) else 3) + \
        int(cfg.get("with_distance", False))
    np.testing.assert_allclose(out.detach().numpy(), _pointnet_reference(vfe, pv), rtol=1e-4, atol=1e-5)


def test_pointnet_vfe_centre_offsets_lie_inside_the_voxel():
    voxel = (0.4, 0.5, 0.25)
    _, _, pv = _padded_scan(voxel=voxel, max_points=3)
    vfe = M.PointNetVFE(4, voxel, KITTI_RANGE)
    valid = torch.arange(3)[None, :] < pv.num_points[:, None].long()
    feats, vid = vfe.point_features(pv.voxels, pv.num_points.long(), pv.coords, valid)
    off = feats[:, -3:]
    assert (off.abs() <= torch.tensor(voxel) / 2 + 1e-4).all()
    assert torch.equal(vid, torch.arange(len(pv.num_points)).repeat_interleave(pv.num_points.long()))


@pytest.mark.parametrize("train", [True, False])
def test_pointnet_vfe_ignores_padding_and_point_order(train):
    voxel = (8.0, 8.0, 1.0)
    _, _, pv = _padded_scan(voxel=voxel, max_points=6, seed=2)
    torch.manual_seed(1)
    vfe = M.create_model("pointnet_vfe", in_channels=4, voxel_size=voxel, point_range=KITTI_RANGE,
                         num_filters=(8, 16)).train(train)
    counts = pv.num_points.long()
    assert (counts < 6).any() and (counts > 1).any()
    ref = vfe(pv.voxels, pv.num_points, pv.coords)
    g = torch.Generator().manual_seed(3)
    junk = pv.voxels.clone()
    pad = torch.arange(6)[None, :] >= counts[:, None]
    junk[pad] = torch.randn(int(pad.sum()), 4, generator=g) * 100
    torch.testing.assert_close(vfe(junk, pv.num_points, pv.coords), ref)
    perm = pv.voxels.clone()
    for v in range(perm.shape[0]):
        n = int(counts[v])
        perm[v, :n] = perm[v, torch.randperm(n, generator=g)]
    assert not torch.equal(perm, pv.voxels)
    torch.testing.assert_close(vfe(perm, pv.num_points, pv.coords), ref)
    # An empty voxel (0 points) gives zeros and does not disturb the others.
    empty = torch.cat([pv.voxels, torch.randn(1, 6, 4, generator=g)])
    out = vfe(empty, torch.cat([pv.num_points, torch.zeros(1, dtype=pv.num_points.dtype)]),
              torch.cat([pv.coords, pv.coords[:1]]))
    assert torch.equal(out[-1], torch.zeros(16))
    torch.testing.assert_close(out[:-1], ref)


def test_pointnet_vfe_backward_and_errors():
    voxel = (8.0, 8.0, 1.0)
    _, _, pv = _padded_scan(voxel=voxel, max_points=5)
    vfe = M.PointNetVFE(4, voxel, KITTI_RANGE, num_filters=(8, 16))
    vfe(pv).square().sum().backward()
    for name, p in vfe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(TypeError, match="SparseTensor"):
        vfe(_scan((8, 8, 8), 20))
    with pytest.raises(ValueError, match="coords"):
        vfe(pv.voxels, pv.num_points)
    with pytest.raises(ValueError, match="do not pass"):
        vfe(pv, pv.num_points)
    with pytest.raises(ValueError, match="num_points"):
        vfe(pv.voxels, pv.num_points.float(), pv.coords)
    for kwargs, match in [(dict(voxel_size=(0.2, 0.2)), "voxel_size"), (dict(voxel_size=(0.2, 0, 0.2)), "voxel_size"),
                          (dict(point_range=(0, 0, 0)), "point_range"), (dict(num_filters=()), "num_filters"),
                          (dict(num_filters=(7, 8)), "num_filters"), (dict(in_channels=2), "in_channels")]:
        with pytest.raises(ValueError, match=match):
            M.PointNetVFE(**{"in_channels": 4, **kwargs})


def test_vfe_feeds_a_backbone():
    """PaddedVoxels -> PointNetVFE -> SparseTensor -> backbone (the PointPillars-style input path)."""
    voxel = (2.2, 2.5, 0.5)
    grid = grid_shape(voxel, KITTI_RANGE)
    _, _, pv = _padded_scan(voxel=voxel, max_points=4, n=600)
    vfe = M.PointNetVFE(4, voxel, KITTI_RANGE, num_filters=(16,))
    net = M.VoxelBackBone8x(16, grid)
    x = SparseTensor(vfe(pv), pv.coords, pv.spatial_shape, batch_size=2)
    enc = net(x)["encoded"]
    enc.features.sum().backward()
    assert vfe.linears[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- BEV neck
def test_bev_backbone_default_shapes_and_gradients():
    neck = M.create_model("base_bev_backbone", input_channels=24, num_filters=(8, 16), num_upsample_filters=(12, 12),
                          layer_nums=(1, 2))
    assert neck.num_bev_features == 24
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in b) for b in neck.blocks]
    assert convs == [2, 3]
    assert all(isinstance(m, torch.nn.BatchNorm2d) and m.eps == 1e-3 and m.momentum == 0.01
               for m in neck.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert isinstance(neck.deblocks[1][0], torch.nn.ConvTranspose2d) and neck.deblocks[1][0].stride == (2, 2)
    x = torch.randn(2, 24, 16, 12)
    y = neck(x)
    assert y.shape == (2, 24, 16, 12)
    y.square().sum().backward()
    for name, p in neck.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert M.BaseBEVBackbone().num_bev_features == 512


@pytest.mark.parametrize("h, w", [(25, 23), (13, 8), (1, 1)])
def test_bev_backbone_odd_sizes_crop_the_upsampled_level(h, w):
    torch.manual_seed(0)
    neck = M.BaseBEVBackbone(6, layer_nums=(1, 1), num_filters=(4, 8), num_upsample_filters=(5, 7)).eval()
    x = torch.randn(1, 6, h, w)
    with torch.no_grad():
        y = neck(x)
        l0 = neck.blocks[0](x)
        l1 = neck.blocks[1](l0)
        up1 = neck.deblocks[1](l1)
    assert l1.shape[2:] == ((h + 1) // 2, (w + 1) // 2)      # ceil(H / 2)
    assert up1.shape[2:] == (2 * ((h + 1) // 2), 2 * ((w + 1) // 2))
    assert y.shape == (1, 12, h, w)
    torch.testing.assert_close(y[:, :5], neck.deblocks[0](l0))
    torch.testing.assert_close(y[:, 5:], up1[:, :, :h, :w])  # cropped at the high end, index 0 aligned


def test_bev_backbone_pads_a_smaller_level_and_strided_downsample():
    torch.manual_seed(0)
    # Level 1 (stride 2) up-sampled by 1: 13 x 12 rows padded with zeros to level 0's 25 x 23.
    neck = M.BaseBEVBackbone(3, layer_nums=(0, 0), num_filters=(4, 4), upsample_strides=(1, 1),
                             num_upsample_filters=(2, 3)).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 25, 23)
        y = neck(x)
        up1 = neck.deblocks[1](neck.blocks[1](neck.blocks[0](x)))
    assert y.shape == (1, 5, 25, 23) and up1.shape[2:] == (13, 12)
    torch.testing.assert_close(y[:, 2:, :13, :12], up1)
    assert torch.equal(y[:, 2:, 13:], torch.zeros(1, 3, 12, 23)) and torch.equal(y[:, 2:, :, 12:], torch.zeros(1, 3, 25, 11))
    # Up-sample stride 0.5 is a kernel-2, stride-2 Conv2d (OpenPCDet); level sizes 13 -> 6 and 7 -> 7 cropped to 6.
    neck = M.BaseBEVBackbone(3, layer_nums=(0, 0), layer_strides=(2, 2), num_filters=(4, 4),
                             upsample_strides=(0.5, 1), num_upsample_filters=(2, 3))
    conv = neck.deblocks[0][0]
    assert type(conv) is torch.nn.Conv2d and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
    assert neck(torch.randn(2, 3, 25, 23)).shape == (2, 5, 6, 6)
    # An extra up-sample stride adds a deblock on the concatenation.
    neck = M.BaseBEVBackbone(3, layer_nums=(0, 0), num_filters=(4, 4), upsample_strides=(1, 2, 2),
                             num_upsample_filters=(2, 3))
    assert len(neck.deblocks) == 3 and neck(torch.randn(1, 3, 9, 7)).shape == (1, 5, 18, 14)
    # use_conv_for_no_stride: a 1x1 Conv2d instead of a ConvTranspose2d.
    neck = M.BaseBEVBackbone(3, layer_nums=(0,), layer_strides=(1,), num_filters=(4,), upsample_strides=(1,),
                             num_upsample_filters=(2,), use_conv_for_no_stride=True)
    assert type(neck.deblocks[0][0]) is torch.nn.Conv2d and neck(torch.randn(1, 3, 5, 4)).shape == (1, 2, 5, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_nums=(5,)), "one entry per level"), (dict(num_filters=(8, 8, 8)), "one entry per level"),
    (dict(upsample_strides=(1,)), "upsample_strides"), (dict(upsample_strides=(1, 1.5)), "upsample_strides"),
    (dict(upsample_strides=(1, 0.3)), "upsample_strides"), (dict(upsample_strides=(1, -2)), "upsample_strides"),
    (dict(num_upsample_filters=(4,)), "num_upsample_filters"), (dict(layer_strides=(1, 0)), "layer_strides"),
    (dict(input_channels=0), "input_channels"), (dict(layer_nums=()), "layer_nums"),
    (dict(layer_nums=(1, -1)), "layer_nums")])
def test_bev_backbone_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.BaseBEVBackbone(**{"input_channels": 8, **kwargs})


def test_bev_backbone_rejects_wrong_input():
    neck = M.BaseBEVBackbone(8, num_filters=(4, 4), num_upsample_filters=(4, 4), layer_nums=(0, 0))
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        neck(torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        neck(torch.randn(8, 5, 5))


def test_full_second_style_stack_on_collated_scan():
    """VFE -> 3D backbone -> height compression -> BEV neck on a coarse KITTI grid: the BEV map is
    ``[B, 512, Y / 8, X / 8]``."""
    grid = grid_shape((0.4, 0.4, 0.2), KITTI_RANGE)  # (176, 200, 20)
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(800, 4, generator=g) * torch.tensor([70.4, 80.0, 4.0, 1.0]) + torch.tensor([0.0, -40.0, -3.0, 0.0])
    x = sc.voxelize(pts, (0.4, 0.4, 0.2), KITTI_RANGE, batch=torch.arange(800) % 2, batch_size=2).tensor
    vfe = M.MeanVFE(4)
    net = M.VoxelResBackBone8x(4, grid)
    neck = M.BaseBEVBackbone(net.num_bev_features, layer_nums=(1, 1), num_filters=(16, 32),
                             num_upsample_filters=(16, 16))
    bev = neck(M.height_compression(net(vfe(x))["encoded"]))
    assert bev.shape == (2, 32, 25, 22)
