"""SparseFFN (dense vs CSR path), SparseWindowAttention (vs a plain per-window reference), SparseMoEFFN
(vs a per-voxel loop) and SparseTransformerBlock."""
import math

import pytest
import torch

from sparseconv import SparseTensor, ops
from sparseconv import reference as ref
from sparseconv.nn import SparseFFN, SparseMoEFFN, SparseTransformerBlock, SparseWindowAttention
from sparseconv.nn.ffn import SPARSE_FFN_BREAK_EVEN


def _sites(n, shape, batches=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batches):
        flat = torch.randperm(shape[0] * shape[1] * shape[2], generator=g)[:n]
        x, rest = flat // (shape[1] * shape[2]), flat % (shape[1] * shape[2])
        rows.append(torch.stack([torch.full_like(flat, b), x, rest // shape[2], rest % shape[2]], 1))
    return torch.cat(rows).int()


def _ffn_pair(activation, k=None, dtype=torch.float64, bias_shift=0.0):
    torch.manual_seed(0)
    dense = SparseFFN(8, 32, activation, k=k, sparse_path=False).to(dtype)
    with torch.no_grad():
        dense.fc1.bias -= bias_shift
    sparse = SparseFFN(8, 32, activation, k=k, sparse_path=True).to(dtype)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 5)])
def test_ffn_sparse_path_equals_dense_path_and_gradients(activation, k):
    dense, sparse = _ffn_pair(activation, k, bias_shift=0.5)
    x = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
    yd, ys = dense(x), sparse(x)
    assert sparse.last_used_sparse and not dense.last_used_sparse
    torch.testing.assert_close(ys, yd, rtol=0, atol=1e-12)
    g = torch.randn_like(yd)
    gd = torch.autograd.grad(yd, [x, *dense.parameters()], g)
    gs = torch.autograd.grad(ys, [x, *sparse.parameters()], g)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ffn_float32_within_rounding_and_sparse_tensor_in_out():
    dense, sparse = _ffn_pair("relu", dtype=torch.float32, bias_shift=0.3)
    coords = _sites(500, (16, 16, 16))
    x = SparseTensor(torch.randn(500, 8), coords, (16, 16, 16))
    yd, ys = dense(x), sparse(x)
    assert isinstance(ys, SparseTensor) and ys.coordinate_set is x.coordinate_set
    torch.testing.assert_close(ys.features, yd.features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 3)])
def test_ffn_sparse_path_gradcheck(activation, k):
    _, sparse = _ffn_pair(activation, k)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in sparse.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in sparse.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(sparse, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("activation,k,shift", [("relu", None, 1.0), ("topk", 4, 0.0)])
def test_ffn_float32_sparse_kernel_equals_dense_path(activation, k, shift):
    """float32 on the CPU runs the fused zero-skipping kernel (ops.sparse_rows_mm); float64 runs mm."""
    dense, sparse = _ffn_pair(activation, k, dtype=torch.float32, bias_shift=shift)
    x = torch.randn(9000, 8, requires_grad=True)
    yd, ys = dense(x), sparse(x)
    torch.testing.assert_close(ys, yd, rtol=1e-5, atol=1e-5)
    gd = torch.autograd.grad(yd.square().sum(), [x, *dense.parameters()])
    gs = torch.autograd.grad(ys.square().sum(), [x, *sparse.parameters()])
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ffn_auto_picks_dense_at_low_and_sparse_at_high_sparsity():
    assert 0.0 < SPARSE_FFN_BREAK_EVEN < 1.0
    torch.manual_seed(0)
    ffn = SparseFFN(8, 32, "relu", sparse_path="auto", threshold=0.7).double()
    x = torch.randn(400, 8, dtype=torch.float64)
    with torch.no_grad():
        ffn.fc1.bias.fill_(10.0)  # every unit active
    ffn(x)
    assert ffn.last_sparsity < 0.05 and not ffn.last_used_sparse
    with torch.no_grad():
        ffn.fc1.bias.fill_(-3.0)  # almost every unit off
    ffn(x)
    assert ffn.last_sparsity > 0.7 and ffn.last_used_sparse
    low = SparseFFN(8, 32, "topk", k=16, threshold=0.7)
    high = SparseFFN(8, 32, "topk", k=2, threshold=0.7)
    low(torch.randn(5, 8)), high(torch.randn(5, 8))
    assert not low.last_used_sparse and high.last_used_sparse


def test_ffn_errors_and_empty_input():
    with pytest.raises(ValueError, match="1 <= k <= hidden"):
        SparseFFN(8, 32, "topk")
    with pytest.raises(ValueError, match="'relu' or 'topk'"):
        SparseFFN(8, 32, "gelu")
    with pytest.raises(ValueError, match="expects 8 input channels"):
        SparseFFN(8, 32)(torch.randn(3, 4))
    for path in (True, False):
        assert SparseFFN(8, 32, sparse_path=path)(torch.randn(0, 8)).shape == (0, 8)


# --------------------------------------------------------------------------- attention
def _reference_attention(attn, f, coords):
    """Plain loop: windows in (batch, window) order, their voxels in input order, chunks of max_group,
    full softmax attention (optionally top-k) among each chunk's voxels."""
    ch, h = attn.channels, attn.heads
    d = ch // h
    w, s = attn.window, attn.shift_amount
    q, k, v = attn.qkv(f).split(ch, dim=1)
    windows = {}
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        key = (b, (x + s[0]) // w[0], (y + s[1]) // w[1], (z + s[2]) // w[2])
        windows.setdefault(key, []).append(i)
    out = torch.zeros_like(f)
    for key in sorted(windows):
        members = windows[key]
        for start in range(0, len(members), attn.max_group):
            idx = torch.tensor(members[start:start + attn.max_group])
            for head in range(h):
                sl = slice(head * d, (head + 1) * d)
                qi, ki, vi = q[idx, sl], k[idx, sl], v[idx, sl]
                scores = qi @ ki.t() / math.sqrt(d)
                if attn.topk is not None and attn.topk < len(idx):
                    kth = scores.sort(dim=1, descending=True).values[:, attn.topk - 1:attn.topk]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                out[idx, sl] = torch.softmax(scores, dim=1) @ vi
    return attn.proj(out)


def _attention_input(n=120, batches=2, shape=(12, 10, 9), seed=0):
    coords = _sites(n, shape, batches, seed)
    # a lone voxel in its own window, far from the rest
    coords = torch.cat([coords, torch.tensor([[0, 30, 30, 30]], dtype=torch.int32)])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(coords.shape[0], 16, generator=g, dtype=torch.float64), coords


@pytest.mark.parametrize("shift,topk,max_group,window", [(False, None, 64, 4), (True, None, 64, 4),
                                                         (False, 3, 64, (4, 3, 5)), (True, None, 5, 4),
                                                         (False, 2, 7, 6)])
def test_window_attention_equals_per_window_reference(shift, topk, max_group, window):
    f, coords = _attention_input()
    torch.manual_seed(1)
    attn = SparseWindowAttention(16, 4, window, shift=shift, topk=topk, max_group=max_group).double()
    x = SparseTensor(f, coords)
    y = attn(x)
    assert isinstance(y, SparseTensor) and y.coordinate_set is x.coordinate_set
    torch.testing.assert_close(y.features, _reference_attention(attn, f, coords), rtol=0, atol=1e-12)
    # the lone voxel attends to itself only: its output is proj(v)
    v = attn.qkv(f[-1:])[:, 32:]
    torch.testing.assert_close(y.features[-1:], attn.proj(v), rtol=0, atol=1e-12)


def test_chunk_offsets_match_window_groups():
    from sparseconv.nn.attention import _chunk_offsets, _window_runs, window_groups
    _, coords = _attention_input(n=300, shape=(9, 8, 7))
    for max_group in (1, 3, 7, 64):
        order, _, _, sizes = window_groups(coords, (4, 4, 4), (2, 2, 2), max_group)
        order2, counts = _window_runs(coords, (4, 4, 4), (2, 2, 2))
        assert torch.equal(order, order2)
        assert torch.equal(_chunk_offsets(counts, max_group), torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]))


def test_window_attention_splits_long_windows():
    coords = _sites(64, (4, 4, 4))  # every site of a 4^3 grid: one window of 64 voxels
    f = torch.randn(64, 8, dtype=torch.float64)
    attn = SparseWindowAttention(8, 2, 4, max_group=10).double()
    torch.testing.assert_close(attn(f, coords), _reference_attention(attn, f, coords), rtol=0, atol=1e-12)
    whole = SparseWindowAttention(8, 2, 4, max_group=64).double()
    whole.load_state_dict(attn.state_dict())
    assert not torch.allclose(whole(f, coords), attn(f, coords))  # chunks really separate the voxels


def test_window_attention_empty_input_and_errors():
    attn = SparseWindowAttention(8, 2, 3)
    x = SparseTensor(torch.randn(0, 8), torch.zeros(0, 4, dtype=torch.int32), (4, 4, 4))
    assert attn(x).features.shape == (0, 8)
    with pytest.raises(ValueError, match="divide channels"):
        SparseWindowAttention(10, 3, 4)
    with pytest.raises(ValueError, match="needs coords"):
        attn(torch.randn(3, 8))
    with pytest.raises(ValueError, match="expects 8 channels"):
        attn(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.int32))


@pytest.mark.parametrize("topk", [None, 2])
def test_window_attention_gradcheck(topk):
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 5, 5, 5], [1, 0, 0, 1], [1, 1, 1, 1]],
                          dtype=torch.int32)
    torch.manual_seed(0)
    attn = SparseWindowAttention(4, 2, 2, topk=topk, max_group=2).double()
    f = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: attn(f, coords) + 0 * w.sum(), (f, attn.qkv.weight))


# --------------------------------------------------------------------------- MoE
def test_moe_equals_per_voxel_loop_aux_loss_and_load():
    torch.manual_seed(0)
    moe = SparseMoEFFN(8, 16, experts=4, k=2, capacity_factor=None).double()
    f = torch.randn(50, 8, dtype=torch.float64)
    y = moe(f)
    probs = torch.softmax(moe.router(f), 1).detach()
    ref = torch.zeros_like(f)
    counts = torch.zeros(4, dtype=torch.long)
    for i in range(50):
        p, e = probs[i].topk(2)
        for pj, ej in zip(p / p.sum(), e.tolist()):
            ref[i] += pj * moe.expert(ej, f[i:i + 1])[0]
            counts[ej] += 1
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    assert torch.equal(moe.last_load, counts) and int(moe.last_dropped.sum()) == 0
    aux = 4 * sum(float(counts[j]) / (50 * 2) * float(probs[:, j].mean()) for j in range(4))
    assert float(moe.aux_loss.detach()) == pytest.approx(aux, rel=1e-12)
    moe.aux_loss.backward()  # differentiable through the router probabilities
    assert moe.router.weight.grad is not None


def test_moe_capacity_drops_are_counted_and_contribute_zero():
    torch.manual_seed(0)
    moe = SparseMoEFFN(8, 16, experts=4, k=1, capacity_factor=0.5).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 100.0  # voxels with x[0] > 0 all go to expert 0
    f = torch.randn(40, 8, dtype=torch.float64)
    f[:, 0] = 1.0
    y = moe(SparseTensor(f, _sites(40, (8, 8, 8)))).features
    cap = moe.capacity(40)
    assert cap == 5
    assert moe.last_load.tolist() == [40, 0, 0, 0] and moe.last_dropped.tolist() == [35, 0, 0, 0]
    torch.testing.assert_close(y[:5], moe.expert(0, f[:5]), rtol=0, atol=1e-12)  # first voxels served
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))


def test_moe_empty_and_errors():
    moe = SparseMoEFFN(8, 16)
    assert moe(torch.randn(0, 8)).shape == (0, 8) and float(moe.aux_loss) == 0.0
    with pytest.raises(ValueError, match="1 <= k <= experts"):
        SparseMoEFFN(8, 16, experts=2, k=3)


# --------------------------------------------------------------------------- transformer block
@pytest.mark.parametrize("activation,k,shift", [("relu", None, False), ("topk", 8, True)])
def test_transformer_block_shapes_and_sparse_tensor(activation, k, shift):
    torch.manual_seed(0)
    block = SparseTransformerBlock(16, 4, 4, 32, shift=shift, ffn_activation=activation, ffn_k=k)
    coords = _sites(80, (10, 10, 10), batches=2)
    x = SparseTensor(torch.randn(160, 16), coords, (10, 10, 10))
    y = block(x)
    assert isinstance(y, SparseTensor) and y.features.shape == (160, 16) and torch.equal(y.coords, coords)
    y.features.sum().backward()
    assert all(p.grad is not None for p in block.attn.parameters())
    assert block(torch.randn(0, 16), torch.zeros(0, 4, dtype=torch.int32)).shape == (0, 16)


# --------------------------------------------------------------------------- the window_attention op
def _groups(sizes, heads, d, cin=5, cout=3, dtype=torch.float64, seed=0):
    """(x [N, cin], weight [3C, cin], bias [3C], proj_weight [cout, C], proj_bias [cout], offsets)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + list(sizes)).cumsum(0)
    n, c = int(offsets[-1]), heads * d
    x = torch.randn(n, cin, generator=g, dtype=dtype)
    weight = torch.randn(3 * c, cin, generator=g, dtype=dtype)
    bias = torch.randn(3 * c, generator=g, dtype=dtype)
    pw = torch.randn(cout, c, generator=g, dtype=dtype)
    pb = torch.randn(cout, generator=g, dtype=dtype)
    return x, weight, bias, pw, pb, offsets


def _raw(x, w, b, pw, pb, offsets, heads, scale, index=None):
    """The op's three outputs (y, out, lse)."""
    return torch.ops.sparseconv.window_attention(x, w, b, pw, pb, offsets, index, heads, scale)


def _expected(x, w, b, pw, pb, offsets, heads, scale, index=None):
    out, lse = ref.window_attention_reference(torch.nn.functional.linear(x, w, b), offsets, heads, scale, index)
    return torch.nn.functional.linear(out, pw, pb), out, lse


@pytest.mark.parametrize("sizes,heads,d", [([5], 1, 3), ([1, 0, 7, 64, 2], 4, 16), ([30, 0, 0, 11], 3, 5)])
def test_window_attention_op_equals_reference(sizes, heads, d):
    x, w, b, pw, pb, offsets = _groups(sizes, heads, d)
    exp = _expected(x, w, b, pw, pb, offsets, heads, 0.7)
    torch.testing.assert_close(_raw(x, w, b, pw, pb, offsets, heads, 0.7), exp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.window_attention(x, w, b, pw, pb, offsets, heads, 0.7), exp[0], rtol=0, atol=1e-12)
    # without biases
    torch.testing.assert_close(_raw(x, w, None, pw, None, offsets, heads, 0.7),
                               _expected(x, w, None, pw, None, offsets, heads, 0.7), rtol=0, atol=1e-12)
    # through a permutation: group g is rows index[offsets[g]:offsets[g + 1]]
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    got = _raw(x, w, b, pw, pb, offsets, heads, 0.7, index)
    torch.testing.assert_close(got[0][index], _raw(x[index], w, b, pw, pb, offsets, heads, 0.7)[0], rtol=0, atol=0)
    torch.testing.assert_close(got, _expected(x, w, b, pw, pb, offsets, heads, 0.7, index), rtol=0, atol=1e-12)
    # float32: the vectorized kernel (gemm_rows projections, polynomial exp) within float32 rounding
    got32 = _raw(*(t.float() for t in (x, w, b, pw, pb)), offsets, heads, 0.7)
    for a, e in zip(got32, exp):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)


def test_window_attention_op_gradcheck_and_float32_backward():
    x, w, b, pw, pb, offsets = _groups([3, 1, 0, 4], 2, 3, cin=4)
    index = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    args = tuple(t.clone().requires_grad_(True) for t in (x, w, b, pw, pb))
    assert torch.autograd.gradcheck(lambda *a: ops.window_attention(*a, offsets, 2, 0.5), args)
    assert torch.autograd.gradcheck(lambda *a: ops.window_attention(*a, offsets, 2, 0.5, index), args)
    assert torch.autograd.gradcheck(lambda x, w, pw: ops.window_attention(x, w, None, pw, None, offsets, 2, 0.5),
                                    (args[0], args[1], args[3]))
    # a gradient reaching the attended rows (second output) directly is added to the projection's
    assert torch.autograd.gradcheck(lambda *a: _raw(*a, offsets, 2, 0.5)[1], args)
    # float32 backward against autograd through the float64 reference
    grad = torch.randn(x.shape[0], 3, dtype=torch.float64)
    r64 = tuple(t.clone().requires_grad_(True) for t in (x, w, b, pw, pb))
    (_expected(*r64, offsets, 2, 0.5, index)[0] * grad).sum().backward()
    r32 = tuple(t.float().requires_grad_(True) for t in (x, w, b, pw, pb))
    (ops.window_attention(*r32, offsets, 2, 0.5, index) * grad.float()).sum().backward()
    for a, e in zip(r32, r64):
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=1e-4, atol=1e-4)


def test_window_attention_padded_path_equals_reference():
    # The CUDA kernel of the op is the padded batched path; it runs on any device, so check it here.
    x, w, b, pw, pb, offsets = _groups([1, 0, 7, 64, 2, 33], 4, 4)
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    for idx in (None, index):
        exp = _expected(x, w, b, pw, pb, offsets, 4, 0.5, idx)
        torch.testing.assert_close(ops._padded_window_attention(x, w, b, pw, pb, offsets, idx, 4, 0.5), exp,
                                   rtol=0, atol=1e-12)
        grad = torch.randn(x.shape[0], 16, dtype=torch.float64)
        _, out, lse = exp
        torch.testing.assert_close(
            ops._padded_window_attention_backward(grad, x, w, b, out, lse, offsets, idx, 4, 0.5),
            torch.ops.sparseconv.window_attention_backward(grad, x, w, b, out, lse, offsets, idx, 4, 0.5),
            rtol=0, atol=1e-12)


def test_window_attention_padded_path_checks_its_arguments():
    x, w, b, pw, pb, offsets = _groups([3, 4], 2, 4)
    for bad_offsets, msg in ((torch.tensor([0, 3, 6]), "start at 0 and end at N"),
                             (torch.tensor([0, 5, 3, 7]), "non-decreasing"), (offsets.int(), "int64")):
        with pytest.raises(ValueError, match=msg):
            ops._padded_window_attention(x, w, b, pw, pb, bad_offsets, None, 2, 1.0)
    with pytest.raises(ValueError, match="permutation"):
        ops._padded_window_attention(x, w, b, pw, pb, offsets, torch.tensor([0, 1, 2, 3, 4, 5, 5]), 2, 1.0)
    with pytest.raises(ValueError, match="divisible by heads"):
        ops._padded_window_attention(x, w, b, pw, pb, offsets, None, 5, 1.0)


def test_window_attention_op_nan_stays_in_its_group():
    x, w, b, pw, pb, offsets = _groups([3, 4], 1, 4, dtype=torch.float32)
    x[0, 0] = float("nan")
    y = ops.window_attention(x, w, b, pw, pb, offsets, 1, 0.5)
    assert torch.isnan(y[:3]).any() and torch.isfinite(y[3:]).all()


def test_window_attention_op_errors():
    x, w, b, pw, pb, offsets = _groups([3, 4], 2, 4)
    with pytest.raises(ValueError, match="offsets must start at 0 and end at N"):
        ops.window_attention(x, w, b, pw, pb, torch.tensor([0, 3, 6]), 2, 1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.window_attention(x, w, b, pw, pb, torch.tensor([0, 5, 3, 7]), 2, 1.0)
    with pytest.raises(ValueError, match="int64"):
        ops.window_attention(x, w, b, pw, pb, offsets.int(), 2, 1.0)
    with pytest.raises(ValueError, match="divisible by heads"):
        ops.window_attention(x, w, b, pw, pb, offsets, 5, 1.0)
    with pytest.raises(ValueError, match="weight must be"):
        ops.window_attention(x, w[:, :3], b, pw, pb, offsets, 2, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        ops.window_attention(x, w, b[:5], pw, pb, offsets, 2, 1.0)
    with pytest.raises(ValueError, match="proj_weight must be"):
        ops.window_attention(x, w, b, pw[:, :3], pb, offsets, 2, 1.0)
    with pytest.raises(TypeError, match="float32 and float64"):
        ops.window_attention(*(t.half() for t in (x, w, b, pw, pb)), offsets, 2, 1.0)
    _, out, lse = _raw(x, w, b, pw, pb, offsets, 2, 1.0)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.sparseconv.window_attention_backward(out, x, w, b, out, lse[:, :1], offsets, None, 2, 1.0)
    with pytest.raises(ValueError, match="repeats a row"):
        ops.window_attention(x, w, b, pw, pb, offsets, 2, 1.0, torch.tensor([0, 1, 2, 3, 4, 5, 5]))
    with pytest.raises(ValueError, match="out of range"):
        ops.window_attention(x, w, b, pw, pb, offsets, 2, 1.0, torch.tensor([0, 1, 2, 3, 4, 5, 7]))
