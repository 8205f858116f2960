"""Pure-PyTorch reference implementations of every op in :mod:`sparseconv.ops`.

These functions use no C++ code: they are written for clarity, not speed,
with plain tensor indexing and small Python loops over the kernel offsets.
They serve as test oracles and as a debugging aid: when a network gives a
surprising result, replacing an op by its reference tells whether the
kernel or the model is at fault.  Every function is differentiable by
ordinary autograd where its op is.

Conventions (shared with :mod:`sparseconv.ops`):

* coordinates are int32 ``[N, 4]`` rows ``(batch, x, y, z)`` on a grid
  ``shape = [B, X, Y, Z]``; the key of a coordinate is the mixed-radix linear
  index ``((b * X + x) * Y + y) * Z + z`` (int64);
* kernel offsets are enumerated x-major, ``k = (kx * KY + ky) * KZ + kz``;
* a kernel map ``nbmap`` is int32 ``[M, K]``: ``nbmap[o, k]`` is the input row
  read by offset ``k`` of output row ``o``, or ``-1``;
* convolution weights are ``[K, C_in, C_out]``.

Example:
    >>> import torch
    >>> from sparseconv import ops, reference
    >>> coords = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [0, 5, 4, 4]], dtype=torch.int32)
    >>> out_coords, nbmap = reference.kmap_strided_reference(
    ...     coords, [1, 8, 8, 8], (4, 4, 4), (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), False)
    >>> out_coords.tolist()
    [[0, 0, 1, 1], [0, 2, 2, 2]]
    >>> feats, weight = torch.randn(3, 4), torch.randn(8, 4, 5)
    >>> torch.testing.assert_close(ops.conv_forward(feats, weight, nbmap, 2),
    ...                            reference.conv_forward_reference(feats, weight, nbmap, 2))
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

__all__ = [
    "coordinate_keys",
    "kernel_offsets",
    "hash_build_reference",
    "hash_query_reference",
    "kmap_submanifold_reference",
    "sparse_rows_mm_reference",
    "window_attention_reference",
    "kmap_strided_reference",
    "conv_forward_reference",
    "conv_input_grad_reference",
    "conv_weight_grad_reference",
    "maxpool_forward_reference",
    "maxpool_backward_reference",
    "avgpool_forward_reference",
    "avgpool_backward_reference",
    "voxelize_reference",
]


# --------------------------------------------------------------------------
# Coordinates.
# --------------------------------------------------------------------------
def _shape4(shape: Sequence[int]) -> Tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"grid shape must be [batch_size, X, Y, Z], got {list(shape)}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_grid(coords: torch.Tensor, shape: Sequence[int]) -> None:
    """Raises ValueError unless the grid has at most 2^62 cells and holds every row of ``coords``."""
    b, x, y, z = _shape4(shape)
    if min(b, x, y, z) < 1 or b * x * y * z > 2**62:
        raise ValueError(f"grid {list(shape)} must be positive with at most 2^62 cells (64-bit keys)")
    inside = _in_grid(coords, shape)
    if not bool(inside.all()):
        row = int((~inside).nonzero()[0, 0])
        raise ValueError(f"coordinate {tuple(coords[row].tolist())} at row {row} is outside the grid {list(shape)}")


def _in_grid(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Bool ``[N]``: whether each row of ``coords`` lies inside the grid ``shape``."""
    bounds = torch.tensor(_shape4(shape), dtype=torch.int64, device=coords.device)
    c = coords.long()
    return ((c >= 0) & (c < bounds)).all(dim=1)


def coordinate_keys(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear int64 keys ``((b * X + x) * Y + y) * Z + z`` of coordinates.

    Args:
        coords: integer ``[N, 4]`` rows ``(batch, x, y, z)``.
        shape: grid ``[B, X, Y, Z]``.

    Returns:
        int64 ``[N]``.  Keys are only meaningful for rows inside the grid.
    """
    _, x, y, z = _shape4(shape)
    c = coords.long()
    return ((c[:, 0] * x + c[:, 1]) * y + c[:, 2]) * z + c[:, 3]


def _decode_keys(keys: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`coordinate_keys`: int32 ``[N, 4]``."""
    _, x, y, z = _shape4(shape)
    cz = keys % z
    rest = keys // z
    cy = rest % y
    rest = rest // y
    cx = rest % x
    cb = rest // x
    return torch.stack([cb, cx, cy, cz], dim=1).to(torch.int32)


def kernel_offsets(kernel_size: Sequence[int]) -> torch.Tensor:
    """Per-axis offset indices ``(kx, ky, kz)`` of every kernel offset, x-major.

    Returns:
        int64 ``[K, 3]`` with row ``k = (kx * KY + ky) * KZ + kz``.
    """
    kx, ky, kz = (int(v) for v in kernel_size)
    grid = torch.meshgrid(torch.arange(kx), torch.arange(ky), torch.arange(kz), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


# --------------------------------------------------------------------------
# Hash table.
# --------------------------------------------------------------------------
def hash_build_reference(coords: torch.Tensor, shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validates ``coords`` and returns the table as sorted ``(keys, rows)``.

    The C++ op returns an open-addressing table (empty slots hold key ``-1``);
    its non-empty ``(key, value)`` pairs, sorted by key, equal this output.

    Args:
        coords: int32 ``[N, 4]`` rows ``(batch, x, y, z)``.
        shape: grid ``[B, X, Y, Z]``.

    Returns:
        ``(keys, rows)``: int64 ``[N]`` sorted linear keys and the row of
        ``coords`` holding each key.

    Raises:
        ValueError: a coordinate lies outside the grid, or occurs twice, or the grid has more than 2^62 cells.
    """
    _check_grid(coords, shape)
    keys, rows = coordinate_keys(coords, shape).sort(stable=True)
    dup = (keys[1:] == keys[:-1]).nonzero()
    if dup.numel():
        j = int(dup[0, 0])
        a, b = sorted((int(rows[j]), int(rows[j + 1])))
        raise ValueError(f"duplicate coordinate {tuple(coords[a].tolist())} at rows {a} and {b}")
    return keys, rows


def hash_query_reference(coords_table: torch.Tensor, queries: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row of each query coordinate in ``coords_table``, or ``-1``.

    Args:
        coords_table: int32 ``[N, 4]`` distinct coordinates inside the grid.
        queries: int32 ``[M, 4]`` coordinates (may lie outside the grid).
        shape: grid ``[B, X, Y, Z]``.

    Returns:
        int64 ``[M]``: ``r`` with ``coords_table[r] == queries[m]``, or ``-1`` when
        absent or outside the grid.

    Raises:
        ValueError: ``coords_table`` is invalid (see :func:`hash_build_reference`).
    """
    keys, rows = hash_build_reference(coords_table, shape)
    result = torch.full((queries.shape[0],), -1, dtype=torch.int64, device=queries.device)
    if keys.numel() == 0 or queries.shape[0] == 0:
        return result
    qkeys = coordinate_keys(queries, shape)
    pos = torch.searchsorted(keys, qkeys).clamp_max(keys.numel() - 1)
    # Keys of out-of-grid queries may alias valid keys: mask them out.
    found = _in_grid(queries, shape) & (keys[pos] == qkeys)
    return torch.where(found, rows[pos], result)


# --------------------------------------------------------------------------
# Kernel maps.
# --------------------------------------------------------------------------
def kmap_submanifold_reference(
    coords: torch.Tensor, shape: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> torch.Tensor:
    """Submanifold kernel map: output sites = input sites.

    Offset ``k`` of site ``c`` reads ``c + (kk - ks // 2) * dilation`` per axis.

    Args:
        coords: int32 ``[N, 4]`` distinct coordinates inside the grid.
        shape: grid ``[B, X, Y, Z]``.
        kernel_size, dilation: 3 ints each.

    Returns:
        int32 ``[N, K]`` kernel map.
    """
    ks = torch.tensor([int(v) for v in kernel_size])
    dil = torch.tensor([int(v) for v in dilation])
    offsets = kernel_offsets(kernel_size)
    columns = []
    for kk in offsets:
        disp = ((kk - ks // 2) * dil).to(coords.device)
        query = coords.long().clone()
        query[:, 1:] += disp
        columns.append(hash_query_reference(coords, query.to(torch.int32), shape))
    n = coords.shape[0]
    if not columns:
        return torch.empty((n, 0), dtype=torch.int32, device=coords.device)
    return torch.stack(columns, dim=1).to(torch.int32)


def kmap_strided_reference(
    coords: torch.Tensor,
    shape: Sequence[int],
    out_spatial: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output sites and kernel map of a strided or transposed convolution.

    ``transposed=False``: input ``x`` feeds output ``o`` through offset ``k`` iff
    ``x = o * stride - padding + k * dilation``.  ``transposed=True``: input ``x``
    feeds ``o = x * stride - padding + k * dilation``.  In both cases only
    ``0 <= o < out_spatial`` counts, and the output sites are exactly the sites
    fed by at least one input.

    Args:
        coords: int32 ``[N, 4]`` distinct coordinates inside the grid ``shape``.
        shape: input grid ``[B, X, Y, Z]``.
        out_spatial: output grid ``(X', Y', Z')``.
        kernel_size, stride, padding, dilation: 3 ints each.
        transposed: transposed convolution.

    Returns:
        ``(out_coords, nbmap)``: int32 ``[M, 4]`` sorted by ``(batch, x, y, z)`` and
        int32 ``[M, K]``.

    Raises:
        ValueError: a coordinate lies outside the input grid, or a grid has more than 2^62 cells.
    """
    _check_grid(coords, shape)
    device = coords.device
    offsets = kernel_offsets(kernel_size).to(device)
    kvol = offsets.shape[0]
    st, pad, dil = (torch.tensor([int(v) for v in t], device=device) for t in (stride, padding, dilation))
    out_bounds = torch.tensor([int(v) for v in out_spatial], device=device)
    out_grid = [int(shape[0]), *(int(v) for v in out_spatial)]
    _check_grid(coords[:0], out_grid)

    rows: List[torch.Tensor] = []  # input row of each (input, offset) pair that hits the output grid
    offs: List[torch.Tensor] = []  # its offset index
    keys: List[torch.Tensor] = []  # its output key
    xyz = coords[:, 1:].long()
    for k in range(kvol):
        if transposed:
            o = xyz * st - pad + offsets[k] * dil
            ok = torch.ones(xyz.shape[0], dtype=torch.bool, device=device)
        else:
            num = xyz + pad - offsets[k] * dil
            ok = ((num >= 0) & (num % st == 0)).all(dim=1)
            o = torch.div(num, st, rounding_mode="floor")
        ok &= ((o >= 0) & (o < out_bounds)).all(dim=1)
        idx = ok.nonzero().squeeze(1)
        out_c = torch.cat([coords[idx, :1].long(), o[idx]], dim=1)
        rows.append(idx)
        offs.append(torch.full_like(idx, k))
        keys.append(coordinate_keys(out_c, out_grid))

    all_rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64, device=device)
    all_offs = torch.cat(offs) if offs else torch.empty(0, dtype=torch.int64, device=device)
    all_keys = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64, device=device)
    out_keys, out_row = torch.unique(all_keys, sorted=True, return_inverse=True)
    out_coords = _decode_keys(out_keys, out_grid)
    nbmap = torch.full((out_keys.numel(), kvol), -1, dtype=torch.int32, device=device)
    nbmap[out_row, all_offs] = all_rows.to(torch.int32)
    return out_coords, nbmap


# --------------------------------------------------------------------------
# Convolution.
# --------------------------------------------------------------------------
def _check_map(nbmap: torch.Tensor, n: int, what: str) -> None:
    if nbmap.dim() != 2:
        raise ValueError(f"nbmap must be [M, K], got shape {tuple(nbmap.shape)}")
    bad = (nbmap < -1) | (nbmap >= n)
    if bool(bad.any()):
        raise ValueError(f"kernel map entries must be -1 or row indices below {n} ({what})")


def _pairs(nbmap: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out_rows, in_rows)`` of the active entries of column ``k`` (int64)."""
    column = nbmap[:, k].long()
    out_rows = (column >= 0).nonzero().squeeze(1)
    return out_rows, column[out_rows]


def conv_forward_reference(
    feats: torch.Tensor, weight: torch.Tensor, nbmap: torch.Tensor, num_out: int, transposed: bool = False
) -> torch.Tensor:
    """Sparse convolution over a kernel map.

    ``transposed=False``: ``out[o] = sum_k feats[nbmap[o, k]] @ weight[k]``.
    ``transposed=True`` (the map read backwards): ``out[nbmap[o, k]] += feats[o] @ weight[k]``.

    Args:
        feats: ``[N_in, C_in]`` (``[M, C_in]`` when transposed).
        weight: ``[K, C_in, C_out]``.
        nbmap: int32 ``[M, K]``.
        num_out: output rows (``M`` when not transposed).
        transposed: read the map backwards.

    Returns:
        ``[num_out, C_out]``.
    """
    m, kvol = nbmap.shape
    if transposed:
        _check_map(nbmap, num_out, "conv_forward, transposed: entries index the output")
        if feats.shape[0] != m:
            raise ValueError(f"transposed map has {m} rows but features have {feats.shape[0]}")
    else:
        _check_map(nbmap, feats.shape[0], "conv_forward: entries index the features")
        if num_out != m:
            raise ValueError(f"num_out = {num_out} but the kernel map has {m} rows")
    out = feats.new_zeros((num_out, weight.shape[2]))
    for k in range(kvol):
        out_rows, in_rows = _pairs(nbmap, k)
        if transposed:
            out = out.index_add(0, in_rows, feats[out_rows] @ weight[k])
        else:
            out = out.index_add(0, out_rows, feats[in_rows] @ weight[k])
    return out


def conv_input_grad_reference(
    grad_out: torch.Tensor, weight: torch.Tensor, nbmap: torch.Tensor, num_in: int, transposed: bool = False
) -> torch.Tensor:
    """Gradient of :func:`conv_forward_reference` with respect to ``feats``.

    Args:
        grad_out: ``[num_out, C_out]``.
        weight: ``[K, C_in, C_out]``.
        nbmap: int32 ``[M, K]``.
        num_in: rows of ``feats`` (``M`` when transposed).
        transposed: as in the forward call.

    Returns:
        ``[num_in, C_in]``.
    """
    m, kvol = nbmap.shape
    _check_map(nbmap, grad_out.shape[0] if transposed else num_in, "conv_input_grad")
    grad = grad_out.new_zeros((num_in, weight.shape[1]))
    for k in range(kvol):
        out_rows, in_rows = _pairs(nbmap, k)
        if transposed:  # feats row o contributed to output row nbmap[o, k]
            grad = grad.index_add(0, out_rows, grad_out[in_rows] @ weight[k].t())
        else:  # feats row nbmap[o, k] contributed to output row o
            grad = grad.index_add(0, in_rows, grad_out[out_rows] @ weight[k].t())
    return grad


def conv_weight_grad_reference(
    feats: torch.Tensor, grad_out: torch.Tensor, nbmap: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """Gradient of :func:`conv_forward_reference` with respect to ``weight``.

    Args:
        feats: forward input ``[N_in, C_in]`` (``[M, C_in]`` when transposed).
        grad_out: ``[num_out, C_out]``.
        nbmap: int32 ``[M, K]``.
        transposed: as in the forward call.

    Returns:
        ``[K, C_in, C_out]``: ``grad[k] = sum over pairs (i -> o) of offset k of feats[i]^T grad_out[o]``.
    """
    m, kvol = nbmap.shape
    _check_map(nbmap, grad_out.shape[0] if transposed else feats.shape[0], "conv_weight_grad")
    per_offset = []
    for k in range(kvol):
        out_rows, in_rows = _pairs(nbmap, k)
        if transposed:
            per_offset.append(feats[out_rows].t() @ grad_out[in_rows])
        else:
            per_offset.append(feats[in_rows].t() @ grad_out[out_rows])
    if not per_offset:
        return feats.new_zeros((0, feats.shape[1], grad_out.shape[1]))
    return torch.stack(per_offset)


# --------------------------------------------------------------------------
# Pooling.
# --------------------------------------------------------------------------
def _gather_or_zero(feats: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """``feats[column]`` with rows of ``-1`` entries set to zero (works for empty ``feats``)."""
    padded = torch.cat([feats, feats.new_zeros((1, feats.shape[1]))])
    index = torch.where(column >= 0, column.long(), feats.shape[0])
    return padded[index]


def maxpool_forward_reference(feats: torch.Tensor, nbmap: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max over the active inputs of each output row.

    Ties go to the first input in offset order; a NaN input wins and stays
    (as ``torch.max_pool3d``).  An output with no active input gives 0 with
    argmax ``-1``.

    Args:
        feats: ``[N, C]``.
        nbmap: int32 ``[M, K]``.

    Returns:
        ``(out, argmax)``: ``[M, C]`` and int64 ``[M, C]`` (the winning input row).
    """
    _check_map(nbmap, feats.shape[0], "maxpool_forward")
    m, kvol = nbmap.shape
    out = feats.new_zeros((m, feats.shape[1]))
    argmax = torch.full((m, feats.shape[1]), -1, dtype=torch.int64, device=feats.device)
    for k in range(kvol):
        column = nbmap[:, k].long()
        cand = _gather_or_zero(feats, column)
        active = (column >= 0).unsqueeze(1)
        take = active & ((argmax < 0) | (cand > out) | (cand.isnan() & ~out.isnan()))
        out = torch.where(take, cand, out)
        argmax = torch.where(take, column.unsqueeze(1).expand_as(argmax), argmax)
    return out, argmax


def maxpool_backward_reference(grad_out: torch.Tensor, argmax: torch.Tensor, num_in: int) -> torch.Tensor:
    """Gradient of :func:`maxpool_forward_reference`: ``grad_out[o, c]`` goes to row ``argmax[o, c]``.

    Args:
        grad_out: ``[M, C]``.
        argmax: int64 ``[M, C]`` (``-1`` = no input).
        num_in: rows of the pooled features.

    Returns:
        ``[num_in, C]``.
    """
    if bool(((argmax < -1) | (argmax >= num_in)).any()):
        raise ValueError(f"argmax entries must be -1 or below num_in = {num_in}")
    active = argmax >= 0
    grad = grad_out.new_zeros((num_in, grad_out.shape[1]))
    if num_in == 0:
        return grad
    return grad.scatter_add(0, argmax.clamp_min(0), torch.where(active, grad_out, torch.zeros_like(grad_out)))


def _avg_divisor(nbmap: torch.Tensor, count_inactive: bool, dtype: torch.dtype) -> torch.Tensor:
    """``[M, 1]`` divisor of each output row: ``K``, or its number of active inputs (at least 1)."""
    if count_inactive:
        count = torch.full((nbmap.shape[0],), nbmap.shape[1], device=nbmap.device)
    else:
        count = (nbmap >= 0).sum(dim=1).clamp_min(1)
    return count.to(dtype).unsqueeze(1)


def avgpool_forward_reference(feats: torch.Tensor, nbmap: torch.Tensor, count_inactive: bool = False) -> torch.Tensor:
    """Mean of the active inputs of each output row (divided by ``K`` when ``count_inactive``).

    An output with no active input gives 0.

    Args:
        feats: ``[N, C]``.
        nbmap: int32 ``[M, K]``.
        count_inactive: divide by the kernel volume ``K`` instead of the number of active inputs.

    Returns:
        ``[M, C]``.
    """
    _check_map(nbmap, feats.shape[0], "avgpool_forward")
    total = feats.new_zeros((nbmap.shape[0], feats.shape[1]))
    for k in range(nbmap.shape[1]):
        total = total + _gather_or_zero(feats, nbmap[:, k])
    return total / _avg_divisor(nbmap, count_inactive, feats.dtype)


def avgpool_backward_reference(
    grad_out: torch.Tensor, nbmap: torch.Tensor, num_in: int, count_inactive: bool = False
) -> torch.Tensor:
    """Gradient of :func:`avgpool_forward_reference` with respect to ``feats``.

    Args:
        grad_out: ``[M, C]``.
        nbmap: int32 ``[M, K]``.
        num_in: rows of the pooled features.
        count_inactive: as in the forward call.

    Returns:
        ``[num_in, C]``.
    """
    _check_map(nbmap, num_in, "avgpool_backward")
    scaled = grad_out / _avg_divisor(nbmap, count_inactive, grad_out.dtype)
    grad = grad_out.new_zeros((num_in, grad_out.shape[1]))
    for k in range(nbmap.shape[1]):
        out_rows, in_rows = _pairs(nbmap, k)
        grad = grad.index_add(0, in_rows, scaled[out_rows])
    return grad


# --------------------------------------------------------------------------
# Voxelization.
# --------------------------------------------------------------------------
def voxelize_reference(
    points: torch.Tensor,
    batch,
    voxel_size: Sequence[float],
    lower: Sequence[float],
    grid: Sequence[int],
    batch_size: int,
    max_points: int = -1,
    max_voxels: int = -1,
    reduce: str = "mean",
    order_by_first: bool = False,
):
    """Reference of :func:`sparseconv.ops.voxelize` (``csrc/voxelize.h``), with a stable sort.

    Returns:
        ``(coords [V, 4] int32, feats [V, F], point_voxel [N] int64, counts [V] int32, drops [4] int64)``,
        with ``feats`` ``[V, max_points, C]`` for ``"pad"``.
    """
    n, c = points.shape
    dt, dev = points.dtype, points.device
    lo = torch.tensor([float(v) for v in lower], dtype=dt, device=dev)
    vs = torch.tensor([float(v) for v in voxel_size], dtype=dt, device=dev)
    xyz = points[:, :3]
    finite = torch.isfinite(xyz).all(1)
    q = torch.floor((xyz - lo) / vs)  # in the points' dtype, as the op
    g = torch.tensor([int(v) for v in grid], dtype=dt, device=dev)
    inside = finite & (q >= 0).all(1) & (q < g).all(1)
    b = torch.zeros(n, dtype=torch.int64, device=dev) if batch is None else batch.to(torch.int64)
    qi = torch.where(inside.unsqueeze(1), q, torch.zeros_like(q)).to(torch.int64)
    keys = coordinate_keys(torch.cat([b.unsqueeze(1), qi], 1), [batch_size, *grid])
    valid = inside.nonzero().flatten()
    skeys, order = torch.sort(keys[valid], stable=True)
    sidx = valid[order]  # points grouped by voxel, input order inside a voxel
    uniq, run_len = torch.unique_consecutive(skeys, return_counts=True)
    run_start = torch.cumsum(run_len, 0) - run_len
    first = sidx[run_start]
    runs = torch.argsort(first) if (order_by_first or (0 <= max_voxels < len(uniq))) else torch.arange(len(uniq))
    keep = runs[:max_voxels] if 0 <= max_voxels < len(uniq) else runs
    if not order_by_first:
        keep = torch.sort(keep).values
    row_of_run = torch.full((len(uniq),), -1, dtype=torch.int64, device=dev)
    row_of_run[keep] = torch.arange(len(keep), device=dev)
    run_of_sorted = torch.repeat_interleave(torch.arange(len(uniq), device=dev), run_len)
    rank = torch.arange(len(sidx), device=dev) - run_start[run_of_sorted]
    row = row_of_run[run_of_sorted]
    kept = (row >= 0) & ((rank < max_points) if max_points >= 0 else torch.ones_like(rank, dtype=torch.bool))
    point_voxel = torch.full((n,), -1, dtype=torch.int64, device=dev)
    point_voxel[sidx[kept]] = row[kept]
    nv = len(keep)
    counts = torch.bincount(row[kept], minlength=nv).to(torch.int32)
    pts, rows, ranks = points[sidx[kept]], row[kept], rank[kept]
    if reduce == "count":
        feats = counts.to(dt).unsqueeze(1)
    elif reduce == "pad":
        feats = points.new_zeros((nv, max_points, c))
        feats[rows, ranks] = pts
    elif reduce == "first":
        feats = points.new_zeros((nv, c))
        feats[rows[ranks == 0]] = pts[ranks == 0]
    elif reduce == "max":
        feats = points.new_zeros((nv, c)).index_reduce(0, rows, pts, "amax", include_self=False)
    else:
        feats = points.new_zeros((nv, c)).index_add(0, rows, pts)
        if reduce == "mean":
            feats = feats / counts.clamp_min(1).to(dt).unsqueeze(1)
    coords = _decode_keys(uniq[keep], [batch_size, *grid]).to(torch.int32)
    valid_total = len(sidx)
    over_points = int((row >= 0).sum()) - int(kept.sum())
    drops = torch.tensor([int((~finite).sum()), int((finite & ~inside).sum()),
                          valid_total - int((row >= 0).sum()), over_points], dtype=torch.int64)
    return coords, feats, point_voxel, counts, drops


def sparse_rows_mm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference of ``sparse_rows_mm``: the plain product ``a @ b`` (``[N, K] @ [K, M]``)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"sparse_rows_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    return a @ b


def window_attention_reference(qkv: torch.Tensor, offsets: torch.Tensor, heads: int, scale: float, index=None):
    """Reference of ``window_attention``: a loop over groups, plain softmax attention per group and head.

    ``qkv`` ``[N, 3C]`` rows ``[q | k | v]``; group ``g`` is rows ``index[offsets[g]:offsets[g + 1]]`` (consecutive
    rows when ``index`` is None).  Returns ``(out [N, C], lse [N, heads])`` with ``lse`` the log-sum-exp of each
    row's scaled scores, rows as in ``qkv``.
    """
    if index is not None:
        out, lse = window_attention_reference(qkv[index], offsets, heads, scale)
        return torch.empty_like(out).index_copy(0, index, out), torch.empty_like(lse).index_copy(0, index, lse)
    n, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    out = qkv.new_zeros((n, c))
    lse = qkv.new_zeros((n, heads))
    bounds = [int(v) for v in offsets.tolist()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        rows = qkv[a:b].view(b - a, 3, heads, d)
        q, k, v = rows[:, 0].transpose(0, 1), rows[:, 1].transpose(0, 1), rows[:, 2].transpose(0, 1)  # [h, n, d]
        scores = (q @ k.transpose(1, 2)) * scale
        lse[a:b] = torch.logsumexp(scores, dim=-1).t()
        out[a:b] = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(b - a, c)
    return out, lse
