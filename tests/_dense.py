"""Dense references and random sparse inputs shared by the dense-reference and property tests.

Every reference takes features ``[N, C]`` at int32 ``coords`` ``[N, 4]`` (any row order),
scatters them onto a dense ``[B, C, X, Y, Z]`` grid with ``index_put`` (independently of
``SparseTensor.dense``), runs the dense ``torch.nn.functional`` op and returns
``(out, active)``: the dense output ``[B, C, X', Y', Z']`` and the bool ``[B, X', Y', Z']``
mask of the output sites the sparse op must produce.  Conv weights are taken in the sparse
``[K, C_in, C_out]`` layout and converted inside the reference, so gradients with respect
to them can be compared with the sparse layer's directly.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

DTYPE = torch.float64


def triple(v) -> tuple:
    return (int(v),) * 3 if isinstance(v, int) else tuple(int(e) for e in v)


def seeded(*key) -> torch.Generator:
    """A generator seeded from a hashable description of the test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --------------------------------------------------------------------------- inputs
def random_coords(gen, batch_size: int, shape, occupancy: float, shuffle: bool = True) -> torch.Tensor:
    """Unique int32 coordinates of a random occupancy mask, in random row order."""
    mask = torch.rand((batch_size, *shape), generator=gen, dtype=DTYPE) < occupancy
    coords = mask.nonzero().int()
    if shuffle and coords.shape[0] > 1:
        coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    return coords.contiguous()


def random_feats(gen, n: int, channels: int) -> torch.Tensor:
    return torch.randn((n, channels), generator=gen, dtype=DTYPE)


def sort_coords(coords: torch.Tensor) -> torch.Tensor:
    """Rows sorted lexicographically by (batch, x, y, z)."""
    if coords.shape[0] == 0:
        return coords
    c = coords.long()
    key = torch.zeros(c.shape[0], dtype=torch.long)
    for col in range(4):
        key = key * (int(c[:, col].max()) + 1) + c[:, col]
    return coords[torch.argsort(key)]


# --------------------------------------------------------------------------- dense helpers
def scatter_dense(feats, coords, batch_size, shape, fill: float = 0.0) -> torch.Tensor:
    """``[B, C, X, Y, Z]`` with ``feats`` at ``coords`` and ``fill`` elsewhere (differentiable)."""
    out = feats.new_full((batch_size, *shape, feats.shape[1]), fill)
    idx = coords.long()
    out = out.index_put((idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]), feats)
    return out.permute(0, 4, 1, 2, 3)


def occupancy(coords, batch_size, shape, dtype=DTYPE) -> torch.Tensor:
    """``[B, 1, X, Y, Z]`` indicator of the active sites."""
    return scatter_dense(torch.ones((coords.shape[0], 1), dtype=dtype), coords, batch_size, shape)


def gather_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``dense[b, :, x, y, z]`` for every row of ``coords``: ``[M, C]``."""
    idx = coords.long()
    return dense[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]]


def conv_weight_dense(w: torch.Tensor, ks) -> torch.Tensor:
    """``[K, C_in, C_out]`` -> dense ``conv3d`` weight ``[C_out, C_in, kx, ky, kz]``."""
    return w.reshape(*ks, w.shape[1], w.shape[2]).permute(4, 3, 0, 1, 2)


def conv_transpose_weight_dense(w: torch.Tensor, ks) -> torch.Tensor:
    """``[K, C_in, C_out]`` -> dense ``conv_transpose3d`` weight ``[C_in, C_out, kx, ky, kz]``."""
    return w.reshape(*ks, w.shape[1], w.shape[2]).permute(3, 4, 0, 1, 2)


def _ones(ks, channels: int = 1) -> torch.Tensor:
    return torch.ones((channels, 1, *ks), dtype=DTYPE)


def _pad6(padding) -> tuple:
    px, py, pz = padding
    return (pz, pz, py, py, px, px)


def conv_output_shape(shape, ks, st, pad, dil) -> tuple:
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(shape, ks, st, pad, dil))


def conv_transpose_output_shape(shape, ks, st, pad, dil, opad) -> tuple:
    return tuple((n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, k, s, p, d, o in zip(shape, ks, st, pad, dil, opad))


# --------------------------------------------------------------------------- references
def ref_subm(feats, coords, batch_size, shape, weight, bias, ks, dil):
    """Dense conv3d, stride 1, padding ``dil * (ks // 2)``, cropped to the input grid."""
    x = scatter_dense(feats, coords, batch_size, shape)
    pad = tuple(d * (k // 2) for k, d in zip(ks, dil))
    out = F.conv3d(x, conv_weight_dense(weight, ks), bias, 1, pad, dil)
    out = out[:, :, : shape[0], : shape[1], : shape[2]]
    active = occupancy(coords, batch_size, shape)[:, 0] > 0
    return out, active


def _conv_active(coords, batch_size, shape, ks, st, pad, dil) -> torch.Tensor:
    cnt = F.conv3d(occupancy(coords, batch_size, shape), _ones(ks), None, st, pad, dil)
    return cnt[:, 0] > 0


def ref_conv(feats, coords, batch_size, shape, weight, bias, ks, st, pad, dil):
    """Dense conv3d; active where the occupancy mask convolved with a ones kernel is > 0."""
    x = scatter_dense(feats, coords, batch_size, shape)
    out = F.conv3d(x, conv_weight_dense(weight, ks), bias, st, pad, dil)
    return out, _conv_active(coords, batch_size, shape, ks, st, pad, dil)


def ref_conv_transpose(feats, coords, batch_size, shape, weight, bias, ks, st, pad, dil, opad,
                       active_coords: Optional[torch.Tensor] = None):
    """Dense conv_transpose3d; active where the transposed conv of the occupancy mask is > 0
    (or exactly at ``active_coords`` when given, as for the inverse conv)."""
    x = scatter_dense(feats, coords, batch_size, shape)
    out = F.conv_transpose3d(x, conv_transpose_weight_dense(weight, ks), bias, st, pad, opad, 1, dil)
    if active_coords is None:
        cnt = F.conv_transpose3d(occupancy(coords, batch_size, shape), _ones(ks), None, st, pad, opad, 1, dil)
        active = cnt[:, 0] > 0
    else:
        active = occupancy(active_coords, batch_size, tuple(out.shape[2:]))[:, 0] > 0
    return out, active


def inverse_output_padding(coarse_shape, fine_shape, ks, st, pad, dil) -> tuple:
    """The conv_transpose3d ``output_padding`` whose output grid is ``fine_shape``."""
    base = conv_transpose_output_shape(coarse_shape, ks, st, pad, dil, (0, 0, 0))
    opad = tuple(f - b for f, b in zip(fine_shape, base))
    assert all(0 <= o < max(s, d) for o, s, d in zip(opad, st, dil)), (opad, st, dil)
    return opad


def ref_inverse(coarse_feats, coarse_coords, batch_size, coarse_shape, fine_coords, fine_shape,
                weight, bias, ks, st, pad, dil):
    """Dense conv_transpose3d back onto ``fine_shape``, read at the fine (restored) sites."""
    opad = inverse_output_padding(coarse_shape, fine_shape, ks, st, pad, dil)
    out, active = ref_conv_transpose(coarse_feats, coarse_coords, batch_size, coarse_shape, weight, bias,
                                     ks, st, pad, dil, opad, active_coords=fine_coords)
    assert tuple(out.shape[2:]) == tuple(fine_shape)
    return out, active


def ref_max_pool(feats, coords, batch_size, shape, ks, st, pad, dil):
    """Dense max_pool3d over a grid whose inactive (and padding) sites are -inf."""
    x = scatter_dense(feats, coords, batch_size, shape, fill=float("-inf"))
    # Explicit -inf padding: identical to max_pool3d's own padding, but valid for any padding size.
    x = F.pad(x, _pad6(pad), value=float("-inf"))
    out = F.max_pool3d(x, ks, st, 0, dil)
    return out, _conv_active(coords, batch_size, shape, ks, st, pad, dil)


def _window_mean(t, ks, st, pad, dil):
    """Dense avg_pool3d with count_include_pad=True (zero padding counted); for dilated windows,
    which avg_pool3d lacks, the same mean as a depthwise conv3d with a constant kernel."""
    if tuple(dil) == (1, 1, 1):
        return F.avg_pool3d(F.pad(t, _pad6(pad)), ks, st, 0, count_include_pad=True)
    k = ks[0] * ks[1] * ks[2]
    return F.conv3d(t, _ones(ks, t.shape[1]) / k, None, st, pad, dil, groups=t.shape[1])


def ref_avg_pool(feats, coords, batch_size, shape, ks, st, pad, dil, count_inactive: bool):
    """count_inactive: dense avg_pool3d; otherwise avg_pool3d(features) / avg_pool3d(occupancy)."""
    x = scatter_dense(feats, coords, batch_size, shape)
    out = _window_mean(x, ks, st, pad, dil)
    if not count_inactive:
        frac = _window_mean(occupancy(coords, batch_size, shape), ks, st, pad, dil)
        out = out / torch.where(frac > 0, frac, torch.ones_like(frac))
    return out, _conv_active(coords, batch_size, shape, ks, st, pad, dil)


# --------------------------------------------------------------------------- comparison
def leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().clone().requires_grad_(True)


def assert_matches_dense(out, ref_out: torch.Tensor, ref_active: torch.Tensor,
                         sparse_leaves: Sequence[torch.Tensor], dense_leaves: Sequence[torch.Tensor],
                         gen: torch.Generator, expected_coords: Optional[torch.Tensor] = None) -> None:
    """Checks a sparse layer output against a dense reference: spatial_shape, output sites
    (``expected_coords`` in that row order, else sorted ``ref_active.nonzero()``), features at
    those sites, and the gradients of ``sum(out * g)`` for one random ``g`` w.r.t. the leaves."""
    assert tuple(out.spatial_shape) == tuple(ref_out.shape[2:])
    want_sites = ref_active.nonzero().int()
    if expected_coords is None:
        torch.testing.assert_close(out.coords, want_sites, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out.coords, expected_coords, rtol=0, atol=0)
        torch.testing.assert_close(sort_coords(out.coords), want_sites, rtol=0, atol=0)
    assert out.features.shape == (want_sites.shape[0], ref_out.shape[1])
    want = gather_sites(ref_out, out.coords)
    torch.testing.assert_close(out.features, want)
    g = torch.randn(want.shape, generator=gen, dtype=want.dtype)
    sparse_leaves = [t for t in sparse_leaves if t is not None]
    dense_leaves = [t for t in dense_leaves if t is not None]
    assert len(sparse_leaves) == len(dense_leaves)
    if not sparse_leaves:
        return
    got = torch.autograd.grad((out.features * g).sum(), sparse_leaves, allow_unused=True)
    exp = torch.autograd.grad((want * g).sum(), dense_leaves, allow_unused=True)
    for a, b, t in zip(got, exp, sparse_leaves):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(a, b)
