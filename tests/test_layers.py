"""Feature-wise layers, normalisation, containers and global pools against torch references."""
import copy

import pytest
import torch
import torch.nn.functional as TF

from sparseconv import SparseTensor
from sparseconv import nn as snn

DTYPE = torch.float64
SHAPE = (4, 4, 3)


def _tensor(counts, channels=4, seed=0, shape=SHAPE, dtype=DTYPE, shuffle=True):
    """A SparseTensor with ``counts[b]`` voxels in batch element ``b`` (rows shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    cells = shape[0] * shape[1] * shape[2]
    coords = []
    for b, n in enumerate(counts):
        idx = torch.randperm(cells, generator=gen)[:n]
        x, rest = idx // (shape[1] * shape[2]), idx % (shape[1] * shape[2])
        coords.append(torch.stack([torch.full_like(idx, b), x, rest // shape[2], rest % shape[2]], 1))
    coords = torch.cat(coords).int() if coords else torch.zeros(0, 4, dtype=torch.int32)
    if shuffle and coords.shape[0] > 1:
        coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    feats = torch.randn(coords.shape[0], channels, generator=gen, dtype=dtype)
    return SparseTensor(feats, coords.contiguous(), shape, batch_size=len(counts))


def _with_grad(x):
    return x.replace_feature(x.features.detach().clone().requires_grad_())


def _randomize_affine(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen, dtype=module.weight.dtype))
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=module.bias.dtype))


# ----------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_matches_batchnorm1d(momentum):
    ours = snn.BatchNorm(4, momentum=momentum).double()
    ref = torch.nn.BatchNorm1d(4, momentum=momentum).double()
    _randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for step in range(3):
        x = _with_grad(_tensor([5, 3, 7], seed=10 + step))
        f = x.features.detach().clone().requires_grad_()
        y, y_ref = ours(x), ref(f)
        assert isinstance(y, SparseTensor) and y.coordinate_set is x.coordinate_set
        torch.testing.assert_close(y.features, y_ref)
        g = torch.randn(y_ref.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(step))
        (y.features * g).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(x.features.grad, f.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    ours.eval()
    ref.eval()
    x = _tensor([4, 6], seed=20)
    torch.testing.assert_close(ours(x).features, ref(x.features))
    # A plain [N, C] tensor works too.
    torch.testing.assert_close(ours(x.features), ref(x.features))


def test_sync_batch_norm_without_process_group_matches_batchnorm1d():
    ours = snn.SyncBatchNorm(4).double()
    ref = torch.nn.BatchNorm1d(4).double()
    _randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for step in range(2):
        x = _tensor([5, 3], seed=30 + step)
        torch.testing.assert_close(ours(x).features, ref(x.features))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    ours.eval()
    ref.eval()
    x = _tensor([5, 3], seed=40)
    torch.testing.assert_close(ours(x).features, ref(x.features))


# ----------------------------------------------------------------------------- layer / group norm
def test_layer_norm_matches_torch():
    x = _with_grad(_tensor([6, 2], channels=6, seed=50))
    ln = snn.LayerNorm(6).double()
    _randomize_affine(ln)
    f = x.features.detach().clone().requires_grad_()
    y = ln(x)
    y_ref = TF.layer_norm(f, (6,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(y.features, y_ref)
    g = torch.randn(y_ref.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    (y.features * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.features.grad, f.grad)


def _group_norm_reference(x, num_groups, weight, bias, eps):
    """``F.group_norm`` on each batch element's voxels as a ``[1, C, n_b]`` tensor."""
    out = torch.zeros_like(x.features)
    batch = x.coords[:, 0].long()
    for b in range(x.batch_size):
        rows = (batch == b).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        f = x.features[rows].t().unsqueeze(0)  # [1, C, n_b]
        out = out.index_put((rows,), TF.group_norm(f, num_groups, weight, bias, eps)[0].t())
    return out


@pytest.mark.parametrize("num_groups, counts", [
    (3, [5, 1, 0, 7]),  # one voxel (group of 2 channels) and an empty batch element
    (6, [4, 3]),  # a group per channel
    (1, [9]),
])
def test_group_norm_per_batch_element(num_groups, counts):
    x = _with_grad(_tensor(counts, channels=6, seed=60 + num_groups))
    gn = snn.GroupNorm(num_groups, 6).double()
    _randomize_affine(gn)
    f = x.features.detach().clone().requires_grad_()
    y = gn(x)
    y_ref = _group_norm_reference(x.replace_feature(f), num_groups, gn.weight, gn.bias, gn.eps)
    torch.testing.assert_close(y.features, y_ref)
    g = torch.randn(y_ref.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    (y.features * g).sum().backward()
    w_grad = gn.weight.grad.clone()
    gn.zero_grad()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.features.grad, f.grad)
    torch.testing.assert_close(w_grad, gn.weight.grad)


def test_group_norm_gradcheck():
    x = _tensor([3, 1, 4], channels=4, seed=70)
    w = torch.randn(4, dtype=DTYPE, generator=torch.Generator().manual_seed(2)).requires_grad_()
    b = torch.randn(4, dtype=DTYPE, generator=torch.Generator().manual_seed(3)).requires_grad_()
    f = x.features.clone().requires_grad_()

    def fn(feats, weight, bias):
        return snn.functional.group_norm(x.replace_feature(feats), 2, weight, bias, 1e-3).features

    assert torch.autograd.gradcheck(fn, (f, w, b))
    assert torch.autograd.gradgradcheck(fn, (f, w, b))


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError):
        snn.GroupNorm(4, 6)


# ----------------------------------------------------------------------------- feature-wise layers
@pytest.mark.parametrize("layer, ref", [
    (snn.ReLU(), torch.relu),
    (snn.ReLU(inplace=True), torch.relu),
    (snn.LeakyReLU(0.2), lambda f: TF.leaky_relu(f, 0.2)),
    (snn.GELU(), TF.gelu),
    (snn.GELU("tanh"), lambda f: TF.gelu(f, approximate="tanh")),
    (snn.SiLU(), TF.silu),
])
def test_activations(layer, ref):
    x = _with_grad(_tensor([5, 4], seed=80))
    f = x.features.detach().clone().requires_grad_()
    y = layer(x)
    assert y.coordinate_set is x.coordinate_set
    torch.testing.assert_close(y.features, ref(f))
    y.features.sum().backward()
    ref(f).sum().backward()
    torch.testing.assert_close(x.features.grad, f.grad)
    torch.testing.assert_close(layer(x.features), ref(f))  # plain tensors too


def test_dropout():
    x = _tensor([30, 30], channels=8, seed=90)
    drop = snn.Dropout(0.5)
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y.features, TF.dropout(x.features, 0.5, True))
    kept = y.features != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(y.features[kept], 2 * x.features[kept])
    drop.eval()
    torch.testing.assert_close(drop(x).features, x.features, rtol=0, atol=0)
    drop.train()
    torch.testing.assert_close(snn.Dropout(0.0)(x).features, x.features, rtol=0, atol=0)
    torch.testing.assert_close(snn.Dropout(1.0)(x).features, torch.zeros_like(x.features), rtol=0, atol=0)
    with pytest.raises(ValueError):
        snn.Dropout(1.5)


def test_linear():
    x = _with_grad(_tensor([5, 4], channels=4, seed=100))
    lin = snn.Linear(4, 3).double()
    f = x.features.detach().clone().requires_grad_()
    y = lin(x)
    assert y.coordinate_set is x.coordinate_set and y.num_channels == 3
    y_ref = TF.linear(f, lin.weight, lin.bias)
    torch.testing.assert_close(y.features, y_ref)
    y.features.sum().backward()
    w_grad = lin.weight.grad.clone()
    lin.zero_grad()
    y_ref.sum().backward()
    torch.testing.assert_close(x.features.grad, f.grad)
    torch.testing.assert_close(w_grad, lin.weight.grad)
    assert list(lin.state_dict()) == list(torch.nn.Linear(4, 3).state_dict())
    with pytest.raises(ValueError):
        snn.Linear(5, 3).double()(x)


# ----------------------------------------------------------------------------- containers
def test_sparse_sequential_applies_torch_modules_to_features():
    torch.manual_seed(0)
    conv = snn.SubMConv3d(4, 6, 3).double()
    bn = torch.nn.BatchNorm1d(6).double()
    _randomize_affine(bn)
    lin = snn.Linear(6, 2).double()
    seq = snn.SparseSequential(conv, bn, torch.nn.ReLU(), snn.SparseSequential(lin, torch.nn.Tanh()))
    bn_ref = copy.deepcopy(bn)  # the same BatchNorm1d, applied by hand below
    x = _tensor([6, 5], seed=110)
    y = seq(x)
    assert isinstance(y, SparseTensor) and y.coordinate_set is x.coordinate_set
    h = conv(x).features
    expected = torch.tanh(TF.linear(torch.relu(bn_ref(h)), lin.weight, lin.bias))
    torch.testing.assert_close(y.features, expected)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    # Plain tensors go through unchanged in type.
    f = torch.randn(3, 6, dtype=DTYPE)
    seq_plain = snn.SparseSequential(torch.nn.ReLU(), lin)
    torch.testing.assert_close(seq_plain(f), TF.linear(torch.relu(f), lin.weight, lin.bias))


def test_to_dense():
    x = _tensor([3, 0, 4], channels=2, seed=120)
    ref = torch.zeros((x.batch_size, 2, *x.spatial_shape), dtype=DTYPE)
    for row, (b, i, j, k) in enumerate(x.coords.tolist()):
        ref[b, :, i, j, k] = x.features[row]
    torch.testing.assert_close(snn.ToDense()(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(snn.ToDense(channels_first=False)(x), ref.permute(0, 2, 3, 4, 1), rtol=0, atol=0)
    with pytest.raises(TypeError):
        snn.ToDense()(x.features)


# ----------------------------------------------------------------------------- global pools
def _global_reference(x, reduce):
    batch = x.coords[:, 0].long()
    rows = []
    for b in range(x.batch_size):
        f = x.features[batch == b]
        if f.shape[0] == 0:
            rows.append(x.features.new_zeros(x.num_channels))
        else:
            rows.append(f.max(0).values if reduce == "max" else f.mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("layer, reduce", [(snn.SparseGlobalMaxPool(), "max"), (snn.SparseGlobalAvgPool(), "mean")])
@pytest.mark.parametrize("counts", [[4, 0, 1, 6], [0, 3], [5]])
def test_global_pools(layer, reduce, counts):
    x = _with_grad(_tensor(counts, channels=3, seed=130 + len(counts)))
    f = x.features.detach().clone().requires_grad_()
    out = layer(x)
    ref = _global_reference(x.replace_feature(f), reduce)
    assert out.shape == (x.batch_size, 3)
    torch.testing.assert_close(out, ref)
    g = torch.randn(ref.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.features.grad, f.grad)


# ----------------------------------------------------------------------------- empty input and no mutation
def _feature_layers():
    torch.manual_seed(0)
    return [
        snn.BatchNorm(4).double(),
        snn.BatchNorm(4).double().eval(),
        snn.SyncBatchNorm(4).double(),
        snn.SyncBatchNorm(4).double().eval(),
        snn.LayerNorm(4).double(),
        snn.GroupNorm(2, 4).double(),
        snn.ReLU(),
        snn.ReLU(inplace=True),
        snn.LeakyReLU(0.1),
        snn.GELU(),
        snn.SiLU(),
        snn.Dropout(0.5),
        snn.Linear(4, 3).double(),
        snn.SparseSequential(snn.Linear(4, 4).double(), torch.nn.ReLU(), torch.nn.BatchNorm1d(4).double()),
    ]


@pytest.mark.parametrize("index", range(len(_feature_layers())))
def test_empty_input_feature_layers(index):
    layer = _feature_layers()[index]
    x = _with_grad(_tensor([0, 0], seed=140))
    assert x.num_voxels == 0
    y = layer(x)
    assert isinstance(y, SparseTensor)
    assert y.num_voxels == 0 and y.coordinate_set is x.coordinate_set
    assert y.features.shape[1] == (3 if isinstance(layer, snn.Linear) else 4)
    if y.features.requires_grad:
        y.features.sum().backward()


def test_empty_input_pools_and_to_dense():
    x = _tensor([0, 0, 0], channels=3, seed=150)
    for layer in (snn.SparseGlobalMaxPool(), snn.SparseGlobalAvgPool()):
        torch.testing.assert_close(layer(x), torch.zeros(3, 3, dtype=DTYPE), rtol=0, atol=0)
    torch.testing.assert_close(snn.ToDense()(x), torch.zeros(3, 3, *SHAPE, dtype=DTYPE), rtol=0, atol=0)


def _all_layers():
    torch.manual_seed(0)
    return _feature_layers() + [
        snn.SubMConv3d(4, 3, 3).double(),
        snn.SparseConv3d(4, 3, 3, stride=2, padding=1).double(),
        snn.SparseMaxPool3d(2),
        snn.SparseAvgPool3d(2),
        snn.SparseGlobalMaxPool(),
        snn.SparseGlobalAvgPool(),
        snn.ToDense(),
    ]


@pytest.mark.parametrize("index", range(len(_all_layers())))
def test_layers_do_not_modify_input(index):
    layer = _all_layers()[index]
    x = _tensor([5, 6], seed=160)
    x_grad = _with_grad(x)
    before, version = x.features.clone(), x.features._version
    coords = x.coords.clone()
    layer(x)
    out = layer(x_grad)
    assert x.features._version == version
    torch.testing.assert_close(x.features, before, rtol=0, atol=0)
    torch.testing.assert_close(x.coords, coords, rtol=0, atol=0)
    # And backward leaves the input alone too.
    (out.features if isinstance(out, SparseTensor) else out).sum().backward()
    torch.testing.assert_close(x_grad.features.detach(), before, rtol=0, atol=0)
