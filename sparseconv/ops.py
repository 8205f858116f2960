"""Low-level custom operators of sparseconv (``torch.ops.sparseconv.*``).

The schemas are defined once in C++ (``csrc/sparseconv.cpp``) with
``TORCH_LIBRARY``; CPU kernels live in ``csrc/cpu`` and CUDA kernels in
``csrc/cuda``.  This module registers, from Python, the fake (meta) kernels
used by ``torch.compile``/``torch.export`` and the autograd formulas, and
exposes thin typed wrappers.  Every op has a pure-PyTorch twin in
:mod:`sparseconv.reference`.

Kernel maps (``nbmap``) are int32 ``[M, K]`` tensors: ``nbmap[o, k]`` is the
input row that kernel offset ``k`` of output row ``o`` reads, or ``-1``.
Offsets are enumerated x-major: ``k = (kx * KY + ky) * KZ + kz``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (loads the operator library)

__all__ = [
    "hash_build",
    "hash_query",
    "kmap_submanifold",
    "kmap_strided",
    "conv_forward",
    "conv_input_grad",
    "conv_weight_grad",
    "maxpool_forward",
    "maxpool_backward",
    "avgpool_forward",
    "avgpool_backward",
    "voxelize",
    "sparse_rows_mm",
    "window_attention",
    "OP_NAMES",
]

_ops = torch.ops.sparseconv

#: Names of every operator in the ``sparseconv`` namespace.
OP_NAMES = (
    "hash_build",
    "hash_query",
    "kmap_submanifold",
    "kmap_strided",
    "conv_forward",
    "conv_input_grad",
    "conv_weight_grad",
    "maxpool_forward",
    "maxpool_backward",
    "avgpool_forward",
    "avgpool_backward",
    "voxelize",
    "sparse_rows_mm",
    "window_attention",
    "window_attention_backward",
)


# --------------------------------------------------------------------------
# Fake kernels (shapes only), for torch.compile / export / opcheck.
# --------------------------------------------------------------------------
def _kernel_volume(kernel_size: Sequence[int]) -> int:
    return int(kernel_size[0]) * int(kernel_size[1]) * int(kernel_size[2])


@torch.library.register_fake("sparseconv::hash_build")
def _hash_build_fake(coords, shape):
    cap = torch.library.get_ctx().new_dynamic_size()
    return coords.new_empty((cap,), dtype=torch.int64), coords.new_empty((cap,), dtype=torch.int64)


@torch.library.register_fake("sparseconv::hash_query")
def _hash_query_fake(keys, values, queries, shape):
    return queries.new_empty((queries.shape[0],), dtype=torch.int64)


@torch.library.register_fake("sparseconv::kmap_submanifold")
def _kmap_submanifold_fake(keys, values, coords, shape, kernel_size, dilation):
    return coords.new_empty((coords.shape[0], _kernel_volume(kernel_size)), dtype=torch.int32)


@torch.library.register_fake("sparseconv::kmap_strided")
def _kmap_strided_fake(coords, shape, out_spatial, kernel_size, stride, padding, dilation, transposed):
    m = torch.library.get_ctx().new_dynamic_size()
    return coords.new_empty((m, 4)), coords.new_empty((m, _kernel_volume(kernel_size)), dtype=torch.int32)


@torch.library.register_fake("sparseconv::conv_forward")
def _conv_forward_fake(feats, weight, nbmap, num_out, transposed):
    torch._check(weight.dim() == 3)
    torch._check(weight.shape[1] == feats.shape[1])
    return feats.new_empty((num_out, weight.shape[2]))


@torch.library.register_fake("sparseconv::conv_input_grad")
def _conv_input_grad_fake(grad_out, weight, nbmap, num_in, transposed):
    return grad_out.new_empty((num_in, weight.shape[1]))


@torch.library.register_fake("sparseconv::conv_weight_grad")
def _conv_weight_grad_fake(feats, grad_out, nbmap, transposed):
    return feats.new_empty((nbmap.shape[1], feats.shape[1], grad_out.shape[1]))


@torch.library.register_fake("sparseconv::maxpool_forward")
def _maxpool_forward_fake(feats, nbmap):
    shape = (nbmap.shape[0], feats.shape[1])
    return feats.new_empty(shape), feats.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("sparseconv::maxpool_backward")
def _maxpool_backward_fake(grad_out, argmax, num_in):
    return grad_out.new_empty((num_in, grad_out.shape[1]))


@torch.library.register_fake("sparseconv::avgpool_forward")
def _avgpool_forward_fake(feats, nbmap, count_inactive):
    return feats.new_empty((nbmap.shape[0], feats.shape[1]))


@torch.library.register_fake("sparseconv::avgpool_backward")
def _avgpool_backward_fake(grad_out, nbmap, num_in, count_inactive):
    return grad_out.new_empty((num_in, grad_out.shape[1]))


@torch.library.register_fake("sparseconv::voxelize")
def _voxelize_fake(points, batch, voxel_size, lower, grid, batch_size, max_points, max_voxels, reduce, order_by_first):
    v = torch.library.get_ctx().new_dynamic_size()
    n = points.shape[0]
    c = points.shape[1]
    return (
        points.new_empty((v, 4), dtype=torch.int32),
        points.new_empty((v, max_points, c) if reduce == "pad" else (v, 1 if reduce == "count" else c)),
        points.new_empty((n,), dtype=torch.int64),
        points.new_empty((v,), dtype=torch.int32),
        points.new_empty((4,), dtype=torch.int64),
    )


# --------------------------------------------------------------------------
# Autograd formulas.
# --------------------------------------------------------------------------
def _conv_setup(ctx, inputs, output):
    feats, weight, nbmap, _num_out, transposed = inputs
    ctx.save_for_backward(feats, weight, nbmap)
    ctx.transposed = transposed


def _conv_backward(ctx, grad):
    feats, weight, nbmap = ctx.saved_tensors
    grad_feats = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_feats = _ops.conv_input_grad(grad, weight, nbmap, feats.shape[0], ctx.transposed)
    if ctx.needs_input_grad[1]:
        grad_weight = _ops.conv_weight_grad(feats, grad, nbmap, ctx.transposed)
    return grad_feats, grad_weight, None, None, None


torch.library.register_autograd("sparseconv::conv_forward", _conv_backward, setup_context=_conv_setup)


# The backward ops are linear in each argument, so they are differentiable too (double backward).
def _conv_input_grad_setup(ctx, inputs, output):
    grad_out, weight, nbmap, _num_in, transposed = inputs
    ctx.save_for_backward(grad_out, weight, nbmap)
    ctx.transposed = transposed


def _conv_input_grad_backward(ctx, gg):
    # conv_input_grad(g, W, map, n, t) == conv_forward(g, W^T, map, n, not t)
    grad_out, weight, nbmap = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = _ops.conv_forward(gg, weight, nbmap, grad_out.shape[0], ctx.transposed)
    if ctx.needs_input_grad[1]:
        d_weight = _ops.conv_weight_grad(gg, grad_out, nbmap, ctx.transposed)
    return d_grad, d_weight, None, None, None


torch.library.register_autograd(
    "sparseconv::conv_input_grad", _conv_input_grad_backward, setup_context=_conv_input_grad_setup
)


def _conv_weight_grad_setup(ctx, inputs, output):
    feats, grad_out, nbmap, transposed = inputs
    ctx.save_for_backward(feats, grad_out, nbmap)
    ctx.transposed = transposed


def _conv_weight_grad_backward(ctx, gw):
    # <gw, conv_weight_grad(f, g)> = <conv_forward(f, gw), g> = <f, conv_input_grad(g, gw)>
    feats, grad_out, nbmap = ctx.saved_tensors
    d_feats = d_grad = None
    if ctx.needs_input_grad[0]:
        d_feats = _ops.conv_input_grad(grad_out, gw, nbmap, feats.shape[0], ctx.transposed)
    if ctx.needs_input_grad[1]:
        d_grad = _ops.conv_forward(feats, gw, nbmap, grad_out.shape[0], ctx.transposed)
    return d_feats, d_grad, None, None


torch.library.register_autograd(
    "sparseconv::conv_weight_grad", _conv_weight_grad_backward, setup_context=_conv_weight_grad_setup
)


def _maxpool_setup(ctx, inputs, output):
    feats, _nbmap = inputs
    ctx.save_for_backward(output[1])
    ctx.num_in = feats.shape[0]


def _maxpool_backward(ctx, grad, _grad_argmax):
    (argmax,) = ctx.saved_tensors
    return _ops.maxpool_backward(grad, argmax, ctx.num_in), None


torch.library.register_autograd("sparseconv::maxpool_forward", _maxpool_backward, setup_context=_maxpool_setup)


def _maxpool_backward_setup(ctx, inputs, output):
    _grad, argmax, _num_in = inputs
    ctx.save_for_backward(argmax)


def _maxpool_backward_backward(ctx, gg):
    # Adjoint of the scatter to argmax: a gather from argmax (0 where there is no input).
    (argmax,) = ctx.saved_tensors
    picked = gg.gather(0, argmax.clamp_min(0))
    return torch.where(argmax >= 0, picked, torch.zeros_like(picked)), None, None


torch.library.register_autograd(
    "sparseconv::maxpool_backward", _maxpool_backward_backward, setup_context=_maxpool_backward_setup
)


def _avgpool_setup(ctx, inputs, output):
    feats, nbmap, count_inactive = inputs
    ctx.save_for_backward(nbmap)
    ctx.num_in = feats.shape[0]
    ctx.count_inactive = count_inactive


def _avgpool_backward(ctx, grad):
    (nbmap,) = ctx.saved_tensors
    return _ops.avgpool_backward(grad, nbmap, ctx.num_in, ctx.count_inactive), None, None


torch.library.register_autograd("sparseconv::avgpool_forward", _avgpool_backward, setup_context=_avgpool_setup)


def _avgpool_backward_setup(ctx, inputs, output):
    _grad, nbmap, _num_in, count_inactive = inputs
    ctx.save_for_backward(nbmap)
    ctx.count_inactive = count_inactive


def _avgpool_backward_backward(ctx, gg):
    # avgpool_backward is the transpose of the linear map avgpool_forward.
    (nbmap,) = ctx.saved_tensors
    return _ops.avgpool_forward(gg, nbmap, ctx.count_inactive), None, None, None


torch.library.register_autograd(
    "sparseconv::avgpool_backward", _avgpool_backward_backward, setup_context=_avgpool_backward_setup
)


@torch.library.register_fake("sparseconv::sparse_rows_mm")
def _sparse_rows_mm_fake(a, b):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "sparseconv.sparse_rows_mm: a and b must be 2-D")
    torch._check(a.shape[1] == b.shape[0], lambda: "sparseconv.sparse_rows_mm: the inner sizes differ")
    return a.new_empty((a.shape[0], b.shape[1]))


def _sparse_rows_mm_setup(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a, b)


def _sparse_rows_mm_backward(ctx, grad):
    # out = a @ b; the gradients are dense products (the zeros of a need no special case: for a
    # ReLU/top-k hidden layer the activation's own backward masks grad_a).
    a, b = ctx.saved_tensors
    grad_a = grad @ b.t() if ctx.needs_input_grad[0] else None
    grad_b = a.t() @ grad if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


torch.library.register_autograd(
    "sparseconv::sparse_rows_mm", _sparse_rows_mm_backward, setup_context=_sparse_rows_mm_setup
)


@torch.library.register_fake("sparseconv::window_attention")
def _window_attention_fake(x, weight, bias, proj_weight, proj_bias, offsets, index, heads, scale):
    torch._check(x.dim() == 2 and weight.dim() == 2 and heads >= 1 and weight.shape[0] % (3 * heads) == 0,
                 lambda: "sparseconv.window_attention: weight must be [3 * C, C_in] with C divisible by heads")
    n = x.shape[0]
    return x.new_empty((n, proj_weight.shape[0])), x.new_empty((n, weight.shape[0] // 3)), x.new_empty((n, heads))


@torch.library.register_fake("sparseconv::window_attention_backward")
def _window_attention_backward_fake(grad_out, x, weight, bias, out, lse, offsets, index, heads, scale):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _window_attention_setup(ctx, inputs, output):
    x, weight, bias, proj_weight, proj_bias, offsets, index, heads, scale = inputs
    _, out, lse = output
    ctx.heads, ctx.scale = heads, scale
    ctx.has_bias, ctx.has_proj_bias = bias is not None, proj_bias is not None
    ctx.save_for_backward(x, weight, bias, proj_weight, offsets, index, out, lse)


def _window_attention_backward(ctx, grad_y, grad_out, grad_lse):
    # out (the attended rows before the output projection) and lse are auxiliary outputs for the backward;
    # a gradient reaching out directly is added, lse's is not propagated (it must be unused).
    x, weight, bias, proj_weight, offsets, index, out, lse = ctx.saved_tensors
    grad_att = grad_y @ proj_weight  # y = out @ proj_weight^T + proj_bias
    if grad_out is not None:
        grad_att = grad_att + grad_out
    grad_pw = grad_y.t() @ out if ctx.needs_input_grad[3] else None
    grad_pb = grad_y.sum(0) if ctx.has_proj_bias and ctx.needs_input_grad[4] else None
    grad_x = grad_w = grad_b = None
    if any(ctx.needs_input_grad[:3]):
        grad_qkv = _ops.window_attention_backward(grad_att.contiguous(), x, weight, bias, out, lse, offsets, index,
                                                  ctx.heads, ctx.scale)
        # qkv = x @ weight^T + bias
        grad_x = grad_qkv @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_qkv.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad_qkv.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, grad_pw, grad_pb, None, None, None, None


torch.library.register_autograd(
    "sparseconv::window_attention", _window_attention_backward, setup_context=_window_attention_setup
)


def _window_attention_backward_setup(ctx, inputs, output):
    pass


def _window_attention_double_backward(ctx, gg):
    raise NotImplementedError("sparseconv.window_attention: double backward (gradients of gradients) is not "
                              "implemented")


torch.library.register_autograd(
    "sparseconv::window_attention_backward", _window_attention_double_backward,
    setup_context=_window_attention_backward_setup,
)


def _padded_attention(qkv: torch.Tensor, offsets: torch.Tensor, heads: int, scale: float, topk: Optional[int] = None):
    """Attention within consecutive groups of ``qkv`` rows, batched over groups padded to powers of two (key mask).

    With ``topk``, only the ``topk`` largest scores of each query are kept (ties with the ``topk``-th kept too) --
    the top-k path of :class:`sparseconv.nn.SparseWindowAttention`.  Returns ``(out [N, C], lse [N, heads])``.
    """
    n, c = qkv.shape[0], qkv.shape[1] // 3
    d = c // heads
    out = qkv.new_zeros((n, c))
    lse = qkv.new_zeros((n, heads))
    sizes = offsets[1:] - offsets[:-1]
    if n == 0 or sizes.numel() == 0:
        return out, lse
    group = torch.repeat_interleave(torch.arange(sizes.numel(), device=qkv.device), sizes)
    pos = torch.arange(n, device=qkv.device) - offsets[:-1].index_select(0, group)
    padded = torch.where(sizes > 0, 2 ** torch.ceil(torch.log2(sizes.clamp_min(1).double())).long(), 0)
    padded_of_row = padded.index_select(0, group)
    for p in torch.unique(padded[sizes > 0]).tolist():
        groups_p = (padded == p).nonzero().squeeze(1)
        local = torch.full((sizes.numel(),), -1, dtype=torch.long, device=qkv.device)
        local[groups_p] = torch.arange(groups_p.numel(), device=qkv.device)
        rows = (padded_of_row == p).nonzero().squeeze(1)
        slot = local.index_select(0, group.index_select(0, rows)) * p + pos.index_select(0, rows)
        g = groups_p.numel()
        buf = qkv.new_zeros((g * p, 3 * c)).index_copy(0, slot, qkv.index_select(0, rows))
        buf = buf.view(g, p, 3, heads, d).permute(2, 0, 3, 1, 4)  # [3, G, heads, P, d]
        valid = torch.zeros(g * p, dtype=torch.bool, device=qkv.device)
        valid[slot] = True
        scores = (buf[0] @ buf[1].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~valid.view(g, 1, 1, p), float("-inf"))
        if topk is not None:
            kth = scores.topk(min(topk, p), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [G, heads, P]
        o = torch.exp(scores - row_lse.unsqueeze(-1)) @ buf[2]
        out = out.index_copy(0, rows, o.permute(0, 2, 1, 3).reshape(g * p, c).index_select(0, slot))
        lse = lse.index_copy(0, rows, row_lse.permute(0, 2, 1).reshape(g * p, heads).index_select(0, slot))
    return out, lse


def _padded_window_attention(x, weight, bias, proj_weight, proj_bias, offsets, index, heads: int, scale: float):
    """``window_attention`` by the projection, batched dense attention over groups padded to powers of two,
    and the output projection.

    The CUDA kernel of the op (batched products suit the GPU); it runs on any device and floating dtype.
    """
    _check_window_attention(x, weight, offsets, index, heads)
    qkv = torch.nn.functional.linear(x, weight, bias)
    if index is None:
        out, lse = _padded_attention(qkv, offsets, heads, scale)
    else:
        out, lse = _padded_attention(qkv.index_select(0, index), offsets, heads, scale)
        out, lse = torch.empty_like(out).index_copy(0, index, out), torch.empty_like(lse).index_copy(0, index, lse)
    return torch.nn.functional.linear(out, proj_weight, proj_bias), out, lse


def _check_window_attention(x, weight, offsets, index, heads: int) -> None:
    """The CPU kernel's argument checks (csrc/cpu/window_attention_cpu.cpp), for the Python kernels."""
    op = "sparseconv.window_attention"
    if heads < 1:
        raise ValueError(f"{op}: heads must be >= 1, got {heads}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [N, C_in], got shape {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] % (3 * heads):
        raise ValueError(f"{op}: weight must be [3 * C, C_in] = [3 * C, {x.shape[1]}] with C divisible by heads "
                         f"({heads}), got shape {list(weight.shape)}")
    n = x.shape[0]
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64:
        raise ValueError(f"{op}: offsets must be a 1-D int64 tensor [G + 1], got {offsets.dtype} of shape "
                         f"{list(offsets.shape)}")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != n:
        raise ValueError(f"{op}: offsets must start at 0 and end at N = {n}, got {first} and {last}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{op}: offsets must be non-decreasing")
    if index is not None:
        if index.dim() != 1 or index.numel() != n or index.dtype != torch.int64:
            raise ValueError(f"{op}: index must be a 1-D int64 permutation of the {n} rows, got {index.dtype} of "
                             f"shape {list(index.shape)}")
        if n and (int(index.min()) < 0 or int(index.max()) >= n
                  or bool((torch.bincount(index, minlength=n) != 1).any())):
            raise ValueError(f"{op}: index must be a permutation of [0, {n})")


def _padded_window_attention_backward(grad_out, x, weight, bias, out, lse, offsets, index, heads, scale):
    _check_window_attention(x, weight, offsets, index, heads)
    qkv = torch.nn.functional.linear(x, weight, bias).detach().requires_grad_(True)
    with torch.enable_grad():
        sorted_qkv = qkv if index is None else qkv.index_select(0, index)
        o, _ = _padded_attention(sorted_qkv, offsets, heads, scale)
        if index is not None:
            o = torch.empty_like(o).index_copy(0, index, o)
        (grad,) = torch.autograd.grad(o, qkv, grad_out)
    return grad


# CUDA: the padded batched path (no hand-written CUDA kernel for this op yet).
torch.library.register_kernel("sparseconv::window_attention", "cuda", _padded_window_attention)
torch.library.register_kernel("sparseconv::window_attention_backward", "cuda", _padded_window_attention_backward)


# --------------------------------------------------------------------------
# Typed wrappers.
# --------------------------------------------------------------------------
def _triple(v: Sequence[int]) -> list:
    return [int(e) for e in v]


def hash_build(coords: torch.Tensor, shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Builds the coordinate hash table of ``coords`` (int32 ``[N, 4]``) on the grid ``shape = [B, X, Y, Z]``.

    Raises:
        ValueError: a coordinate lies outside the grid, or occurs twice.
    """
    return _ops.hash_build(coords, [int(s) for s in shape])


def hash_query(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row of each query coordinate in the table built by :func:`hash_build`, ``-1`` if absent (int64 ``[M]``)."""
    return _ops.hash_query(keys, values, queries, [int(s) for s in shape])


def kmap_submanifold(keys, values, coords, shape, kernel_size, dilation) -> torch.Tensor:
    """Submanifold kernel map ``[N, K]`` of ``coords`` (output sites = input sites)."""
    return _ops.kmap_submanifold(keys, values, coords, [int(s) for s in shape], _triple(kernel_size), _triple(dilation))


def kmap_strided(coords, shape, out_spatial, kernel_size, stride, padding, dilation, transposed: bool):
    """Output coordinates ``[M, 4]`` and kernel map ``[M, K]`` of a (transposed) strided convolution."""
    return _ops.kmap_strided(
        coords,
        [int(s) for s in shape],
        _triple(out_spatial),
        _triple(kernel_size),
        _triple(stride),
        _triple(padding),
        _triple(dilation),
        bool(transposed),
    )


def conv_forward(feats, weight, nbmap, num_out: int, transposed: bool = False) -> torch.Tensor:
    """Gather-GEMM-scatter convolution over a kernel map; differentiable in ``feats`` and ``weight``."""
    return _ops.conv_forward(feats, weight, nbmap, num_out, bool(transposed))


def conv_input_grad(grad_out, weight, nbmap, num_in: int, transposed: bool = False) -> torch.Tensor:
    """Gradient of :func:`conv_forward` with respect to its features."""
    return _ops.conv_input_grad(grad_out, weight, nbmap, num_in, bool(transposed))


def conv_weight_grad(feats, grad_out, nbmap, transposed: bool = False) -> torch.Tensor:
    """Gradient of :func:`conv_forward` with respect to its weight (``[K, C_in, C_out]``)."""
    return _ops.conv_weight_grad(feats, grad_out, nbmap, bool(transposed))


def maxpool_forward(feats, nbmap):
    """Max over the active inputs of each output row; returns ``(out, argmax)``."""
    return _ops.maxpool_forward(feats, nbmap)


def maxpool_backward(grad_out, argmax, num_in: int):
    return _ops.maxpool_backward(grad_out, argmax, num_in)


def avgpool_forward(feats, nbmap, count_inactive: bool = False):
    """Mean over the active inputs (or over all ``K`` offsets when ``count_inactive``)."""
    return _ops.avgpool_forward(feats, nbmap, bool(count_inactive))


def avgpool_backward(grad_out, nbmap, num_in: int, count_inactive: bool = False):
    return _ops.avgpool_backward(grad_out, nbmap, num_in, bool(count_inactive))


def sparse_rows_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a row-sparse ``a`` ``[N, K]`` (mostly zeros) and dense ``b`` ``[K, M]`` (``csrc/sparse_mm.h``).

    On the CPU in float32 the work scales with the non-zeros of ``a`` (the second projection of an
    activation-sparse FFN); elsewhere it is ``torch.mm``.  Differentiable in both arguments.
    """
    return _ops.sparse_rows_mm(a, b)


def window_attention(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
                     proj_bias: Optional[torch.Tensor], offsets: torch.Tensor, heads: int, scale: float,
                     index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention within groups of rows, qkv and output projections fused in (``csrc/window_attention.h``).

    Args:
        x: ``[N, C_in]`` features.
        weight, bias: the qkv projection ``[3C, C_in]`` and ``[3C]`` (or ``None``), as ``nn.Linear``; the
            projected rows are ``[q | k | v]`` with ``C = heads * d``.
        proj_weight, proj_bias: the output projection ``[C_out, C]`` and ``[C_out]`` (or ``None``).
        offsets: int64 ``[G + 1]``: group ``g`` is rows ``index[offsets[g]:offsets[g + 1]]``.
        heads: attention heads.
        scale: score scale (usually ``d ** -0.5``).
        index: int64 ``[N]`` permutation of the rows (``None``: the identity, groups of consecutive rows).

    Returns:
        ``y [N, C_out]`` (rows as in ``x``), differentiable in the features and all four projection tensors.

    Example:
        >>> x, w, pw = torch.randn(7, 5), torch.randn(3 * 8, 5), torch.randn(8, 8)
        >>> y = window_attention(x, w, None, pw, None, torch.tensor([0, 3, 7]), heads=2, scale=0.5)  # rows 0-2, 3-6
    """
    y, _, _ = _ops.window_attention(x, weight, bias, proj_weight, proj_bias, offsets, index, int(heads), float(scale))
    return y


def voxelize(points, batch, voxel_size, lower, grid, batch_size: int, max_points: int = -1, max_voxels: int = -1,
             reduce: str = "mean", order_by_first: bool = False):
    """Raw voxelization op (``csrc/voxelize.h``); see :func:`sparseconv.voxelize` for the user-facing API.

    Returns ``(coords, feats, point_voxel, counts, drops)``.
    """
    return _ops.voxelize(points, batch, list(map(float, voxel_size)), list(map(float, lower)), list(map(int, grid)),
                         int(batch_size), int(max_points), int(max_voxels), str(reduce), bool(order_by_first))
