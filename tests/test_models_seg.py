"""Segmentation networks (MinkUNet, SparseUNetAttn), their loss and label projections (models/segmentation.py)."""
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseconv import SparseTensor
from sparseconv import nn as snn
from sparseconv.datasets import collate, learning_map_lut, simulate_scan
from sparseconv.models import create_model, list_models
from sparseconv.models.segmentation import (MINKUNET_BLOCKS, MINKUNET_CHANNELS, MinkUNet, SparseUNetAttn,
                                            lovasz_softmax, segmentation_loss, synthetic_volume, volume_batch,
                                            voxel_labels_from_points, voxel_to_point_labels)

SEG_MODELS = ("minkunet18", "minkunet34", "sparse_unet_attn")
# 25.6 m x 24.8 m x 6.4 m at 0.4 m: grid (64, 62, 16), not a multiple of 16 along y.
POINT_RANGE = (-12.8, -12.4, -3.0, 12.8, 12.4, 3.4)
VOXEL = (0.4, 0.4, 0.4)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sample(seed):
    scan = simulate_scan(seed, "vlp32c")
    labels = learning_map_lut()[scan.semantic.astype(np.int64)]
    return {"points": scan.points, "labels": labels}


@pytest.fixture(scope="module")
def batch():
    """Two simulated VLP-32C scans voxelized at 0.4 m (points outside the range are dropped)."""
    out = collate([_sample(0), _sample(1)], voxel_size=VOXEL, point_range=POINT_RANGE)
    out["voxel_labels"] = voxel_labels_from_points(out["labels"], out["point_to_voxel"], out["voxels"].num_voxels)
    return out


def _net(name, **kw):
    kw.setdefault("width", 0.25)
    return create_model(name, in_channels=4, num_classes=20, **kw)


# ------------------------------------------------------------------------------------------- models
def test_registry_names():
    assert set(SEG_MODELS) | {"minkunet"} <= set(list_models())
    assert create_model("minkunet18", width=0.25).blocks == MINKUNET_BLOCKS[18] == ((2, 2, 2, 2), (2, 2, 2, 2))
    assert create_model("minkunet34", width=0.25).blocks == MINKUNET_BLOCKS[34] == ((2, 3, 4, 6), (2, 2, 2, 2))
    assert create_model("minkunet", depth=34, width=0.25).blocks == MINKUNET_BLOCKS[34]
    assert isinstance(create_model("sparse_unet_attn", width=0.25), SparseUNetAttn)
    with pytest.raises(TypeError, match="depth"):
        create_model("minkunet18", depth=34)


def _expected_params(in_ch, num_classes, width, blocks):
    """Parameter count of the documented layout, from first principles (3^3 convs, k2 convs, BN = 2 C)."""
    c = [max(1, int(width * v)) for v in MINKUNET_CHANNELS]

    def basic(i, o):
        return 27 * i * o + 2 * o + 27 * o * o + 2 * o + (i * o + 2 * o if i != o else 0)

    def res_stage(i, o, n):
        return basic(i, o) + (n - 1) * basic(o, o)

    total = 27 * in_ch * c[0] + 2 * c[0] + 27 * c[0] * c[0] + 2 * c[0]
    for i in range(4):
        total += 8 * c[i] * c[i] + 2 * c[i] + res_stage(c[i], c[i + 1], blocks[0][i])
    for j in range(4):
        cin, cout, skip = c[4 + j], c[5 + j], c[3 - j]
        total += 8 * cin * cout + 2 * cout + res_stage(cout + skip, cout, blocks[1][j])
    return total + c[8] * num_classes + num_classes


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("width", [0.5, 1.0])
def test_parameter_count_matches_layout(depth, width):
    net = MinkUNet(4, 20, width=width, depth=depth)
    n = sum(p.numel() for p in net.parameters())
    assert n == _expected_params(4, 20, width, MINKUNET_BLOCKS[depth])
    if width == 1.0:  # the figures of docs/segmentation.md (SPVNAS reports 21.7M for MinkUNet at cr = 1)
        assert n == {18: 21_723_412, 34: 37_875_220}[depth]


@pytest.mark.parametrize("up", ["inverse", "transposed"])
@pytest.mark.parametrize("name", SEG_MODELS)
def test_forward_backward_sites_and_gradients(batch, name, up):
    torch.manual_seed(0)
    net = _net(name, up=up)
    x = batch["voxels"]
    out = net(x)
    assert isinstance(out, SparseTensor)
    assert out.coordinate_set is x.coordinate_set  # the input's sites, rows and geometry
    assert out.features.shape == (x.num_voxels, 20)
    assert torch.isfinite(out.features).all()
    segmentation_loss(out, batch["voxel_labels"], lovasz=1.0).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname


def test_inverse_and_transposed_agree_with_equal_weights(batch):
    torch.manual_seed(1)
    a = _net("minkunet18", up="inverse").double()
    b = _net("minkunet18", up="transposed").double()
    b.load_state_dict(a.state_dict())
    x = batch["voxels"].replace_feature(batch["voxels"].features.double())
    for mode in (True, False):
        a.train(mode), b.train(mode)
        torch.testing.assert_close(a(x).features, b(x).features, rtol=1e-10, atol=1e-10)
    # What the restriction is for: the transposed conv generates every child of each coarse voxel.
    y = snn.SparseConv3d(4, 4, 2, 2)(batch["voxels"])
    t = snn.SparseConvTranspose3d(4, 4, 2, 2)(y)
    assert t.num_voxels == 8 * y.num_voxels > batch["voxels"].num_voxels


def test_any_grid_no_voxel_dropped():
    """Odd grids are padded, not cropped: voxels on the last odd row count, and grid size does not matter."""
    rng = np.random.default_rng(0)
    cells = rng.choice(21 * 19 * 13, 300, replace=False)
    xyz = np.stack(np.unravel_index(cells, (21, 19, 13)), 1)
    xyz[:20, 0] = 20  # voxels on the last x row of an odd grid (a stride-2 conv of grid 21 has 10 outputs)
    coords = torch.from_numpy(np.unique(np.concatenate([np.zeros((300, 1), int), xyz], 1), axis=0)).int()
    feats = torch.randn(len(coords), 4, dtype=torch.float64)
    torch.manual_seed(0)
    net = _net("minkunet18").double().eval()
    small = net(SparseTensor(feats, coords, (21, 19, 13)))
    large = net(SparseTensor(feats, coords, (64, 48, 80)))
    torch.testing.assert_close(small.features, large.features, rtol=1e-10, atol=1e-10)
    # the edge voxels see their neighbours: moving a neighbour's feature changes them
    feats2 = feats.clone()
    feats2[20:] = 0
    edge = torch.nonzero(coords[:, 1] == 20).squeeze(1)
    moved = net(SparseTensor(feats2, coords, (21, 19, 13))).features[edge]
    assert not torch.allclose(moved, small.features[edge])


@pytest.mark.parametrize("name", SEG_MODELS)
def test_loss_decreases(batch, name):
    torch.manual_seed(0)
    net = _net(name)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = batch["voxels"], batch["voxel_labels"]
    losses = []
    for _ in range(8):
        loss = segmentation_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_sparse_unet_attn_layout_and_errors(batch):
    net = SparseUNetAttn(4, 20, width=0.25, attn_stages=("down4", "up1"), ffn_activation="topk")
    tb = [m for m in net.modules() if isinstance(m, snn.SparseTransformerBlock)]
    # down4 (2 blocks) + up1 (2 blocks) + the head (1)
    assert len(tb) == 5
    assert [b.attn.shift for b in net.encoder[3].blocks.blocks] == [False, True]
    assert not any(isinstance(m, snn.SparseTransformerBlock) for m in net.encoder[2].modules())
    assert all(b.ffn.activation == "topk" for b in tb)
    assert net(batch["voxels"]).coordinate_set is batch["voxels"].coordinate_set
    plain = SparseUNetAttn(4, 20, width=0.25, attn_stages=(), attn_head=False)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in MinkUNet(4, 20, 0.25).parameters())
    with pytest.raises(ValueError, match="heads=5"):
        SparseUNetAttn(4, 20, width=0.25, heads=5)
    with pytest.raises(ValueError, match="attn_stages"):
        SparseUNetAttn(4, 20, attn_stages=("down5",))


def test_bad_arguments():
    with pytest.raises(ValueError, match="up"):
        MinkUNet(4, 20, up="nearest")
    with pytest.raises(ValueError, match="width"):
        MinkUNet(4, 20, width=0)
    with pytest.raises(ValueError, match="depth"):
        MinkUNet(4, 20, depth=50)
    with pytest.raises(ValueError, match="blocks"):
        MinkUNet(4, 20, blocks=((1, 1, 1), (1, 1, 1, 1)))
    with pytest.raises(TypeError, match="in_channels"):
        MinkUNet(4.0, 20)
    net = MinkUNet(4, 20, width=0.25)
    x = SparseTensor(torch.randn(3, 3), torch.tensor([[0, 1, 2, 3], [0, 2, 2, 2], [0, 5, 5, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="in_channels=4"):
        net(x)
    with pytest.raises(TypeError, match="SparseTensor"):
        net(torch.randn(3, 4))


# ------------------------------------------------------------------------------- point projections
def test_forward_points_nearest_is_indexing_by_point_to_voxel(batch):
    torch.manual_seed(0)
    net = _net("minkunet18").eval()
    x, p2v = batch["voxels"], batch["point_to_voxel"]
    with torch.no_grad():
        voxel_logits = net(x).features
        point_logits = net.forward_points(x, batch["points"], batch["batch_index"], mode="nearest")
        trilinear = net.forward_points(x, batch["points"], batch["batch_index"], mode="trilinear")
    kept = p2v >= 0
    assert 0 < int(kept.sum()) < len(p2v)  # some points are outside the range
    # devoxelize finds each point's voxel with voxelize's own arithmetic (the points' float32): exact
    # for every point, including those within rounding of a voxel face.
    torch.testing.assert_close(point_logits[kept], voxel_logits[p2v[kept]], rtol=0, atol=0)
    assert (point_logits[~kept] == 0).all()
    assert trilinear.shape == point_logits.shape and torch.isfinite(trilinear).all()
    # without geometry on the tensor, voxel_size/origin give it
    bare = SparseTensor(x.features, x.coords, x.spatial_shape, batch_size=2)
    with torch.no_grad():
        again = net.forward_points(bare, batch["points"], batch["batch_index"], voxel_size=VOXEL,
                                   origin=POINT_RANGE[:3])
    torch.testing.assert_close(again, point_logits)


def test_voxel_to_point_labels_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7))
    p2v = rng.integers(-1, 50, 400)
    expected = np.array([logits[v].argmax() if v >= 0 else 0 for v in p2v])
    got = voxel_to_point_labels(torch.from_numpy(logits), torch.from_numpy(p2v))
    assert got.dtype == torch.int64 and got.tolist() == expected.tolist()
    ids = rng.integers(1, 7, 50)
    got = voxel_to_point_labels(torch.from_numpy(ids), torch.from_numpy(p2v), ignore_index=255)
    assert got.tolist() == [int(ids[v]) if v >= 0 else 255 for v in p2v]
    with pytest.raises(ValueError, match="point_to_voxel"):
        voxel_to_point_labels(torch.from_numpy(logits), torch.tensor([0, 50]))


def test_voxel_labels_from_points_matches_numpy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 600)
    p2v = rng.integers(-1, 80, 600)
    expected = []
    for v in range(90):  # voxels 80..89 have no points
        votes = Counter(int(lab) for lab, w in zip(labels, p2v) if w == v and lab != 0)
        if not votes:
            expected.append(0)
        else:
            top = max(votes.values())
            expected.append(min(k for k, n in votes.items() if n == top))
    got = voxel_labels_from_points(torch.from_numpy(labels), torch.from_numpy(p2v), 90)
    assert got.tolist() == expected
    all_vote = voxel_labels_from_points(torch.from_numpy(labels), torch.from_numpy(p2v), 90, ignore_index=None)
    assert all_vote[80:].tolist() == [-1] * 10


# ------------------------------------------------------------------------------------------- losses
def _iou_loss_numpy(pred, labels, classes):
    out = []
    for c in classes:
        inter = np.sum((pred == c) & (labels == c))
        union = np.sum((pred == c) | (labels == c))
        out.append(1.0 - inter / union)
    return np.array(out)


def test_lovasz_hard_predictions_is_one_minus_iou():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n, c = 40, 5
        labels = rng.integers(0, c, n)
        pred = np.where(rng.random(n) < 0.6, labels, rng.integers(0, c, n))
        probs = np.eye(c)[pred]
        got = lovasz_softmax(torch.from_numpy(probs), torch.from_numpy(labels), ignore_index=None, per_class=True)
        present = np.unique(labels)
        np.testing.assert_allclose(got.numpy(), _iou_loss_numpy(pred, labels, present), rtol=0, atol=1e-12)
        mean = lovasz_softmax(torch.from_numpy(probs), torch.from_numpy(labels), ignore_index=None)
        assert abs(mean.item() - _iou_loss_numpy(pred, labels, present).mean()) < 1e-12
        # ignore_index drops those entries before everything else
        keep = labels != 0
        got0 = lovasz_softmax(torch.from_numpy(probs), torch.from_numpy(labels), ignore_index=0, per_class=True)
        present0 = np.unique(labels[keep])
        np.testing.assert_allclose(got0.numpy(), _iou_loss_numpy(pred[keep], labels[keep], present0), atol=1e-12)


def _lovasz_integral(errors, fg):
    """integral_0^1 J({i: m_i > t}) dt with J(S) = |S| / |fg ∪ S|, exactly, by brute force over the breakpoints."""
    ts = sorted({0.0, 1.0, *(float(e) for e in errors)})
    total = Fraction(0)
    for lo, hi in zip(ts[:-1], ts[1:]):
        s = {i for i, e in enumerate(errors) if e > lo}  # the set is constant on (lo, hi)
        union = s | {i for i, f in enumerate(fg) if f}
        j = Fraction(len(s), len(union)) if union else Fraction(0)
        total += j * (Fraction(hi) - Fraction(lo))
    return float(total)


def test_lovasz_soft_is_lovasz_extension():
    rng = np.random.default_rng(2)
    n, c = 9, 3
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(n, c)) * 2), 1)
    labels = torch.from_numpy(rng.integers(0, c, n))
    got = lovasz_softmax(probs, labels, ignore_index=None, classes="all", per_class=True)
    for k in range(c):
        fg = (labels == k).numpy()
        errors = np.abs(fg.astype(float) - probs[:, k].numpy())
        assert abs(got[k].item() - _lovasz_integral(errors, fg)) < 1e-12
    sub = lovasz_softmax(probs, labels, ignore_index=None, classes=[2, 0], per_class=True)
    torch.testing.assert_close(sub, got[[2, 0]])


def test_segmentation_loss_reference():
    rng = np.random.default_rng(3)
    n, c = 30, 4
    logits = rng.normal(size=(n, c))
    labels = rng.integers(0, c, n)
    w = rng.uniform(0.5, 2.0, c)
    keep = labels != 0
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ref = -(w[labels] * logp[np.arange(n), labels])[keep].sum() / w[labels][keep].sum()
    t_logits = torch.from_numpy(logits).requires_grad_()
    got = segmentation_loss(t_logits, torch.from_numpy(labels), class_weights=torch.from_numpy(w))
    assert abs(got.item() - ref) < 1e-12
    with_lovasz = segmentation_loss(t_logits, torch.from_numpy(labels), class_weights=torch.from_numpy(w), lovasz=0.5)
    lz = lovasz_softmax(torch.softmax(t_logits, 1), torch.from_numpy(labels))
    assert abs(with_lovasz.item() - ref - 0.5 * lz.item()) < 1e-12
    with_lovasz.backward()
    assert torch.isfinite(t_logits.grad).all() and (t_logits.grad[torch.from_numpy(~keep)] == 0).all()
    # every label ignored: zero, still differentiable
    zero = segmentation_loss(t_logits, torch.zeros(n, dtype=torch.long), lovasz=1.0)
    assert zero.item() == 0.0
    zero.backward()
    with pytest.raises(ValueError, match="labels must be in"):
        segmentation_loss(t_logits, torch.full((n,), 4))
    with pytest.raises(ValueError, match="class_weights"):
        segmentation_loss(t_logits, torch.from_numpy(labels), class_weights=torch.ones(3))
    with pytest.raises(TypeError, match="integer"):
        segmentation_loss(t_logits, torch.zeros(n))


# ------------------------------------------------------------------------------- volumetric example
def test_synthetic_volume():
    a, b = synthetic_volume(0, size=32), synthetic_volume(0, size=32)
    assert torch.equal(a["coords"], b["coords"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(synthetic_volume(1, size=32)["labels"], a["labels"])
    assert set(a["labels"].tolist()) == {1, 2, 3}
    c = a["coords"].long()
    assert c.min() >= 0 and c.max() < 32 and len(torch.unique(c, dim=0)) == len(c)
    # spheres are shells: a sphere voxel's 26-neighbourhood is far from full (a solid would be full inside)
    dense = torch.zeros(34, 34, 34)
    dense[c[:, 0] + 1, c[:, 1] + 1, c[:, 2] + 1] = 1
    nb = F.conv3d(dense[None, None], torch.ones(1, 1, 3, 3, 3), padding=1)[0, 0]
    sphere = c[a["labels"] == 1] + 1
    assert nb[sphere[:, 0], sphere[:, 1], sphere[:, 2]].max() < 27
    x, y = volume_batch([a, synthetic_volume(1, size=32)])
    assert x.batch_size == 2 and x.num_channels == 1 and len(y) == x.num_voxels
    with pytest.raises(ValueError, match="size"):
        synthetic_volume(0, size=8)


def test_minkunet_learns_volumetric_shapes():
    """30 Adam steps on 4 volumes: spheres / tubes / noise told apart by local shape alone.

    Measured (seeds 0, 1, 2): held-out accuracy 0.952 / 0.958 / 0.937 against 0.637 for the majority
    class, recall of tubes 0.87 / 0.89 / 0.83 and of noise 0.90 / 0.90 / 0.92.
    """
    torch.manual_seed(0)
    vols = [synthetic_volume(s, size=32) for s in range(4)]
    x_test, y_test = volume_batch([synthetic_volume(100 + s, size=32) for s in range(2)])
    net = create_model("minkunet18", in_channels=1, num_classes=4, width=0.25)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(30):
        x, y = volume_batch([vols[(2 * step) % 4], vols[(2 * step + 1) % 4]])
        loss = segmentation_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(x_test).features.argmax(1)
    majority = np.bincount(y_test.numpy()).max() / len(y_test)
    accuracy = (pred == y_test).double().mean().item()
    recall = [(pred[y_test == k] == k).double().mean().item() for k in (1, 2, 3)]
    assert majority < 0.7
    assert accuracy > 0.85, (accuracy, recall)
    assert min(recall) > 0.65, (accuracy, recall)
