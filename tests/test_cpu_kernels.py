"""The fast CPU paths against the plain ones.

* float32 convolutions run fused, register-blocked micro-kernels (``csrc/cpu/gemm_rows*``) in one of
  three instruction-set variants picked at run time; every variant is run (``SPARSECONV_CPU_ISA`` caps
  the choice, in a subprocess) and compared with the float64 path of the same op, which is the plain
  gather-GEMM-scatter checked against dense ``conv3d`` elsewhere;
* results do not depend on the thread count (bit for bit);
* corrupt kernel maps raise instead of reading out of bounds;
* submanifold maps of coordinates sorted by key take a merge join instead of hash lookups: both
  paths are compared with the reference on the same sites in sorted and shuffled order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseconv._C as _C
from sparseconv import ops
from sparseconv import reference as ref

# (rows M, input rows N, offsets K, C_in, C_out): tile edges (128), micro-kernel row blocks (6, 8, 12),
# column panels (16, 64) and their masked remainders.
SHAPES = [(1, 3, 1, 1, 1), (5, 9, 27, 3, 5), (127, 130, 27, 16, 16), (129, 140, 8, 7, 37), (300, 280, 27, 64, 64),
          (257, 300, 27, 32, 128), (40, 50, 3, 64, 200), (200, 210, 27, 4, 16), (64, 70, 27, 65, 17)]


def random_map(gen, n_in, m, kvol, density=0.4):
    """``[m, kvol]`` int32 with distinct non-negative entries (< n_in) per column."""
    cols = []
    for _ in range(kvol):
        col = torch.full((m,), -1, dtype=torch.int64)
        take = min(m, n_in)
        col[:take] = torch.randperm(n_in, generator=gen)[:take]
        col = col[torch.randperm(m, generator=gen)]
        cols.append(torch.where(torch.rand(m, generator=gen) < density, col, -1))
    return torch.stack(cols, 1).to(torch.int32).contiguous()


def conv_cases():
    gen = torch.Generator().manual_seed(0)
    for m, n, kvol, cin, cout in SHAPES:
        nbmap = random_map(gen, n, m, kvol)
        yield (m, n, kvol, cin, cout), nbmap, torch.randn(n, cin, generator=gen), torch.randn(
            kvol, cin, cout, generator=gen), torch.randn(m, cout, generator=gen)


def max_rel_err(got, exp):
    scale = exp.abs().max().clamp_min(1e-12)
    return float((got.double() - exp).abs().max() / scale)


def check_against_float64():
    """Worst relative error of the float32 ops against float64, over SHAPES (both map directions)."""
    worst = 0.0
    for (m, n, _, _, _), nbmap, feats, weight, grad in conv_cases():
        f64, w64, g64 = feats.double(), weight.double(), grad.double()
        worst = max(worst, max_rel_err(ops.conv_forward(feats, weight, nbmap, m, False),
                                       ops.conv_forward(f64, w64, nbmap, m, False)))
        # transposed: features on the map's rows, output on the side the entries index
        tf = torch.randn(m, weight.shape[1], generator=torch.Generator().manual_seed(m))
        worst = max(worst, max_rel_err(ops.conv_forward(tf, weight, nbmap, n, True),
                                       ops.conv_forward(tf.double(), w64, nbmap, n, True)))
        worst = max(worst, max_rel_err(torch.ops.sparseconv.conv_input_grad(grad, weight, nbmap, n, False),
                                       torch.ops.sparseconv.conv_input_grad(g64, w64, nbmap, n, False)))
        worst = max(worst, max_rel_err(torch.ops.sparseconv.conv_weight_grad(feats, grad, nbmap, False),
                                       torch.ops.sparseconv.conv_weight_grad(f64, g64, nbmap, False)))
        tg = torch.randn(n, weight.shape[2], generator=torch.Generator().manual_seed(n))
        worst = max(worst, max_rel_err(torch.ops.sparseconv.conv_weight_grad(tf, tg, nbmap, True),
                                       torch.ops.sparseconv.conv_weight_grad(tf.double(), tg.double(), nbmap, True)))
    gen = torch.Generator().manual_seed(1)
    for n, k, m, density in [(1, 1, 1, 1.0), (7, 13, 5, 0.5), (300, 256, 64, 0.1), (129, 37, 130, 0.3),
                             (50, 64, 17, 0.0), (40, 100, 200, 0.9), (3, 16, 16, 0.05)]:
        a = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < density)
        b = torch.randn(k, m, generator=gen)
        worst = max(worst, max_rel_err(ops.sparse_rows_mm(a, b), a.double() @ b.double()))
    for x, w, bias, pw, pb, offsets, heads in attention_cases():
        got = torch.ops.sparseconv.window_attention(x, w, bias, pw, pb, offsets, None, heads, 0.3)
        args64 = tuple(t.double() for t in (x, w, bias, pw, pb))
        exp = torch.ops.sparseconv.window_attention(*args64, offsets, None, heads, 0.3)
        grad = torch.randn(got[1].shape, generator=gen)
        back = torch.ops.sparseconv.window_attention_backward(grad, x, w, bias, got[1], got[2], offsets, None, heads,
                                                              0.3)
        back64 = torch.ops.sparseconv.window_attention_backward(grad.double(), *args64[:3], exp[1], exp[2], offsets,
                                                                None, heads, 0.3)
        worst = max(worst, *(max_rel_err(a, e) for a, e in zip(got, exp)), max_rel_err(back, back64))
    return worst


def attention_cases():
    """(x, weight, bias, proj_weight, proj_bias, offsets, heads) for window_attention: groups of 0 to 100 rows,
    head widths 1, 5, 16 and 32."""
    gen = torch.Generator().manual_seed(2)
    for sizes, heads, d, cin in [([1], 1, 1, 3), ([3, 0, 17, 64, 1, 2], 4, 16, 64), ([100, 33], 3, 5, 7),
                                 ([8, 9, 16], 2, 32, 20)]:
        offsets = torch.tensor([0] + sizes).cumsum(0)
        c = heads * d
        x = torch.randn(int(offsets[-1]), cin, generator=gen)
        w = torch.randn(3 * c, cin, generator=gen) / cin ** 0.5 * 2
        pw = torch.randn(cin, c, generator=gen) / c ** 0.5
        yield x, w, torch.randn(3 * c, generator=gen), pw, torch.randn(cin, generator=gen), offsets, heads


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_micro_kernel_variant_matches_float64(isa):
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import sparseconv._C as C
        from test_cpu_kernels import check_against_float64
        print(json.dumps({{"isa": C.cpu_isa(), "err": check_against_float64()}}))
    """)
    env = dict(os.environ, SPARSECONV_CPU_ISA=isa)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res["isa"] != isa:
        # The cap only lowers the choice: a CPU without the requested ISA runs a lower variant.
        order = ["generic", "avx2", "avx512"]
        assert order.index(res["isa"]) < order.index(isa), res
    assert res["err"] < 1e-5, res


def test_cpu_isa_reports_a_known_variant():
    assert _C.cpu_isa() in {"generic", "avx2", "avx512"}


def test_float32_results_do_not_depend_on_the_thread_count():
    old = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = []
            for (m, n, _, _, _), nbmap, feats, weight, grad in conv_cases():
                res.append(ops.conv_forward(feats, weight, nbmap, m, False))
                res.append(torch.ops.sparseconv.conv_input_grad(grad, weight, nbmap, n, False))
                res.append(torch.ops.sparseconv.conv_weight_grad(feats, grad, nbmap, False))
            for x, w, bias, pw, pb, offsets, heads in attention_cases():
                y, out, lse = torch.ops.sparseconv.window_attention(x, w, bias, pw, pb, offsets, None, heads, 0.3)
                res += [y, out, lse, torch.ops.sparseconv.window_attention_backward(out, x, w, bias, out, lse,
                                                                                   offsets, None, heads, 0.3)]
            outs[threads] = res
    finally:
        torch.set_num_threads(old)
    for a, b in zip(outs[1], outs[2]):
        assert torch.equal(a, b)


def test_float32_forward_matches_the_reference():
    for (m, _, _, _, _), nbmap, feats, weight, _ in conv_cases():
        exp = ref.conv_forward_reference(feats.double(), weight.double(), nbmap, m, False)
        assert max_rel_err(ops.conv_forward(feats, weight, nbmap, m, False), exp) < 1e-5


def test_transposed_conv_rejects_a_map_that_repeats_a_row_within_an_offset():
    nbmap = torch.tensor([[0, -1], [0, 1]], dtype=torch.int32)  # row 0 twice in column 0
    feats, weight = torch.randn(2, 3), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="repeats a row within one kernel offset"):
        ops.conv_forward(feats, weight, nbmap, 2, True)


@pytest.mark.parametrize("bad", [5, -2])
@pytest.mark.parametrize("transposed", [False, True])
def test_float32_conv_rejects_out_of_range_map_entries(bad, transposed):
    nbmap = torch.tensor([[0, bad], [1, -1]], dtype=torch.int32)
    feats, weight = torch.randn(2, 3), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="kernel map entries must be -1 or row indices below"):
        ops.conv_forward(feats, weight, nbmap, 2, transposed)
    with pytest.raises(ValueError, match="kernel map entries must be -1 or row indices below"):
        torch.ops.sparseconv.conv_weight_grad(feats, torch.randn(2, 4), nbmap, transposed)


# --------------------------------------------------------------------------- submanifold maps, sorted rows
def sorted_coords(gen, batch, spatial, n):
    x, y, z = spatial
    cells = torch.randperm(batch * x * y * z, generator=gen)[:n].sort().values
    return torch.stack([cells // (x * y * z), cells // (y * z) % x, cells // z % y, cells % z], 1).int().contiguous()


@pytest.mark.parametrize("ks,dil", [((3, 3, 3), (1, 1, 1)), ((2, 2, 2), (1, 1, 1)), ((3, 1, 5), (1, 1, 2)),
                                    ((5, 3, 3), (2, 3, 1)), ((1, 1, 1), (1, 1, 1)), ((4, 3, 2), (1, 2, 3))])
@pytest.mark.parametrize("batch,spatial,n", [(1, (6, 5, 7), 120), (3, (4, 9, 3), 200), (2, (1, 1, 40), 50),
                                             (1, (30, 30, 30), 2000)])
def test_submanifold_map_of_sorted_and_shuffled_rows_matches_reference(ks, dil, batch, spatial, n):
    gen = torch.Generator().manual_seed(n)
    coords = sorted_coords(gen, batch, spatial, n)
    grid = [batch, *spatial]
    keys, values = ops.hash_build(coords, grid)
    got = ops.kmap_submanifold(keys, values, coords, grid, ks, dil)  # merge-join path
    torch.testing.assert_close(got, ref.kmap_submanifold_reference(coords, grid, ks, dil))
    perm = torch.randperm(coords.shape[0], generator=gen)
    shuffled = coords[perm].contiguous()
    keys, values = ops.hash_build(shuffled, grid)
    got_s = ops.kmap_submanifold(keys, values, shuffled, grid, ks, dil)  # hash path
    torch.testing.assert_close(got_s, ref.kmap_submanifold_reference(shuffled, grid, ks, dil))
    # Same neighbour relation: row perm[i] of the sorted map, relabelled.
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    relabelled = torch.where(got[perm] >= 0, inv[got[perm].clamp_min(0).long()].int(), got[perm])
    torch.testing.assert_close(got_s, relabelled)


def test_submanifold_map_rejects_sorted_coords_outside_the_grid():
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.int32)
    keys, values = ops.hash_build(coords, [1, 2, 2, 2])
    bad = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 5]], dtype=torch.int32)
    with pytest.raises(ValueError):
        ops.kmap_submanifold(keys, values, bad, [1, 2, 2, 2], [3, 3, 3], [1, 1, 1])


# --------------------------------------------------------------------------- sparse_rows_mm
def test_sparse_rows_mm_matches_mm_and_propagates_nan():
    gen = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(500, 256, generator=gen) - 1.2)  # ~88 % zeros
    b = torch.randn(256, 64, generator=gen)
    torch.testing.assert_close(ops.sparse_rows_mm(a, b), a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.sparse_rows_mm(a.double(), b.double()), a.double() @ b.double())
    assert torch.equal(ops.sparse_rows_mm(torch.zeros(4, 256), b), torch.zeros(4, 64))
    a[3, 5] = float("nan")
    out = ops.sparse_rows_mm(a, b)
    assert torch.isnan(out[3]).all() and not torch.isnan(out[:3]).any()


def test_sparse_rows_mm_gradients():
    gen = torch.Generator().manual_seed(4)
    a = torch.relu(torch.randn(9, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.sparse_rows_mm, (a, b))


@pytest.mark.parametrize("a,b,exc,match", [
    (torch.zeros(3), torch.zeros(3, 2), ValueError, "must be 2-D"),
    (torch.zeros(3, 4), torch.zeros(5, 2), ValueError, "inner sizes differ"),
    (torch.zeros(3, 4), torch.zeros(4, 2, dtype=torch.float64), ValueError, "but b is"),
    (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int32), TypeError, "floating point"),
])
def test_sparse_rows_mm_errors(a, b, exc, match):
    with pytest.raises(exc, match=match):
        ops.sparse_rows_mm(a, b)
