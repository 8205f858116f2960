"""2D bird's-eye-view backbones (necks) on the height-compressed map: :class:`BaseBEVBackbone`."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ._utils import int_arg
from .registry import register_model

__all__ = ["BaseBEVBackbone"]


def _int_list(value, name: str) -> List[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    return [int_arg(v, f"{name} (got {tuple(value)}) entries") for v in value]


def _bn(channels: int) -> torch.nn.BatchNorm2d:
    return torch.nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


def _fit(x: torch.Tensor, size) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` cropped or zero-padded at the high end of H and W to ``size``."""
    h, w = size
    x = x[:, :, :h, :w]
    dh, dw = h - x.shape[2], w - x.shape[3]
    return F.pad(x, (0, dw, 0, dh)) if dh or dw else x


@register_model("base_bev_backbone")
class BaseBEVBackbone(torch.nn.Module):
    """SECOND's 2D neck (OpenPCDet ``BaseBEVBackbone``): per level a strided conv block, up-sampled to a
    common resolution and concatenated.

    Level ``i``: ``ZeroPad2d(1) -> Conv2d(3, stride=layer_strides[i]) -> BN -> ReLU``, then
    ``layer_nums[i]`` times ``Conv2d(3, padding=1) -> BN -> ReLU`` (``num_filters[i]`` channels, no conv
    biases, ``BatchNorm2d(eps=1e-3, momentum=0.01)``); its output goes through a deblock
    ``ConvTranspose2d(s, stride=s) -> BN -> ReLU`` with ``s = upsample_strides[i]`` (``num_upsample_filters[i]``
    channels) or, for a stride ``s < 1``, ``Conv2d(1/s, stride=1/s) -> BN -> ReLU`` (and for ``s = 1`` with
    ``use_conv_for_no_stride``, a 1x1 conv).  The deblock outputs are concatenated along channels; an
    extra ``upsample_strides`` entry (one more than the levels) adds a final deblock on the concatenation.

    Sizes: level ``i``'s map is ``ceil(H / prod(layer_strides[:i+1]))``; its deblock multiplies (or
    divides, flooring) by its up-sample stride.  With odd sizes these differ between levels (``H = 25``:
    level 0 ``25``, level 1 ``13`` -> deblock ``26``), so every deblock output is cropped or zero-padded at
    the high end (bottom / right; index 0 stays aligned) to the first level's deblock size before the
    concatenation.  With the defaults the output has the input's ``H, W``.

    Args:
        input_channels: channels ``C`` of the input map (``num_bev_features`` of the 3D backbone).
        layer_nums: extra 3x3 conv layers per level.
        layer_strides: stride of each level's first conv.
        num_filters: channels of each level.
        upsample_strides: up-sample stride of each level's deblock (``>= 1`` integer, or ``1 / n``); one extra
            entry adds a deblock after the concatenation.
        num_upsample_filters: channels of each level's deblock.
        use_conv_for_no_stride: a 1x1 ``Conv2d`` (not a ``ConvTranspose2d``) for up-sample stride 1.

    Attributes:
        num_bev_features: output channels, ``sum(num_upsample_filters)``.

    Shape:
        ``[B, C, H, W]`` -> ``[B, num_bev_features, H', W']`` with ``H' = ceil(H / layer_strides[0]) *
        upsample_strides[0]`` (floored for a stride ``1 / n``; times the extra stride, if any); ``H' = H``
        with the defaults.

    Raises:
        ValueError: bad or inconsistent arguments (named), or an input with the wrong channels.

    Example:
        >>> neck = BaseBEVBackbone(256)
        >>> neck(torch.randn(2, 256, 200, 176)).shape
        torch.Size([2, 512, 200, 176])
    """

    def __init__(self, input_channels: int = 256, layer_nums: Sequence[int] = (5, 5),
                 layer_strides: Sequence[int] = (1, 2), num_filters: Sequence[int] = (128, 256),
                 upsample_strides: Sequence[float] = (1, 2), num_upsample_filters: Sequence[int] = (256, 256),
                 use_conv_for_no_stride: bool = False):
        super().__init__()
        self.input_channels = int_arg(input_channels, "input_channels")
        if isinstance(layer_nums, (str, bytes)) or not hasattr(layer_nums, "__len__"):
            raise ValueError(f"layer_nums must be a sequence of ints >= 0, got {layer_nums!r}")
        layer_nums = [int_arg(n, f"layer_nums (got {tuple(layer_nums)}) entries", 0) for n in layer_nums]
        layer_strides = _int_list(layer_strides, "layer_strides")
        num_filters = _int_list(num_filters, "num_filters")
        num_upsample_filters = _int_list(num_upsample_filters, "num_upsample_filters")
        levels = len(layer_nums)
        if levels < 1:
            raise ValueError("layer_nums must have at least one level")
        if len(layer_strides) != levels or len(num_filters) != levels:
            raise ValueError(f"layer_nums, layer_strides and num_filters must have one entry per level, got "
                             f"{len(layer_nums)}, {len(layer_strides)} and {len(num_filters)}")
        if isinstance(upsample_strides, (str, bytes)) or not hasattr(upsample_strides, "__len__") or \
                len(upsample_strides) not in (levels, levels + 1):
            raise ValueError(f"upsample_strides must have one entry per level ({levels}), or one more for a final "
                             f"deblock, got {upsample_strides!r}")
        if len(num_upsample_filters) != levels:
            raise ValueError(f"num_upsample_filters must have one entry per level ({levels}), got "
                             f"{tuple(num_upsample_filters)}")
        self.layer_strides = tuple(layer_strides)
        self.upsample_strides = tuple(float(s) for s in upsample_strides)
        self.blocks = torch.nn.ModuleList()
        self.deblocks = torch.nn.ModuleList()
        c_in = self.input_channels
        for i in range(levels):
            layers = [torch.nn.ZeroPad2d(1),
                      torch.nn.Conv2d(c_in, num_filters[i], 3, stride=layer_strides[i], padding=0, bias=False),
                      _bn(num_filters[i]), torch.nn.ReLU()]
            for _ in range(layer_nums[i]):
                layers += [torch.nn.Conv2d(num_filters[i], num_filters[i], 3, padding=1, bias=False),
                           _bn(num_filters[i]), torch.nn.ReLU()]
            self.blocks.append(torch.nn.Sequential(*layers))
            self.deblocks.append(self._deblock(num_filters[i], num_upsample_filters[i], upsample_strides[i],
                                               bool(use_conv_for_no_stride), "upsample_strides"))
            c_in = num_filters[i]
        c_out = sum(num_upsample_filters)
        if len(upsample_strides) > levels:
            self.deblocks.append(self._deblock(c_out, c_out, upsample_strides[-1], False, "upsample_strides[-1]"))
        self.num_bev_features = c_out

    @staticmethod
    def _deblock(cin: int, cout: int, stride, conv_for_one: bool, name: str) -> torch.nn.Sequential:
        try:
            s = float(stride)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: up-sample strides must be numbers, got {stride!r}") from None
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"{name}: up-sample strides must be positive, got {stride!r}")
        if s >= 1:
            if s != int(s):
                raise ValueError(f"{name}: an up-sample stride >= 1 must be an integer, got {stride!r}")
            s = int(s)
            if s > 1 or not conv_for_one:
                layer = torch.nn.ConvTranspose2d(cin, cout, s, stride=s, bias=False)
            else:
                layer = torch.nn.Conv2d(cin, cout, 1, stride=1, bias=False)
        else:
            k = round(1.0 / s)
            if abs(k * s - 1.0) > 1e-6:
                raise ValueError(f"{name}: an up-sample stride < 1 must be 1 / n for an integer n, got {stride!r}")
            layer = torch.nn.Conv2d(cin, cout, k, stride=k, bias=False)
        return torch.nn.Sequential(layer, _bn(cout), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"BaseBEVBackbone expects [B, {self.input_channels}, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            up = deblock(x)
            ups.append(up if not ups else _fit(up, ups[0].shape[2:]))
        out = torch.cat(ups, 1) if len(ups) > 1 else ups[0]
        if len(self.deblocks) > len(self.blocks):
            out = self.deblocks[-1](out)
        return out
