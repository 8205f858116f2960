"""Functional forms of the sparse layers.

Every function takes and returns :class:`~sparseconv.SparseTensor` (global
pools return dense ``[B, C]``).  Convolution weights are ``[K, C_in, C_out]``
with kernel offsets enumerated x-major, ``k = (kx * KY + ky) * KZ + kz``; for
a dense ``conv3d`` weight ``w`` of shape ``[C_out, C_in, KX, KY, KZ]`` the
equivalent is ``w.permute(2, 3, 4, 1, 0).reshape(K, C_in, C_out)``, and for a
``conv_transpose3d`` weight ``[C_in, C_out, KX, KY, KZ]`` it is
``w.permute(2, 3, 4, 0, 1).reshape(K, C_in, C_out)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..tensor import IntOr3, SparseTensor, _as_triple

__all__ = [
    "submanifold_conv3d",
    "sparse_conv3d",
    "sparse_inverse_conv3d",
    "sparse_conv_transpose3d",
    "sparse_max_pool3d",
    "sparse_avg_pool3d",
    "global_max_pool",
    "global_avg_pool",
    "group_norm",
    "dense_weight_to_sparse",
]


def dense_weight_to_sparse(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Converts a dense ``conv3d`` (or ``conv_transpose3d``) weight to the ``[K, C_in, C_out]`` layout."""
    if weight.dim() != 5:
        raise ValueError(f"expected a 5-D dense convolution weight, got shape {tuple(weight.shape)}")
    k = weight.shape[2] * weight.shape[3] * weight.shape[4]
    if transposed:
        return weight.permute(2, 3, 4, 0, 1).reshape(k, weight.shape[0], weight.shape[1])
    return weight.permute(2, 3, 4, 1, 0).reshape(k, weight.shape[1], weight.shape[0])


def _check_input(x, layer: str) -> None:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{layer} expects a sparseconv.SparseTensor, got {type(x).__name__}")


def _check_conv(x, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel_size, layer: str) -> None:
    _check_input(x, layer)
    k = kernel_size[0] * kernel_size[1] * kernel_size[2]
    if weight.dim() != 3 or weight.shape[0] != k:
        raise ValueError(
            f"{layer}: weight must be [K={k}, C_in, C_out] for kernel_size {kernel_size}, got {tuple(weight.shape)}"
        )
    if x.num_channels != weight.shape[1]:
        raise ValueError(
            f"{layer} expects {weight.shape[1]} input channels, got a SparseTensor with {x.num_channels} channels"
        )
    if x.device != weight.device:
        raise ValueError(f"{layer}: input is on {x.device} but the weight is on {weight.device}; move them to one device")
    if x.dtype != weight.dtype:
        raise TypeError(f"{layer}: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[2],)):
        raise ValueError(f"{layer}: bias must be [{weight.shape[2]}], got {tuple(bias.shape)}")


def _finish(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return out if bias is None else out + bias


def _geometry(kernel_size, stride, padding, dilation):
    """``(kernel_size, stride, padding, dilation)`` as validated triples; ``stride=None`` means ``kernel_size``."""
    ks = _as_triple(kernel_size, "kernel_size")
    st = ks if stride is None else _as_triple(stride, "stride")
    return ks, st, _as_triple(padding, "padding", 0), _as_triple(dilation, "dilation")


def submanifold_conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    kernel_size: IntOr3 = 3,
    dilation: IntOr3 = 1,
    *,
    layer: str = "SubMConv3d",
) -> SparseTensor:
    """Submanifold convolution: output sites = input sites.

    Equals dense ``conv3d`` with stride 1 and padding ``dilation * (kernel_size // 2)``
    evaluated at the active sites (output grid cropped to the input grid).

    Args:
        x: input with ``C_in`` channels, ``N`` voxels.
        weight: ``[K, C_in, C_out]``.
        bias: ``[C_out]`` or ``None``.

    Returns:
        ``N`` voxels with ``C_out`` channels, same sites and kernel-map cache as ``x``.
    """
    ks = _as_triple(kernel_size, "kernel_size")
    dil = _as_triple(dilation, "dilation")
    _check_conv(x, weight, bias, ks, layer)
    cset = x.coordinate_set
    nbmap = cset.submanifold_map(ks, dil)
    out = ops.conv_forward(x.features, weight, nbmap, x.num_voxels, False)
    return SparseTensor._from_set(_finish(out, bias), cset)


def sparse_conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    kernel_size: IntOr3 = 3,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
    dilation: IntOr3 = 1,
    indice_key: Optional[str] = None,
    *,
    layer: str = "SparseConv3d",
) -> SparseTensor:
    """Regular (strided) sparse convolution with spconv's output sites.

    Output sites are the sites of the dense ``conv3d`` output grid that receive
    at least one active input; the output ``spatial_shape`` follows the dense
    formula ``(X + 2p - d (k - 1) - 1) // s + 1``.  Output rows are sorted by
    ``(batch, x, y, z)``.
    """
    ks, st, pad, dil = _geometry(kernel_size, stride, padding, dilation)
    _check_conv(x, weight, bias, ks, layer)
    rec = x.coordinate_set.strided(ks, st, pad, dil, False, indice_key=indice_key)
    out = ops.conv_forward(x.features, weight, rec.nbmap, rec.target.num_voxels, False)
    return SparseTensor._from_set(_finish(out, bias), rec.target)


def sparse_inverse_conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    kernel_size: IntOr3 = 3,
    indice_key: Optional[str] = None,
    *,
    layer: str = "SparseInverseConv3d",
) -> SparseTensor:
    """Inverse of a strided sparse convolution: restores exactly its input sites.

    Uses the kernel map of the convolution that produced ``x`` (or the one
    registered under ``indice_key``) read backwards; equals dense
    ``conv_transpose3d`` with that convolution's stride, padding and dilation,
    evaluated at the restored sites.
    """
    ks = _as_triple(kernel_size, "kernel_size")
    _check_conv(x, weight, bias, ks, layer)
    rec = x.coordinate_set.inverse_record(indice_key, layer)
    if rec.kernel_size != ks:
        raise ValueError(
            f"{layer} has kernel_size {ks} but the convolution it inverts has kernel_size {rec.kernel_size}"
        )
    out = ops.conv_forward(x.features, weight, rec.nbmap, rec.source.num_voxels, True)
    return SparseTensor._from_set(_finish(out, bias), rec.source)


def sparse_conv_transpose3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    kernel_size: IntOr3 = 3,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
    dilation: IntOr3 = 1,
    output_padding: IntOr3 = 0,
    *,
    layer: str = "SparseConvTranspose3d",
) -> SparseTensor:
    """Generative transposed convolution: every site of the dense ``conv_transpose3d``
    output grid that receives an active input becomes active, with the dense value."""
    ks, st, pad, dil = _geometry(kernel_size, stride, padding, dilation)
    opad = _as_triple(output_padding, "output_padding", 0)
    _check_conv(x, weight, bias, ks, layer)
    rec = x.coordinate_set.strided(ks, st, pad, dil, True, output_padding=opad)
    out = ops.conv_forward(x.features, weight, rec.nbmap, rec.target.num_voxels, False)
    return SparseTensor._from_set(_finish(out, bias), rec.target)


def sparse_max_pool3d(
    x: SparseTensor,
    kernel_size: IntOr3,
    stride: Optional[IntOr3] = None,
    padding: IntOr3 = 0,
    dilation: IntOr3 = 1,
    indice_key: Optional[str] = None,
) -> SparseTensor:
    """Max over the active inputs of each window (inactive sites are ignored, as in spconv).

    Output sites are those of :func:`sparse_conv3d` with the same geometry; ``stride``
    defaults to ``kernel_size``.
    """
    _check_input(x, "SparseMaxPool3d")
    rec = x.coordinate_set.strided(*_geometry(kernel_size, stride, padding, dilation), False, indice_key=indice_key)
    out, _ = ops.maxpool_forward(x.features, rec.nbmap)
    return SparseTensor._from_set(out, rec.target)


def sparse_avg_pool3d(
    x: SparseTensor,
    kernel_size: IntOr3,
    stride: Optional[IntOr3] = None,
    padding: IntOr3 = 0,
    dilation: IntOr3 = 1,
    count_inactive: bool = False,
    indice_key: Optional[str] = None,
) -> SparseTensor:
    """Mean of each window: over its active inputs (default, spconv / MinkowskiEngine), or over all
    ``K`` sites with inactive ones counted as zero (``count_inactive=True``, dense ``avg_pool3d``)."""
    _check_input(x, "SparseAvgPool3d")
    rec = x.coordinate_set.strided(*_geometry(kernel_size, stride, padding, dilation), False, indice_key=indice_key)
    out = ops.avgpool_forward(x.features, rec.nbmap, count_inactive)
    return SparseTensor._from_set(out, rec.target)


def _batch_index(x: SparseTensor) -> torch.Tensor:
    return x.coords[:, 0].long()


def global_max_pool(x: SparseTensor) -> torch.Tensor:
    """Per-batch-element max over voxels, ``[B, C]`` (0 for a batch element with no voxels)."""
    _check_input(x, "SparseGlobalMaxPool")
    b = _batch_index(x).unsqueeze(1).expand(-1, x.num_channels)
    out = x.features.new_zeros((x.batch_size, x.num_channels))
    return out.scatter_reduce(0, b, x.features, reduce="amax", include_self=False)


def global_avg_pool(x: SparseTensor) -> torch.Tensor:
    """Per-batch-element mean over voxels, ``[B, C]`` (0 for a batch element with no voxels)."""
    _check_input(x, "SparseGlobalAvgPool")
    b = _batch_index(x)
    total = x.features.new_zeros((x.batch_size, x.num_channels)).index_add(0, b, x.features)
    count = torch.bincount(b, minlength=x.batch_size).clamp_min(1).to(x.dtype)
    return total / count.unsqueeze(1)


def group_norm(
    x: SparseTensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> SparseTensor:
    """Group normalisation per batch element: statistics over the voxels of each batch element
    and the channels of each group (``torch.nn.GroupNorm`` applied to each sample's voxels)."""
    _check_input(x, "GroupNorm")
    n, c = x.features.shape
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels are not divisible into {num_groups} groups")
    b = _batch_index(x)
    f = x.features.reshape(n, num_groups, c // num_groups)
    count = (torch.bincount(b, minlength=x.batch_size) * (c // num_groups)).clamp_min(1).to(x.dtype)
    zeros = x.features.new_zeros((x.batch_size, num_groups))
    mean = zeros.index_add(0, b, f.sum(-1)) / count.unsqueeze(1)
    centered = f - mean[b].unsqueeze(-1)
    var = zeros.index_add(0, b, (centered * centered).sum(-1)) / count.unsqueeze(1)
    out = (centered * torch.rsqrt(var[b] + eps).unsqueeze(-1)).reshape(n, c)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return x.replace_feature(out)
