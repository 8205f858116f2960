"""Hypothesis property tests over random sparse inputs.

Inputs cover random occupancy, empty tensors (N = 0), a single voxel, all voxels in one batch
element of several, voxels only on the faces of the grid (0 and X-1, ...) and full grids.
Properties: equality with the dense references of _dense.py (values and gradients), kernel-map
invariants (against a brute-force map, distinct column entries, submanifold centre identity and
symmetry), determinism, and the dense() / from_dense() round trip.
"""
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sparseconv as sc
from sparseconv import nn as snn

from _dense import (
    DTYPE,
    assert_matches_dense,
    conv_output_shape,
    conv_transpose_output_shape,
    leaf,
    occupancy,
    random_feats,
    ref_avg_pool,
    ref_conv,
    ref_conv_transpose,
    ref_inverse,
    ref_max_pool,
    ref_subm,
    sort_coords,
)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ["random", "empty", "single", "one_batch", "edges", "full"]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The examples are tiny: extra intra-op threads only add synchronisation cost (a lot of it on a
    loaded 2-core machine).  test_thread_count_independence runs a larger input on 1 and 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Case:
    feats: torch.Tensor
    coords: torch.Tensor
    batch_size: int
    shape: tuple
    gen: torch.Generator

    def tensor(self, feats=None) -> sc.SparseTensor:
        feats = self.feats if feats is None else feats
        return sc.SparseTensor(feats, self.coords, spatial_shape=self.shape, batch_size=self.batch_size)

    def __repr__(self):  # shown by hypothesis on failure
        return (f"Case(N={self.coords.shape[0]}, C={self.feats.shape[1]}, batch_size={self.batch_size}, "
                f"shape={self.shape}, coords={self.coords.tolist()})")


@st.composite
def sparse_cases(draw, max_dim=7, max_batch=3, max_channels=3, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    shape = tuple(draw(st.integers(1, max_dim)) for _ in range(3))
    batch = draw(st.integers(2 if kind == "one_batch" else 1, max_batch))
    channels = draw(st.integers(1, max_channels))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.zeros((batch, *shape), dtype=torch.bool)
    rand = torch.rand((batch, *shape), generator=gen, dtype=DTYPE)
    if kind == "random":
        mask = rand < draw(st.floats(0.05, 0.9))
    elif kind == "single":
        site = [draw(st.integers(0, n - 1)) for n in (batch, *shape)]
        mask[tuple(site)] = True
    elif kind == "one_batch":
        b = draw(st.integers(0, batch - 1))
        mask[b] = rand[b] < draw(st.floats(0.1, 0.9))
        mask[b].view(-1)[draw(st.integers(0, mask[b].numel() - 1))] = True
    elif kind == "edges":
        grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"))
        on_face = torch.zeros(shape, dtype=torch.bool)
        for axis, n in enumerate(shape):
            on_face |= (grid[axis] == 0) | (grid[axis] == n - 1)
        mask = on_face.expand(batch, *shape) & (rand < 0.6)
        mask[:, 0, 0, 0] = True
        mask[:, -1, -1, -1] = True
    elif kind == "full":
        mask[:] = True
    coords = mask.nonzero().int()
    if coords.shape[0] > 1:
        coords = coords[torch.randperm(coords.shape[0], generator=gen)].contiguous()
    feats = random_feats(gen, coords.shape[0], channels)
    return Case(feats, coords, batch, shape, gen)


def small_int3(lo: int, hi: int):
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi), st.integers(lo, hi))


@st.composite
def conv_geometries(draw, max_k=4, max_s=3, max_p=2, max_d=2):
    ks, stride = draw(small_int3(1, max_k)), draw(small_int3(1, max_s))
    return ks, stride, draw(small_int3(0, max_p)), draw(small_int3(1, max_d))


def _valid_conv(shape, ks, st_, pad, dil) -> bool:
    return min(conv_output_shape(shape, ks, st_, pad, dil)) >= 1


def _with_params(module, gen):
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=DTYPE))
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=DTYPE))
    return module


# ============================================================================ dense equality
@SETTINGS
@given(case=sparse_cases(), ks=small_int3(1, 4), dil=small_int3(1, 2), bias=st.booleans(), c_out=st.integers(1, 3))
def test_subm_conv_matches_dense(case, ks, dil, bias, c_out):
    conv = _with_params(snn.SubMConv3d(case.feats.shape[1], c_out, ks, dilation=dil, bias=bias, dtype=DTYPE), case.gen)
    f_s = leaf(case.feats)
    out = conv(case.tensor(f_s))
    f_d, w_d, b_d = leaf(case.feats), leaf(conv.weight), leaf(conv.bias)
    ref, active = ref_subm(f_d, case.coords, case.batch_size, case.shape, w_d, b_d, ks, dil)
    assert_matches_dense(out, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], case.gen,
                         expected_coords=case.coords)


@SETTINGS
@given(case=sparse_cases(), geom=conv_geometries(), c_out=st.integers(1, 3))
def test_sparse_conv_matches_dense(case, geom, c_out):
    ks, st_, pad, dil = geom
    assume(_valid_conv(case.shape, ks, st_, pad, dil))
    conv = _with_params(snn.SparseConv3d(case.feats.shape[1], c_out, ks, st_, pad, dil, dtype=DTYPE), case.gen)
    f_s = leaf(case.feats)
    out = conv(case.tensor(f_s))
    assert out.batch_size == case.batch_size
    f_d, w_d, b_d = leaf(case.feats), leaf(conv.weight), leaf(conv.bias)
    ref, active = ref_conv(f_d, case.coords, case.batch_size, case.shape, w_d, b_d, ks, st_, pad, dil)
    assert_matches_dense(out, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], case.gen)


@SETTINGS
@given(case=sparse_cases(max_dim=5), geom=conv_geometries(max_k=3), opad_seed=small_int3(0, 2), c_out=st.integers(1, 3))
def test_sparse_conv_transpose_matches_dense(case, geom, opad_seed, c_out):
    ks, st_, pad, dil = geom
    opad = tuple(o % max(s, d) for o, s, d in zip(opad_seed, st_, dil))  # conv_transpose3d needs opad < max(s, d)
    assume(min(conv_transpose_output_shape(case.shape, ks, st_, pad, dil, opad)) >= 1)
    conv = _with_params(
        snn.SparseConvTranspose3d(case.feats.shape[1], c_out, ks, st_, pad, dil, output_padding=opad, dtype=DTYPE),
        case.gen,
    )
    f_s = leaf(case.feats)
    out = conv(case.tensor(f_s))
    f_d, w_d, b_d = leaf(case.feats), leaf(conv.weight), leaf(conv.bias)
    ref, active = ref_conv_transpose(f_d, case.coords, case.batch_size, case.shape, w_d, b_d, ks, st_, pad, dil, opad)
    assert_matches_dense(out, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], case.gen)


@SETTINGS
@given(case=sparse_cases(), geom=conv_geometries(), c_out=st.integers(1, 3))
def test_inverse_conv_matches_dense(case, geom, c_out):
    ks, st_, pad, dil = geom
    assume(_valid_conv(case.shape, ks, st_, pad, dil))
    c_in = case.feats.shape[1]
    down = snn.SparseConv3d(c_in, 2, ks, st_, pad, dil, indice_key="k", dtype=DTYPE)
    up = _with_params(snn.SparseInverseConv3d(2, c_out, ks, indice_key="k", dtype=DTYPE), case.gen)
    x = case.tensor()
    y = down(x)
    coarse = random_feats(case.gen, y.num_voxels, 2)
    c_s = leaf(coarse)
    out = up(y.replace_feature(c_s))
    assert out.coordinate_set is x.coordinate_set
    c_d, w_d, b_d = leaf(coarse), leaf(up.weight), leaf(up.bias)
    ref, active = ref_inverse(c_d, y.coords, case.batch_size, y.spatial_shape, case.coords, case.shape,
                              w_d, b_d, ks, st_, pad, dil)
    assert_matches_dense(out, ref, active, [c_s, up.weight, up.bias], [c_d, w_d, b_d], case.gen,
                         expected_coords=case.coords)


@SETTINGS
@given(case=sparse_cases(), geom=conv_geometries(), kind=st.sampled_from(["max", "avg", "avg_inactive"]))
def test_pools_match_dense(case, geom, kind):
    ks, st_, pad, dil = geom
    assume(_valid_conv(case.shape, ks, st_, pad, dil))
    f_s = leaf(case.feats)
    f_d = leaf(case.feats)
    args = (case.coords, case.batch_size, case.shape, ks, st_, pad, dil)
    if kind == "max":
        out = snn.SparseMaxPool3d(ks, st_, pad, dil)(case.tensor(f_s))
        ref, active = ref_max_pool(f_d, *args)
    else:
        inactive = kind == "avg_inactive"
        out = snn.SparseAvgPool3d(ks, st_, pad, dil, count_inactive=inactive)(case.tensor(f_s))
        ref, active = ref_avg_pool(f_d, *args, inactive)
    assert_matches_dense(out, ref, active, [f_s], [f_d], case.gen)


# ============================================================================ kernel maps
def _row_table(coords, batch_size, shape) -> torch.Tensor:
    """Dense ``[B, X, Y, Z]`` table of the row of every active site (-1 elsewhere)."""
    table = torch.full((batch_size, *shape), -1, dtype=torch.long)
    idx = coords.long()
    table[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = torch.arange(coords.shape[0])
    return table


def _offsets(ks) -> torch.Tensor:
    """``[K, 3]`` kernel offsets in x-major order."""
    grid = torch.meshgrid(*[torch.arange(k) for k in ks], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], 1)


def _lookup(table, batch, xyz) -> torch.Tensor:
    """Rows of ``table`` at ``(batch, xyz)`` (broadcast), -1 where outside the grid."""
    shape = torch.tensor(table.shape[1:])
    inside = ((xyz >= 0) & (xyz < shape)).all(-1)
    xyz = torch.where(inside.unsqueeze(-1), xyz, torch.zeros_like(xyz))
    rows = table[batch, xyz[..., 0], xyz[..., 1], xyz[..., 2]]
    return torch.where(inside, rows, torch.full_like(rows, -1))


def brute_submanifold_map(coords, batch_size, shape, ks, dil) -> torch.Tensor:
    table = _row_table(coords, batch_size, shape)
    off = (_offsets(ks) - torch.tensor(ks) // 2) * torch.tensor(dil)  # [K, 3]
    c = coords.long()
    xyz = c[:, None, 1:] + off[None]
    return _lookup(table, c[:, None, 0].expand(-1, off.shape[0]), xyz).int()


def brute_strided_map(coords, batch_size, shape, ks, st_, pad, dil, transposed, opad=(0, 0, 0)):
    """Output coordinates (sorted) and map of a strided / transposed conv, from the definitions
    x = o * s - p + k * d (conv) and o = x * s - p + k * d (transposed)."""
    if transposed:
        out_shape = conv_transpose_output_shape(shape, ks, st_, pad, dil, opad)
    else:
        out_shape = conv_output_shape(shape, ks, st_, pad, dil)
    table = _row_table(coords, batch_size, shape)
    out_all = torch.ones((batch_size, *out_shape), dtype=torch.bool).nonzero()  # sorted (b, x, y, z)
    off = _offsets(ks) * torch.tensor(dil)
    s, p = torch.tensor(st_), torch.tensor(pad)
    b = out_all[:, None, 0].expand(-1, off.shape[0])
    if transposed:
        t = out_all[:, None, 1:] + p - off[None]  # = x * s
        divisible = (t % s == 0).all(-1)
        rows = _lookup(table, b, torch.div(t, s, rounding_mode="floor"))
        rows = torch.where(divisible, rows, torch.full_like(rows, -1))
    else:
        rows = _lookup(table, b, out_all[:, None, 1:] * s - p + off[None])
    keep = (rows >= 0).any(1)
    return out_all[keep].int(), rows[keep].int(), out_shape


def _assert_columns_distinct(nbmap: torch.Tensor, num_in: int) -> None:
    assert nbmap.dtype == torch.int32
    assert bool(((nbmap >= -1) & (nbmap < num_in)).all())
    for k in range(nbmap.shape[1]):
        col = nbmap[:, k]
        col = col[col >= 0]
        assert col.unique().numel() == col.numel(), f"column {k} repeats an input row"


@SETTINGS
@given(case=sparse_cases(), ks=small_int3(1, 5), dil=small_int3(1, 3))
def test_submanifold_map_invariants(case, ks, dil):
    x = case.tensor()
    nbmap = x.coordinate_set.submanifold_map(ks, dil)
    n, kvol = case.coords.shape[0], ks[0] * ks[1] * ks[2]
    assert nbmap.shape == (n, kvol)
    torch.testing.assert_close(nbmap, brute_submanifold_map(case.coords, case.batch_size, case.shape, ks, dil),
                               rtol=0, atol=0)
    _assert_columns_distinct(nbmap, n)
    if all(k % 2 == 1 for k in ks):
        torch.testing.assert_close(nbmap[:, kvol // 2], torch.arange(n, dtype=torch.int32), rtol=0, atol=0)
        # Symmetry: nbmap[o, k] = i  iff  nbmap[i, K - 1 - k] = o.
        o, k = (nbmap >= 0).nonzero(as_tuple=True)
        i = nbmap[o, k].long()
        torch.testing.assert_close(nbmap[i, kvol - 1 - k].long(), o, rtol=0, atol=0)


@SETTINGS
@given(case=sparse_cases(), geom=conv_geometries(), transposed=st.booleans(), opad_seed=small_int3(0, 2))
def test_strided_map_invariants(case, geom, transposed, opad_seed):
    ks, st_, pad, dil = geom
    opad = tuple(o % max(s, d) for o, s, d in zip(opad_seed, st_, dil)) if transposed else (0, 0, 0)
    if transposed:
        assume(min(conv_transpose_output_shape(case.shape, ks, st_, pad, dil, opad)) >= 1)
    else:
        assume(_valid_conv(case.shape, ks, st_, pad, dil))
    x = case.tensor()
    rec = x.coordinate_set.strided(ks, st_, pad, dil, transposed, output_padding=opad)
    want_coords, want_map, want_shape = brute_strided_map(
        case.coords, case.batch_size, case.shape, ks, st_, pad, dil, transposed, opad
    )
    assert rec.target.spatial_shape == want_shape
    torch.testing.assert_close(rec.target.coords, want_coords, rtol=0, atol=0)
    torch.testing.assert_close(rec.nbmap, want_map, rtol=0, atol=0)
    _assert_columns_distinct(rec.nbmap, case.coords.shape[0])
    assert bool((rec.nbmap >= 0).any(1).all()), "every output site reads at least one input"
    assert rec.target.batch_size == case.batch_size


@SETTINGS
@given(case=sparse_cases(), geom=conv_geometries(max_k=3))
def test_determinism(case, geom):
    """Two independent builds of the same input give identical maps, sites and outputs."""
    ks, st_, pad, dil = geom
    assume(_valid_conv(case.shape, ks, st_, pad, dil))
    assume(min(conv_transpose_output_shape(case.shape, ks, st_, pad, dil, (0, 0, 0))) >= 1)
    c_in = case.feats.shape[1]
    torch.manual_seed(0)
    conv = snn.SparseConv3d(c_in, 2, ks, st_, pad, dil, dtype=DTYPE)
    subm = snn.SubMConv3d(c_in, 2, ks, dilation=dil, dtype=DTYPE)
    convt = snn.SparseConvTranspose3d(c_in, 2, ks, st_, pad, dil, dtype=DTYPE)
    results = []
    for _ in range(2):
        x = case.tensor(case.feats.clone())  # a fresh coordinate set: nothing is cached
        cset = x.coordinate_set
        rec = cset.strided(ks, st_, pad, dil)
        rec_t = cset.strided(ks, st_, pad, dil, transposed=True)
        y, z, w = conv(x), subm(x), convt(x)
        results.append([cset.submanifold_map(ks, dil), rec.target.coords, rec.nbmap, rec_t.target.coords,
                        rec_t.nbmap, y.coords, y.features, z.features, w.coords, w.features,
                        snn.SparseMaxPool3d(ks, st_, pad, dil)(x).features])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ============================================================================ dense round trip
@SETTINGS
@given(case=sparse_cases(), channels_first=st.booleans(), stride=st.integers(1, 4))
def test_dense_from_dense_round_trip(case, channels_first, stride):
    x = sc.SparseTensor(case.feats, case.coords, spatial_shape=case.shape, stride=stride, batch_size=case.batch_size)
    d = x.dense(channels_first)
    c = case.feats.shape[1]
    assert d.shape == ((case.batch_size, c, *case.shape) if channels_first else (case.batch_size, *case.shape, c))
    mask = occupancy(case.coords, case.batch_size, case.shape)[:, 0] > 0
    y = sc.SparseTensor.from_dense(d, mask=mask, channels_first=channels_first, stride=stride)
    sorted_coords = sort_coords(case.coords)
    torch.testing.assert_close(y.coords, sorted_coords, rtol=0, atol=0)
    # Row r of y holds the features of the input row at the same site.
    rows = _row_table(case.coords, case.batch_size, case.shape)[tuple(sorted_coords.long().T)]
    torch.testing.assert_close(y.features, case.feats[rows], rtol=0, atol=0)
    assert (y.spatial_shape, y.batch_size, y.stride) == (x.spatial_shape, x.batch_size, x.stride)
    torch.testing.assert_close(y.dense(channels_first), d, rtol=0, atol=0)
    # Default mask (non-zero sites): the same, since random normal features are never all zero.
    if case.coords.shape[0] == 0 or bool((case.feats != 0).any(1).all()):
        z = sc.SparseTensor.from_dense(d, channels_first=channels_first)
        torch.testing.assert_close(z.coords, sorted_coords, rtol=0, atol=0)
        torch.testing.assert_close(z.features, y.features, rtol=0, atol=0)
    # The round-tripped tensor is usable: a SubM conv gives the same result on both.
    conv = snn.SubMConv3d(c, 2, 3, dtype=DTYPE)
    out_x, out_y = conv(x), conv(y)
    torch.testing.assert_close(out_y.features, out_x.features[rows])


# ============================================================================ explicit edge inputs
def _edge_case(name: str) -> Case:
    gen = torch.Generator().manual_seed(7)
    if name == "empty":
        batch, shape, coords = 2, (4, 5, 3), torch.zeros((0, 4), dtype=torch.int32)
    elif name == "single_low_corner":
        batch, shape, coords = 1, (5, 4, 6), torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    elif name == "single_high_corner_last_batch":
        batch, shape, coords = 3, (5, 4, 6), torch.tensor([[2, 4, 3, 5]], dtype=torch.int32)
    elif name == "only_batch_1_of_3":
        batch, shape = 3, (5, 6, 4)
        mask = torch.zeros((batch, *shape), dtype=torch.bool)
        mask[1] = torch.rand(shape, generator=gen) < 0.4
        coords = mask.nonzero().int()
    elif name == "faces_only":
        batch, shape = 2, (5, 4, 6)
        grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"))
        face = torch.zeros(shape, dtype=torch.bool)
        for axis, n in enumerate(shape):
            face |= (grid[axis] == 0) | (grid[axis] == n - 1)
        coords = (face.expand(batch, *shape) & (torch.rand((batch, *shape), generator=gen) < 0.5)).nonzero().int()
    elif name == "flat_axes":
        batch, shape = 2, (1, 1, 7)
        coords = (torch.rand((batch, *shape), generator=gen) < 0.6).nonzero().int()
    else:
        raise ValueError(name)
    coords = coords[torch.randperm(coords.shape[0], generator=gen)].contiguous()
    return Case(random_feats(gen, coords.shape[0], 2), coords, batch, shape, gen)


EDGE_CASES = ["empty", "single_low_corner", "single_high_corner_last_batch", "only_batch_1_of_3", "faces_only",
              "flat_axes"]
EDGE_GEOMS = [((3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)), ((2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1)),
              ((1, 2, 3), (1, 2, 3), (0, 1, 1), (1, 1, 2))]


@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_inputs_every_layer(name):
    """Every layer on explicit edge inputs (guaranteed coverage, whatever hypothesis draws)."""
    case = _edge_case(name)
    c_in, b, shape = case.feats.shape[1], case.batch_size, case.shape
    one = (1, 1, 1)
    for ks in [(3, 3, 3), (2, 2, 2), (1, 3, 2)]:
        conv = _with_params(snn.SubMConv3d(c_in, 3, ks, dtype=DTYPE), case.gen)
        f_s, f_d, w_d, b_d = leaf(case.feats), leaf(case.feats), leaf(conv.weight), leaf(conv.bias)
        ref, active = ref_subm(f_d, case.coords, b, shape, w_d, b_d, ks, one)
        assert_matches_dense(conv(case.tensor(f_s)), ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d],
                             case.gen, expected_coords=case.coords)
    ran = 0
    for ks, st_, pad, dil in EDGE_GEOMS:
        if not _valid_conv(shape, ks, st_, pad, dil):
            continue
        ran += 1
        conv = _with_params(snn.SparseConv3d(c_in, 3, ks, st_, pad, dil, dtype=DTYPE), case.gen)
        f_s, f_d, w_d, b_d = leaf(case.feats), leaf(case.feats), leaf(conv.weight), leaf(conv.bias)
        y = conv(case.tensor(f_s))
        ref, active = ref_conv(f_d, case.coords, b, shape, w_d, b_d, ks, st_, pad, dil)
        assert_matches_dense(y, ref, active, [f_s, conv.weight, conv.bias], [f_d, w_d, b_d], case.gen)

        up = _with_params(snn.SparseInverseConv3d(3, 2, ks, dtype=DTYPE), case.gen)
        coarse = random_feats(case.gen, y.num_voxels, 3)
        c_s, c_d, w_d, b_d = leaf(coarse), leaf(coarse), leaf(up.weight), leaf(up.bias)
        ref, active = ref_inverse(c_d, y.coords, b, y.spatial_shape, case.coords, shape, w_d, b_d, ks, st_, pad, dil)
        assert_matches_dense(up(y.replace_feature(c_s)), ref, active, [c_s, up.weight, up.bias], [c_d, w_d, b_d],
                             case.gen, expected_coords=case.coords)

        opad = tuple(min(1, max(s, d) - 1) for s, d in zip(st_, dil))
        convt = _with_params(snn.SparseConvTranspose3d(c_in, 2, ks, st_, pad, dil, output_padding=opad, dtype=DTYPE),
                             case.gen)
        if min(conv_transpose_output_shape(shape, ks, st_, pad, dil, opad)) >= 1:
            f_s, f_d, w_d, b_d = leaf(case.feats), leaf(case.feats), leaf(convt.weight), leaf(convt.bias)
            ref, active = ref_conv_transpose(f_d, case.coords, b, shape, w_d, b_d, ks, st_, pad, dil, opad)
            assert_matches_dense(convt(case.tensor(f_s)), ref, active, [f_s, convt.weight, convt.bias],
                                 [f_d, w_d, b_d], case.gen)

        args = (case.coords, b, shape, ks, st_, pad, dil)
        for pool, ref_fn in [
            (snn.SparseMaxPool3d(ks, st_, pad, dil), lambda f: ref_max_pool(f, *args)),
            (snn.SparseAvgPool3d(ks, st_, pad, dil), lambda f: ref_avg_pool(f, *args, False)),
            (snn.SparseAvgPool3d(ks, st_, pad, dil, count_inactive=True), lambda f: ref_avg_pool(f, *args, True)),
        ]:
            f_s, f_d = leaf(case.feats), leaf(case.feats)
            ref, active = ref_fn(f_d)
            assert_matches_dense(pool(case.tensor(f_s)), ref, active, [f_s], [f_d], case.gen)
    assert ran >= 1
    # Maps and the dense round trip on the same inputs.
    nbmap = case.tensor().coordinate_set.submanifold_map((3, 3, 3), one)
    torch.testing.assert_close(nbmap, brute_submanifold_map(case.coords, b, shape, (3, 3, 3), one), rtol=0, atol=0)
    mask = occupancy(case.coords, b, shape)[:, 0] > 0
    y = sc.SparseTensor.from_dense(case.tensor().dense(), mask=mask)
    torch.testing.assert_close(y.coords, sort_coords(case.coords), rtol=0, atol=0)
    assert y.batch_size == b and y.spatial_shape == shape


def test_thread_count_independence():
    """Maps, sites, outputs and gradients are bitwise identical on 1 and 2 intra-op threads, on an
    input large enough (a few thousand voxels) for the CPU kernels to split their loops."""
    gen = torch.Generator().manual_seed(11)
    batch, shape = 2, (16, 15, 14)
    coords = (torch.rand((batch, *shape), generator=gen) < 0.35).nonzero().int()
    coords = coords[torch.randperm(coords.shape[0], generator=gen)].contiguous()
    feats = random_feats(gen, coords.shape[0], 4)
    torch.manual_seed(0)
    subm = snn.SubMConv3d(4, 4, 3, dtype=DTYPE)
    down = snn.SparseConv3d(4, 4, 3, 2, 1, dtype=DTYPE)
    up = snn.SparseInverseConv3d(4, 4, 3, dtype=DTYPE)
    convt = snn.SparseConvTranspose3d(4, 2, 2, 2, dtype=DTYPE)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            f = leaf(feats)
            x = sc.SparseTensor(f, coords, spatial_shape=shape, batch_size=batch)
            h = subm(x)
            y = down(h)
            pooled = snn.SparseMaxPool3d(2)(h)
            avg = snn.SparseAvgPool3d(3, 2, 1)(h)
            u = up(y)
            t = convt(y)
            loss = (u.features.sin().sum() + t.features.cos().sum() + pooled.features.sum() * 0.5
                    + (avg.features ** 2).sum())
            params = [f] + [p for m in (subm, down, up, convt) for p in m.parameters()]
            grads = torch.autograd.grad(loss, params)
            results.append([x.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1)), y.coords,
                            h.coordinate_set.strided((3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)).nbmap, t.coords,
                            pooled.coords, h.features, y.features, u.features, t.features, pooled.features,
                            avg.features, *grads])
        finally:
            torch.set_num_threads(1)
    assert coords.shape[0] > 2000
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
