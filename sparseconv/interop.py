"""Interoperability with spconv 2.x (``spconv.pytorch``).

spconv is imported lazily, inside the functions that need it; importing this
module never requires it.

Axis order
----------
spconv stores coordinates as int32 ``(batch, z, y, x)`` rows with
``spatial_shape = [Z, Y, X]``: its spatial axes are the *reverse* of ours
(``(batch, x, y, z)`` rows, ``spatial_shape = (X, Y, Z)``).  More precisely,
spconv's first spatial axis is our last one; :func:`to_spconv` and
:func:`from_spconv` reverse the spatial columns and the grid shape.

Building the equivalent network
-------------------------------
Every per-axis argument of a spconv layer is given in spconv's axis order, so
when you rebuild a spconv network from our layers, **reverse anisotropic
kernel sizes, strides, paddings and dilations**.  OpenPCDet's last encoder
layer, for example::

    spconv.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1), padding=0)   # (z, y, x)
    sparseconv.nn.SparseConv3d(64, 128, (1, 1, 3), stride=(1, 1, 2))       # (x, y, z)

Use the same module names (attribute names, ``SparseSequential`` indices) so the
state-dict keys match, then call :func:`load_spconv_state_dict`.

Weights
-------
spconv 2.x keeps convolution weights as ``[C_out, k0, k1, k2, C_in]``
("KRSC"; ``k0, k1, k2`` in its ``(z, y, x)`` order).  Ours are
``[K, C_in, C_out]`` with offsets enumerated x-major over our ``(x, y, z)``
axes, so ``ours = w.permute(3, 2, 1, 4, 0).reshape(K, C_in, C_out)``.
Two spconv specifics are handled:

* spconv evaluates 1x1x1 convolutions with stride 1 (and 1x1x1 submanifold
  ones) as ``features @ w.view(C_in, C_out)``: it reinterprets the KRSC buffer
  instead of transposing it, so for those layers ``ours = w.reshape(1, C_in,
  C_out)`` (``pointwise=True`` below).
* spconv 1.x checkpoints hold ``[k0, k1, k2, C_in, C_out]`` ("RSCK"); pass
  ``layout="RSCK"``.  (spconv 2.3.8 itself cannot load them: its
  ``SPCONV_SAVED_WEIGHT_LAYOUT=RSCK`` hook permutes the weight twice.)

Semantic differences to keep in mind: spconv's ``SparseMaxPool3d`` starts
every output at 0, so it returns ``max(0, max over active inputs)`` while ours
returns the max over the active inputs (identical after a ReLU).

When comparing against spconv 2.3.8's CPU build, run it with one thread
(``torch.set_num_threads(1)``): its CPU scatter-add races under OpenMP and
returns wrong convolution results at random, and its index generation reads
non-contiguous index tensors (``mask.nonzero().int()``) wrongly;
:func:`to_spconv` always passes contiguous indices.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch

from .tensor import SparseTensor, _as_triple

__all__ = [
    "from_spconv",
    "to_spconv",
    "convert_spconv_weight",
    "convert_to_spconv_weight",
    "load_spconv_state_dict",
]

_LAYOUTS = ("KRSC", "RSCK")
# spconv-only bookkeeping buffers (``record_voxel_count=True``) that have no counterpart here.
_SPCONV_ONLY_BUFFERS = ("max_num_voxels_during_training",)


def _import_spconv():
    try:
        import spconv.pytorch as spconv
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this function needs spconv 2.x (`pip install spconv` or a CUDA build such as spconv-cu120)"
        ) from exc
    return spconv


def _reverse_spatial(indices: torch.Tensor) -> torch.Tensor:
    """``(b, a, c, d)`` rows -> ``(b, d, c, a)`` rows (contiguous copy)."""
    return torch.cat([indices[:, :1], indices[:, 1:].flip(1)], dim=1).contiguous()


def to_spconv(t: SparseTensor):
    """Converts a :class:`~sparseconv.SparseTensor` to a ``spconv.pytorch.SparseConvTensor``.

    The features are passed through without a copy; the coordinates become
    contiguous int32 ``(batch, z, y, x)`` rows and ``spatial_shape`` becomes
    ``[Z, Y, X]``.  Kernel maps are not carried over (spconv rebuilds its own).

    Args:
        t: the tensor to convert.

    Returns:
        A ``spconv.pytorch.SparseConvTensor`` with the same batch size.

    Example:
        >>> x = SparseTensor(feats, coords, spatial_shape=(100, 80, 20))  # coords (b, x, y, z)
        >>> s = to_spconv(x)
        >>> s.spatial_shape
        [20, 80, 100]
        >>> torch.equal(s.indices[:, 1:], x.coords[:, 1:].flip(1))  # (b, z, y, x)
        True
    """
    spconv = _import_spconv()
    if not isinstance(t, SparseTensor):
        raise TypeError(f"to_spconv expects a sparseconv.SparseTensor, got {type(t).__name__}")
    # spconv's CPU kernels read the index buffer as if it were contiguous: always hand it a contiguous copy.
    indices = _reverse_spatial(t.coords).to(torch.int32)
    return spconv.SparseConvTensor(t.features, indices, list(reversed(t.spatial_shape)), t.batch_size)


def from_spconv(t: Any, stride=1) -> SparseTensor:
    """Converts a ``spconv.pytorch.SparseConvTensor`` to a :class:`~sparseconv.SparseTensor`.

    The features are used as they are (no copy); ``(batch, z, y, x)`` indices
    become ``(batch, x, y, z)`` coordinates and ``spatial_shape`` ``[Z, Y, X]``
    becomes ``(X, Y, Z)``.  spconv does not track a tensor stride, so pass it if
    the tensor comes from a strided layer (in our ``(x, y, z)`` order).

    Args:
        t: a ``spconv.pytorch.SparseConvTensor``.
        stride: tensor stride of the result (int or 3 ints, ``(x, y, z)``).

    Returns:
        The equivalent SparseTensor (same batch size).

    Raises:
        TypeError: ``t`` is not a SparseConvTensor.
        ValueError: the indices are invalid for a SparseTensor (e.g. duplicated sites).

    Example:
        >>> s = spconv.SparseConvTensor(feats, indices_bzyx, [20, 80, 100], batch_size=2)
        >>> x = from_spconv(s)
        >>> x.spatial_shape, x.batch_size
        ((100, 80, 20), 2)
    """
    spconv = _import_spconv()
    if not isinstance(t, spconv.SparseConvTensor):
        raise TypeError(f"from_spconv expects a spconv.pytorch.SparseConvTensor, got {type(t).__name__}")
    indices = t.indices
    if indices.dim() != 2 or indices.shape[1] != 4:
        raise ValueError(f"from_spconv supports 3D tensors with (batch, z, y, x) indices, got {tuple(indices.shape)}")
    coords = _reverse_spatial(indices).to(torch.int32)
    spatial_shape = tuple(int(s) for s in reversed(list(t.spatial_shape)))
    return SparseTensor(t.features, coords, spatial_shape, stride=stride, batch_size=int(t.batch_size))


def _check_layout(layout: str) -> str:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    return layout


def convert_spconv_weight(w: torch.Tensor, layout: str = "KRSC", pointwise: Optional[bool] = None) -> torch.Tensor:
    """Converts a spconv convolution weight to our ``[K, C_in, C_out]`` layout.

    ``KRSC`` (spconv 2.x): ``w`` is ``[C_out, k0, k1, k2, C_in]`` with
    ``(k0, k1, k2)`` in spconv's ``(z, y, x)`` order; the result is
    ``w.permute(3, 2, 1, 4, 0).reshape(K, C_in, C_out)``, i.e. kernel size
    ``(k2, k1, k0)`` in our ``(x, y, z)`` order.  ``RSCK`` (spconv 1.x):
    ``w`` is ``[k0, k1, k2, C_in, C_out]``.

    spconv 2.x evaluates a 1x1x1 convolution with stride 1 (or a 1x1x1
    submanifold one) as ``features @ w.view(C_in, C_out)``, reinterpreting the
    KRSC buffer; ``pointwise=True`` reproduces that (``w.reshape(1, C_in,
    C_out)``).  The default, ``None``, means "the kernel volume is 1"; pass
    ``pointwise=False`` for a 1x1x1 ``SparseConv3d`` with a stride > 1, which
    spconv evaluates with the general formula.  ``pointwise`` only matters for
    ``layout="KRSC"``.

    Args:
        w: the spconv weight (5-D).
        layout: ``"KRSC"`` or ``"RSCK"``.
        pointwise: whether spconv runs the layer as a 1x1 matrix product (see above).

    Returns:
        A new ``[K, C_in, C_out]`` tensor (same dtype and device).

    Raises:
        ValueError: unknown layout, ``w`` not 5-D, or ``pointwise=True`` with a kernel volume > 1.

    Example:
        >>> conv = spconv.SubMConv3d(16, 32, (3, 1, 5))          # (z, y, x)
        >>> ours = sparseconv.nn.SubMConv3d(16, 32, (5, 1, 3))   # (x, y, z)
        >>> ours.weight.data.copy_(convert_spconv_weight(conv.weight.detach()))
    """
    _check_layout(layout)
    if not isinstance(w, torch.Tensor) or w.dim() != 5:
        raise ValueError(f"expected a 5-D spconv weight ({layout}), got shape {tuple(getattr(w, 'shape', ()))}")
    if layout == "KRSC":
        c_out, k0, k1, k2, c_in = w.shape
    else:
        k0, k1, k2, c_in, c_out = w.shape
    k = k0 * k1 * k2
    if pointwise is None:
        pointwise = k == 1
    if pointwise and k != 1:
        raise ValueError(f"pointwise=True needs a 1x1x1 kernel, got kernel ({k0}, {k1}, {k2}) in spconv order")
    if layout == "KRSC":
        if pointwise:
            return w.contiguous().reshape(1, c_in, c_out).clone()
        return w.permute(3, 2, 1, 4, 0).reshape(k, c_in, c_out).contiguous()
    return w.permute(2, 1, 0, 3, 4).reshape(k, c_in, c_out).contiguous()


def convert_to_spconv_weight(
    w: torch.Tensor, kernel_size, layout: str = "KRSC", pointwise: Optional[bool] = None
) -> torch.Tensor:
    """Converts our ``[K, C_in, C_out]`` weight to a spconv weight (inverse of :func:`convert_spconv_weight`).

    Args:
        w: ``[K, C_in, C_out]`` weight of one of our layers.
        kernel_size: that layer's kernel size in OUR ``(x, y, z)`` order (int or 3 ints).
        layout: ``"KRSC"`` (spconv 2.x, ``[C_out, kz, ky, kx, C_in]``) or ``"RSCK"``
            (spconv 1.x, ``[kz, ky, kx, C_in, C_out]``).
        pointwise: as in :func:`convert_spconv_weight` (default: kernel volume is 1).

    Returns:
        A new 5-D tensor in the requested spconv layout.

    Raises:
        ValueError: unknown layout, or ``w`` does not match ``kernel_size``.

    Example:
        >>> ours = sparseconv.nn.SparseConv3d(64, 128, (1, 1, 3), stride=(1, 1, 2))
        >>> theirs = spconv.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1))
        >>> theirs.weight.data.copy_(convert_to_spconv_weight(ours.weight.detach(), ours.kernel_size))
    """
    _check_layout(layout)
    kx, ky, kz = _as_triple(kernel_size, "kernel_size")
    k = kx * ky * kz
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != k:
        raise ValueError(
            f"expected a [K={k}, C_in, C_out] weight for kernel_size {(kx, ky, kz)}, "
            f"got {tuple(getattr(w, 'shape', ()))}"
        )
    _, c_in, c_out = w.shape
    if pointwise is None:
        pointwise = k == 1
    if pointwise and k != 1:
        raise ValueError(f"pointwise=True needs a 1x1x1 kernel, got kernel_size {(kx, ky, kz)}")
    if layout == "KRSC":
        if pointwise:
            return w.contiguous().reshape(c_out, 1, 1, 1, c_in).clone()
        return w.reshape(kx, ky, kz, c_in, c_out).permute(4, 2, 1, 0, 3).contiguous()
    return w.reshape(kx, ky, kz, c_in, c_out).permute(2, 1, 0, 3, 4).contiguous()


def _is_spconv_pointwise(m) -> bool:
    """Whether spconv 2.x would run the equivalent layer as a 1x1 matrix product."""
    from .nn.conv import SubMConv3d

    if m.weight.shape[0] != 1:
        return False
    if isinstance(m, SubMConv3d):
        return True
    return tuple(getattr(m, "stride", (1, 1, 1))) == (1, 1, 1)


def load_spconv_state_dict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, layout: str = "KRSC"
):
    """Loads a spconv checkpoint into a network built from our layers.

    ``module`` must have the architecture of the spconv network and the same
    module names.  Every entry whose key is the ``weight`` of one of our
    convolution layers (``SubMConv3d``, ``SparseConv3d``, ``SparseInverseConv3d``,
    ``SparseConvTranspose3d``) is converted with :func:`convert_spconv_weight`;
    everything else (biases, ``BatchNorm1d`` parameters and buffers, ...) is
    copied as it is.  spconv-only buffers (``max_num_voxels_during_training``)
    are dropped.

    Remember that spconv gives kernel sizes, strides, paddings and dilations in
    ``(z, y, x)`` order: build our layers with them reversed.  A kernel size
    that was not reversed shows up as a shape mismatch; a stride or padding
    that was not reversed cannot be detected from the weights.

    Args:
        module: our network.
        state_dict: ``spconv_net.state_dict()`` (or a checkpoint's ``"model_state"`` etc.).
        strict: as in ``torch.nn.Module.load_state_dict``.
        layout: weight layout of the checkpoint, ``"KRSC"`` (spconv 2.x) or ``"RSCK"`` (spconv 1.x).

    Returns:
        The ``NamedTuple`` of ``missing_keys`` / ``unexpected_keys`` that
        ``torch.nn.Module.load_state_dict`` returns.

    Raises:
        ValueError: a tensor's shape does not match its target (the message names the key).
        RuntimeError: ``strict=True`` and keys are missing or unexpected (from ``load_state_dict``).

    Example:
        >>> theirs = spconv.SparseSequential(spconv.SubMConv3d(4, 16, 3, bias=False),
        ...                                  torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        ...                                  spconv.SparseConv3d(16, 32, (3, 1, 1), stride=(2, 1, 1)))
        >>> ours = sparseconv.nn.SparseSequential(sparseconv.nn.SubMConv3d(4, 16, 3, bias=False),
        ...                                       torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        ...                                       sparseconv.nn.SparseConv3d(16, 32, (1, 1, 3), stride=(1, 1, 2)))
        >>> load_spconv_state_dict(ours, theirs.state_dict())
        <All keys matched successfully>
    """
    from .nn.conv import _SparseConvBase

    _check_layout(layout)
    convs = {}
    for name, m in module.named_modules():
        if isinstance(m, _SparseConvBase):
            convs[f"{name}.weight" if name else "weight"] = m
    own = module.state_dict()
    converted = OrderedDict()
    for key, value in state_dict.items():
        if key in convs:
            m = convs[key]
            if not isinstance(value, torch.Tensor) or value.dim() != 5:
                raise ValueError(
                    f"{key}: expected a 5-D spconv weight ({layout}) for {m!r}, got shape "
                    f"{tuple(getattr(value, 'shape', ()))}"
                )
            kx, ky, kz = m.kernel_size
            if layout == "KRSC":
                expected = (m.out_channels, kz, ky, kx, m.in_channels)
            else:
                expected = (kz, ky, kx, m.in_channels, m.out_channels)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"{key}: spconv weight has shape {tuple(value.shape)} but {type(m).__name__}(in={m.in_channels}, "
                    f"out={m.out_channels}, kernel_size={m.kernel_size}) needs {expected} ({layout}, kernel in "
                    f"spconv's (z, y, x) order); kernel sizes, strides and paddings must be given reversed "
                    f"relative to the spconv layer"
                )
            value = convert_spconv_weight(value, layout, pointwise=_is_spconv_pointwise(m) and layout == "KRSC")
        elif key not in own and key.rsplit(".", 1)[-1] in _SPCONV_ONLY_BUFFERS:
            continue
        elif key in own and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{key}: checkpoint tensor has shape {tuple(value.shape)}, the module expects "
                             f"{tuple(own[key].shape)}")
        converted[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        converted._metadata = metadata  # keeps versioned loading (e.g. BatchNorm's num_batches_tracked)
    return module.load_state_dict(converted, strict=strict)
