"""Activation sparsity: measure it, report it, encourage it.

Measures (on a SparseTensor's features or on a plain tensor):

* :func:`zero_fraction`: the fraction of values that are exactly 0.
* :func:`near_zero_fraction`: the fraction with ``|a| < eps``.
* :func:`hoyer`: Hoyer's sparsity of each feature vector, ``(sqrt(n) - |x|_1 / |x|_2) / (sqrt(n) - 1)``
  in ``[0, 1]`` (1: one non-zero entry, 0: all entries equal in magnitude), averaged.

Monitoring: :class:`ActivationMonitor` puts forward hooks on a model's activation modules and keeps
running per-layer totals over any number of batches (zero / near-zero fractions, mean Hoyer, the
fraction of voxels whose whole feature vector is 0, dead units); :func:`sparsity_report` runs a
model over batches with one; ``sparseconv sparsity`` is the command line for it.

Encouraging: the penalties :func:`l1_activation_penalty`, :func:`hoyer_penalty` and
:func:`kl_sparsity_penalty`; :class:`ActivationPenalty` collects one of them from chosen layers
during the forward pass; :class:`~sparseconv.nn.TopK` keeps ``k`` channels per voxel;
:func:`relufy` swaps smooth activations (GELU, SiLU, ...) for ReLU.

See ``docs/activation_sparsity.md``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import nn as snn
from .nn.activation import TopK
from .nn.base import SparseModule
from .tensor import SparseTensor

__all__ = [
    "zero_fraction",
    "near_zero_fraction",
    "hoyer",
    "ActivationMonitor",
    "ACTIVATION_TYPES",
    "sparsity_report",
    "format_table",
    "plot_stats",
    "l1_activation_penalty",
    "hoyer_penalty",
    "kl_sparsity_penalty",
    "ActivationPenalty",
    "PENALTIES",
    "relufy",
    "RELUFY_TYPES",
]

TensorLike = Union[SparseTensor, torch.Tensor]

#: Module types :class:`ActivationMonitor` hooks by default.
ACTIVATION_TYPES: Tuple[type, ...] = (
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU, torch.nn.ELU, torch.nn.GELU,
    torch.nn.SiLU, torch.nn.Mish, torch.nn.Hardswish,
    snn.ReLU, snn.LeakyReLU, snn.GELU, snn.SiLU, TopK,
)

#: Module types :func:`relufy` replaces by default.
RELUFY_TYPES: Tuple[type, ...] = (torch.nn.GELU, torch.nn.SiLU, torch.nn.Mish, torch.nn.Hardswish, snn.GELU, snn.SiLU)


# ----------------------------------------------------------------------------- helpers
def _features(x, who: str) -> torch.Tensor:
    """The features of a SparseTensor, or the tensor itself."""
    if isinstance(x, SparseTensor):
        return x.features
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{who} expects a SparseTensor or a torch.Tensor, got {type(x).__name__}")


def _vectors(f: torch.Tensor, dim: int, who: str) -> torch.Tensor:
    """``f`` as ``[R, C]``: one row per vector along ``dim``."""
    if f.dim() == 0:
        raise ValueError(f"{who} expects a tensor with a channel dimension, got a 0-d tensor")
    if not -f.dim() <= dim < f.dim():
        raise ValueError(f"{who}: dim={dim} is out of range for a tensor of shape {tuple(f.shape)}")
    f = f.movedim(dim, -1)
    return f.reshape(-1, f.shape[-1])


def _measure_dtype(f: torch.Tensor) -> torch.Tensor:
    f = f.detach()
    if f.dtype not in (torch.float32, torch.float64):
        f = f.float()
    return f


def _hoyer_vectors(f: torch.Tensor, dim: int) -> torch.Tensor:
    """Hoyer sparsity of every vector along ``dim`` (no reduction; see :func:`hoyer`)."""
    f = _measure_dtype(f)
    n = f.shape[dim]
    a = f.abs()
    peak = a.amax(dim, keepdim=True)
    zero = peak.squeeze(dim) == 0
    if n == 1:
        return zero.double()
    a = a / torch.where(peak > 0, peak, torch.ones_like(peak))  # scale to max 1: no under/overflow
    l1 = a.sum(dim).double()
    l2 = a.square().sum(dim).double().sqrt()
    ratio = l1 / torch.where(zero, torch.ones_like(l2), l2)  # a one-hot vector gives exactly 1
    sqrt_n = math.sqrt(n)
    h = ((sqrt_n - ratio) / (sqrt_n - 1)).clamp(0, 1)
    return torch.where(zero, torch.ones_like(h), h)


# ----------------------------------------------------------------------------- measures
def zero_fraction(x: TensorLike) -> float:
    """The fraction of values that are exactly zero.

    Args:
        x: a SparseTensor (its features ``[N, C]`` are measured) or a tensor of any shape.

    Returns:
        ``count(a == 0) / numel`` in ``[0, 1]`` (``-0.0`` counts as zero, NaN does not).

    Raises:
        ValueError: ``x`` has no values (the fraction is undefined).

    Example:
        >>> zero_fraction(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        0.75
    """
    f = _features(x, "zero_fraction")
    if f.numel() == 0:
        raise ValueError(f"zero_fraction of an empty tensor (shape {tuple(f.shape)}) is undefined")
    return float((f == 0).sum()) / f.numel()


def near_zero_fraction(x: TensorLike, eps: float = 1e-3) -> float:
    """The fraction of values with ``|a| < eps`` (exact zeros included).

    Args:
        x: a SparseTensor (its features) or a tensor of any shape.
        eps: the threshold, ``> 0``.

    Returns:
        ``count(|a| < eps) / numel`` in ``[0, 1]``.

    Raises:
        ValueError: ``eps <= 0`` or ``x`` has no values.

    Example:
        >>> near_zero_fraction(torch.tensor([0.0, 1e-4, -1e-4, 0.5]), eps=1e-3)
        0.75
    """
    if not eps > 0:
        raise ValueError(f"near_zero_fraction: eps must be > 0, got {eps}")
    f = _features(x, "near_zero_fraction")
    if f.numel() == 0:
        raise ValueError(f"near_zero_fraction of an empty tensor (shape {tuple(f.shape)}) is undefined")
    return float((f.abs() < eps).sum()) / f.numel()


def hoyer(x: TensorLike, dim: int = -1, reduction: str = "mean"):
    """Hoyer's sparsity measure of each feature vector, averaged.

    For a vector ``v`` of ``n`` entries: ``(sqrt(n) - |v|_1 / |v|_2) / (sqrt(n) - 1)``. It is 1 for
    a vector with exactly one non-zero entry (one-hot), 0 for a vector whose entries all have the
    same magnitude (e.g. a constant), and in between otherwise; it does not depend on the scale of
    ``v`` (Hoyer 2004, "Non-negative matrix factorization with sparseness constraints").

    Special cases, chosen so that the measure is defined for every vector:

    * an all-zero vector counts as **1** (maximally sparse: no active entry). Feature vectors that
      are entirely zero are common after a ReLU; :class:`ActivationMonitor` also reports their
      fraction separately (``zero_row_fraction``) so that they can be told apart.
    * ``n == 1``: the formula is 0 / 0; the value is 1 for a zero entry and 0 for a non-zero one
      (the entry's zero fraction).

    Each vector is first scaled by its largest magnitude, so tiny or huge activations do not
    under/overflow; the norms are summed in the input's precision (float32 at least) and the
    final ratio is taken in float64, so a one-hot vector gives exactly 1.

    Args:
        x: a SparseTensor (its features ``[N, C]``: one vector per voxel) or a tensor.
        dim: the dimension the vectors run along (default ``-1``: the channels of ``[N, C]``; use
            ``1`` for dense ``[B, C, X, Y, Z]``).
        reduction: ``"mean"`` (a float, the mean over all vectors) or ``"none"`` (a float64 tensor
            of the per-vector values, the shape of ``x`` without ``dim``).

    Raises:
        ValueError: empty input with ``reduction="mean"``, a vector length of 0, an unknown
            ``reduction`` or ``dim`` out of range.

    Example:
        >>> hoyer(torch.tensor([[0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), reduction="none")
        tensor([1., 0.], dtype=torch.float64)
        >>> hoyer(torch.tensor([[0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
        0.5
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"hoyer: reduction must be 'mean' or 'none', got {reduction!r}")
    f = _features(x, "hoyer")
    if f.dim() == 0:
        raise ValueError("hoyer expects a tensor with a vector dimension, got a 0-d tensor")
    if not -f.dim() <= dim < f.dim():
        raise ValueError(f"hoyer: dim={dim} is out of range for a tensor of shape {tuple(f.shape)}")
    if f.shape[dim] == 0:
        raise ValueError(f"hoyer: the vectors along dim={dim} of a tensor of shape {tuple(f.shape)} are empty")
    h = _hoyer_vectors(f, dim)
    if reduction == "none":
        return h
    if h.numel() == 0:
        raise ValueError(f"hoyer of an empty tensor (shape {tuple(f.shape)}) is undefined")
    return float(h.mean())


# ----------------------------------------------------------------------------- monitor
def _resolve_modules(model: torch.nn.Module, modules, who: str) -> Dict[str, torch.nn.Module]:
    """``{name: module}`` for names or module objects of ``model``."""
    if modules is None:
        return {}
    if isinstance(modules, (str, torch.nn.Module)):
        modules = [modules]
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    out = {}
    for m in modules:
        if isinstance(m, str):
            if m not in named:
                names = [n for n in named if n]
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ValueError(f"{who}: the model has no module named {m!r}; its modules are: {shown}")
            out[m] = named[m]
        elif isinstance(m, torch.nn.Module):
            if id(m) not in by_id:
                raise ValueError(f"{who}: the {type(m).__name__} module given is not part of the model")
            out[by_id[id(m)]] = m
        else:
            raise TypeError(f"{who}: modules must be names or torch.nn.Module objects, got {type(m).__name__}")
    return out


def _activation_rows(output, name: str) -> torch.Tensor:
    """A hooked module's output as ``[rows, channels]`` (detached)."""
    if isinstance(output, SparseTensor):
        f = output.features
    elif isinstance(output, torch.Tensor):
        f = output
        if f.dim() == 0:
            raise ValueError(f"ActivationMonitor: layer {name!r} returned a 0-d tensor; "
                             "there are no channels to measure")
        if f.dim() == 1:
            f = f.unsqueeze(0)
        elif f.dim() > 2:
            f = f.movedim(1, -1)  # dense [B, C, ...]: channels are dim 1
    else:
        raise TypeError(f"ActivationMonitor: layer {name!r} returned a {type(output).__name__}; only a "
                        "SparseTensor or a torch.Tensor can be measured")
    return f.detach().reshape(-1, f.shape[-1])


class _LayerStats:
    """Running totals of one layer (device tensors, so recording never waits for the device)."""

    __slots__ = ("type", "calls", "values", "rows", "channels", "zeros", "near_zeros", "zero_rows", "hoyer_sum",
                 "active")

    def __init__(self, type_name: str):
        self.type = type_name
        self.calls = 0
        self.values = 0
        self.rows = 0
        self.channels: Optional[int] = None
        self.zeros = self.near_zeros = self.zero_rows = self.hoyer_sum = None
        self.active: Optional[torch.Tensor] = None  # [C] bool: the channel was non-zero at least once

    def update(self, f: torch.Tensor, eps: float, name: str) -> None:
        rows, channels = f.shape
        if self.channels is None:
            self.channels = channels
            dev = f.device
            self.zeros = torch.zeros((), dtype=torch.int64, device=dev)
            self.near_zeros = torch.zeros((), dtype=torch.int64, device=dev)
            self.zero_rows = torch.zeros((), dtype=torch.int64, device=dev)
            self.hoyer_sum = torch.zeros((), dtype=torch.float64, device=dev)
            self.active = torch.zeros(channels, dtype=torch.bool, device=dev)
        elif channels != self.channels:
            raise ValueError(f"ActivationMonitor: layer {name!r} produced {channels} channels after "
                             f"{self.channels} earlier; per-channel statistics need a fixed channel count")
        self.calls += 1
        if rows == 0 or channels == 0:
            return
        dev = self.active.device
        if f.device != dev:
            f = f.to(dev)
        is_zero = f == 0
        self.values += f.numel()
        self.rows += rows
        self.zeros += is_zero.sum()
        self.near_zeros += (f.abs() < eps).sum()
        self.zero_rows += is_zero.all(1).sum()
        self.hoyer_sum += _hoyer_vectors(f, -1).sum(dtype=torch.float64)
        self.active |= ~is_zero.all(0)

    def as_dict(self, eps: float) -> dict:
        seen = self.values > 0
        dead = None
        if seen:
            dead = torch.nonzero(~self.active).flatten().tolist()
        return {
            "type": self.type,
            "calls": self.calls,
            "rows": self.rows,
            "channels": self.channels,
            "values": self.values,
            "zero_fraction": int(self.zeros) / self.values if seen else None,
            "near_zero_fraction": int(self.near_zeros) / self.values if seen else None,
            "eps": eps,
            "hoyer": float(self.hoyer_sum) / self.rows if seen else None,
            "zero_row_fraction": int(self.zero_rows) / self.rows if seen else None,
            "dead_units": len(dead) if seen else None,
            "dead_unit_fraction": len(dead) / self.channels if seen else None,
            "dead_unit_indices": dead if seen else [],
        }


class ActivationMonitor:
    """Per-layer activation-sparsity statistics over many batches, from forward hooks.

    Hooks every module of ``model`` whose type is in ``types`` (by default
    :data:`ACTIVATION_TYPES`: ``torch.nn`` ReLU, ReLU6, LeakyReLU, PReLU, ELU, GELU, SiLU, Mish,
    Hardswish; ``sparseconv.nn`` ReLU, LeakyReLU, GELU, SiLU, TopK) plus every module named in
    ``modules``, and adds each output to running totals; activations are never stored. A module
    used at several places of the forward pass (one shared ``ReLU`` instance) is one layer whose
    totals cover all its calls; activations applied functionally (``torch.relu`` inside a
    ``forward``) are not seen: name the module that contains them instead.

    Outputs: a SparseTensor's features ``[N, C]`` (one row per voxel); a plain ``[N, C]`` tensor
    (``torch.nn.ReLU`` inside :class:`~sparseconv.nn.SparseSequential` gets the features); a dense
    ``[B, C, ...]`` tensor (channels: dim 1; one row per position); a ``[C]`` tensor (one row).

    Per layer, :meth:`stats` gives: ``zero_fraction`` (values exactly 0), ``near_zero_fraction``
    (``|a| < eps``), ``hoyer`` (mean Hoyer sparsity of the rows, all-zero rows counting as 1, see
    :func:`hoyer`), ``zero_row_fraction`` (rows, i.e. voxels, whose whole vector is 0),
    ``dead_units`` / ``dead_unit_indices`` (channels that were 0 in every row seen), and the counts
    ``calls``, ``rows``, ``channels``, ``values``. Fractions are ``None`` until a layer has seen a value.

    Recording runs under ``torch.no_grad`` on detached outputs, so it can stay on during training
    without changing gradients. With ``enabled = False`` the hooks return at once.

    Args:
        model: the network.
        modules: extra modules to measure: names as in ``model.named_modules()`` or the module
            objects (e.g. a convolution whose output you want to see).
        eps: the near-zero threshold (``> 0``).
        types: the module types hooked automatically (``()``: only ``modules``).
        enabled: start recording at once.

    Raises:
        ValueError: no module to hook, an unknown module name, ``eps <= 0``.

    Example:
        >>> with ActivationMonitor(net) as mon:
        ...     for x in batches:
        ...         net(x)
        >>> print(mon.table())
        >>> mon.stats()["conv1.0.2"]["zero_fraction"]
        0.53
        >>> mon.plot("sparsity.png")
    """

    def __init__(self, model: torch.nn.Module, modules: Optional[Iterable] = None, *, eps: float = 1e-3,
                 types: Sequence[type] = ACTIVATION_TYPES, enabled: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ActivationMonitor expects a torch.nn.Module, got {type(model).__name__}")
        if not eps > 0:
            raise ValueError(f"ActivationMonitor: eps must be > 0, got {eps}")
        self.model = model
        self.eps = float(eps)
        self.enabled = bool(enabled)
        types = tuple(types)
        chosen = {n: m for n, m in model.named_modules() if types and isinstance(m, types)}
        chosen.update(_resolve_modules(model, modules, "ActivationMonitor"))
        if not chosen:
            raise ValueError(f"ActivationMonitor: {type(model).__name__} has no activation module of the types "
                             f"{[t.__name__ for t in types]}; name the modules to measure with modules=[...]")
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self._modules = dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
        self._stats: Dict[str, _LayerStats] = {}
        self._handles: List = []
        self.reset()
        self._attach()

    @property
    def layers(self) -> List[str]:
        """The names of the measured modules, in the model's order."""
        return list(self._modules)

    def _attach(self) -> None:
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.enabled:
                return None
            with torch.no_grad():
                self._stats[name].update(_activation_rows(output, name), self.eps, name)
            return None

        return hook

    def remove(self) -> None:
        """Removes the hooks (the statistics gathered so far stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def __enter__(self) -> "ActivationMonitor":
        self._attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def reset(self) -> None:
        """Forgets everything recorded so far."""
        self._stats = {n: _LayerStats(type(m).__name__) for n, m in self._modules.items()}

    def stats(self) -> Dict[str, dict]:
        """``{layer name: statistics}`` in the model's order (see the class docstring for the keys)."""
        return {n: s.as_dict(self.eps) for n, s in self._stats.items()}

    def table(self) -> str:
        """The statistics as a printable per-layer table (:func:`format_table`)."""
        return format_table(self.stats())

    def plot(self, path, title: Optional[str] = None) -> None:
        """Writes a PNG of the per-layer zero fraction and mean Hoyer (:func:`plot_stats`)."""
        plot_stats(self.stats(), path, title=title)


def format_table(stats: Mapping[str, dict]) -> str:
    """A per-layer text table of :meth:`ActivationMonitor.stats`.

    Columns: layer, type, channels, rows (voxels) seen, zero %, near-zero % (``|a| < eps``), mean
    Hoyer, all-zero rows %, dead units / channels. A last line gives the totals over all layers
    (fractions weighted by the number of values). Layers that saw nothing show ``-``.
    """
    head = f"{'layer':<28} {'type':<10} {'C':>5} {'rows':>10} {'zero %':>7} {'near0 %':>8} {'Hoyer':>6} " \
           f"{'0-rows %':>8} {'dead':>9}"
    lines = [head, "-" * len(head)]
    values = zeros = near = 0
    for name, s in stats.items():
        name = name or "(model)"
        if len(name) > 28:
            name = "…" + name[-27:]
        if s["zero_fraction"] is None:
            lines.append(f"{name:<28} {s['type'][:10]:<10} {s['channels'] or '-':>5} {s['rows']:>10,} "
                         f"{'-':>7} {'-':>8} {'-':>6} {'-':>8} {'-':>9}")
            continue
        values += s["values"]
        zeros += s["zero_fraction"] * s["values"]
        near += s["near_zero_fraction"] * s["values"]
        dead = f"{s['dead_units']}/{s['channels']}"
        lines.append(f"{name:<28} {s['type'][:10]:<10} {s['channels']:>5} {s['rows']:>10,} "
                     f"{100 * s['zero_fraction']:>7.1f} {100 * s['near_zero_fraction']:>8.1f} {s['hoyer']:>6.3f} "
                     f"{100 * s['zero_row_fraction']:>8.1f} {dead:>9}")
    lines.append("-" * len(head))
    if values:
        lines.append(f"{'all layers':<28} {'':<10} {'':>5} {'':>10} {100 * zeros / values:>7.1f} "
                     f"{100 * near / values:>8.1f}")
    else:
        lines.append("no activation recorded")
    return "\n".join(lines)


def plot_stats(stats: Mapping[str, dict], path, title: Optional[str] = None) -> None:
    """Writes a PNG with two bar charts: per-layer zero fraction (near-zero as an outline) and mean Hoyer.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). The file is
    written atomically.

    Args:
        stats: :meth:`ActivationMonitor.stats` (or the ``layers`` of ``sparseconv sparsity --json``).
        path: the PNG file to write.
        title: the figure title.

    Raises:
        ValueError: no layer has recorded anything.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_write

    rows = [(n or "(model)", s) for n, s in stats.items() if s.get("zero_fraction") is not None]
    if not rows:
        raise ValueError("plot_stats: no layer has recorded any activation; nothing to plot")
    names = [n for n, _ in rows]
    xs = list(range(len(rows)))
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2.0), 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_zero, ax_hoyer = fig.subplots(2, 1, sharex=True)
    ax_zero.bar(xs, [s["near_zero_fraction"] for _, s in rows], color="none", edgecolor="tab:blue",
                linestyle="--", label="|a| < eps")
    ax_zero.bar(xs, [s["zero_fraction"] for _, s in rows], color="tab:blue", label="exactly 0")
    ax_zero.set_ylabel("fraction of values")
    ax_zero.set_ylim(0, 1)
    ax_zero.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False, fontsize="small")
    ax_zero.grid(axis="y", alpha=0.3)
    ax_hoyer.bar(xs, [s["hoyer"] for _, s in rows], color="tab:orange")
    ax_hoyer.set_ylabel("mean Hoyer sparsity")
    ax_hoyer.set_ylim(0, 1)
    ax_hoyer.grid(axis="y", alpha=0.3)
    ax_hoyer.set_xticks(xs)
    ax_hoyer.set_xticklabels(names, rotation=60, ha="right", fontsize="small")
    fig.suptitle(title or "activation sparsity per layer", x=0.02, ha="left")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def sparsity_report(model: torch.nn.Module, batches: Iterable, *, modules: Optional[Iterable] = None,
                    eps: float = 1e-3, forward: Optional[Callable] = None, eval_mode: bool = True,
                    max_batches: Optional[int] = None) -> Dict[str, dict]:
    """Runs ``model`` over ``batches`` under ``torch.no_grad`` and returns the per-layer statistics.

    Args:
        model: the network.
        batches: an iterable of inputs; each is passed as ``model(batch)`` (or ``forward(model, batch)``).
        modules: extra modules to measure (see :class:`ActivationMonitor`).
        eps: the near-zero threshold.
        forward: ``forward(model, batch)`` for inputs that are not one positional argument.
        eval_mode: run in eval mode (BatchNorm uses its running statistics and is not updated, dropout
            is off); every module's previous mode is restored afterwards.
        max_batches: stop after this many batches.

    Returns:
        :meth:`ActivationMonitor.stats` after the run.

    Raises:
        ValueError: ``batches`` gave nothing.

    Example:
        >>> stats = sparsity_report(net, [x1, x2, x3])
        >>> print(format_table(stats))
    """
    monitor = ActivationMonitor(model, modules, eps=eps)
    modes = [(m, m.training) for m in model.modules()]
    n = 0
    try:
        if eval_mode:
            model.eval()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n >= max_batches:
                    break
                if forward is None:
                    model(batch)
                else:
                    forward(model, batch)
                n += 1
    finally:
        monitor.remove()
        for m, training in modes:
            m.training = training
    if n == 0:
        raise ValueError("sparsity_report: batches gave no batch to run")
    return monitor.stats()


# ----------------------------------------------------------------------------- penalties
def _check_lam(lam: float, who: str) -> None:
    if isinstance(lam, torch.Tensor):
        return
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"{who}: lam must be a finite number >= 0, got {lam}")


def l1_activation_penalty(a: TensorLike, lam: float = 1.0) -> torch.Tensor:
    """``lam * mean(|a|)``: the L1 penalty on activations, averaged over all values.

    The mean (not the sum) keeps ``lam`` meaningful whatever the number of voxels or channels.
    Not scale-invariant: a network can shrink it by scaling activations down (and the next layer's
    weights up); :func:`hoyer_penalty` cannot be gamed that way.

    Args:
        a: a SparseTensor (its features) or a tensor of any shape.
        lam: the weight, ``>= 0``.

    Returns:
        A 0-d tensor (differentiable); 0 for an empty input.

    Example:
        >>> l1_activation_penalty(torch.tensor([[1.0, -2.0], [0.0, 3.0]]), lam=0.5)
        tensor(0.7500)
    """
    _check_lam(lam, "l1_activation_penalty")
    f = _features(a, "l1_activation_penalty")
    if f.numel() == 0:
        return f.new_zeros(())
    return lam * f.abs().mean()


def hoyer_penalty(a: TensorLike, lam: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``lam * mean over vectors of |v|_1 / |v|_2``: a scale-invariant sparsity penalty.

    Each feature vector ``v`` (a row of ``[N, C]``; vectors along ``dim`` in general) contributes
    ``|v|_1 / |v|_2``, which lies in ``[1, sqrt(C)]``: 1 for one non-zero entry, ``sqrt(C)`` for
    equal magnitudes. It is the part of Hoyer's measure that depends on ``v``
    (``hoyer = (sqrt(C) - ratio) / (sqrt(C) - 1)``), so lowering it raises :func:`hoyer`, and it is
    unchanged when ``v`` is scaled, unlike the L1 penalty. An all-zero vector contributes 0 with
    gradient 0 (it is already as sparse as can be).

    Args:
        a: a SparseTensor (its features) or a tensor.
        lam: the weight, ``>= 0``.
        dim: the dimension the vectors run along (``-1``: channels of ``[N, C]``; ``1`` for dense
            ``[B, C, X, Y, Z]``).

    Returns:
        A 0-d tensor (differentiable); 0 for an empty input.

    Example:
        >>> hoyer_penalty(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))   # (1 + sqrt(2)) / 2
        tensor(1.2071)
    """
    _check_lam(lam, "hoyer_penalty")
    f = _features(a, "hoyer_penalty")
    v = _vectors(f, dim, "hoyer_penalty")
    if v.numel() == 0:
        return f.new_zeros(())
    sq = v.square().sum(-1)
    nonzero = sq > 0
    l2 = torch.where(nonzero, sq, torch.ones_like(sq)).sqrt()  # no sqrt(0): its gradient is inf
    ratio = torch.where(nonzero, v.abs().sum(-1) / l2, torch.zeros_like(sq))
    return lam * ratio.mean()


def kl_sparsity_penalty(a: TensorLike, rho: float = 0.05, lam: float = 1.0, dim: int = -1,
                        eps: float = 1e-6) -> torch.Tensor:
    """The sparse-autoencoder penalty: ``lam * sum_j KL(rho || rho_hat_j)``.

    ``rho_hat_j`` is the mean activation of unit (channel) ``j`` over the batch (all voxels, or all
    positions of a dense tensor); the Bernoulli KL divergence
    ``rho log(rho / rho_hat) + (1 - rho) log((1 - rho) / (1 - rho_hat))`` pulls it towards the
    target ``rho``, summed over units (Ng, "Sparse autoencoder", CS294A notes).

    The activations are assumed to lie in ``[0, 1]`` (a sigmoid output, or a bounded ReLU);
    ``rho_hat`` is clamped to ``[eps, 1 - eps]`` so the logarithms stay finite (its gradient is 0
    outside that range). For unbounded activations (ReLU, GELU) apply a sigmoid first, e.g.
    ``kl_sparsity_penalty(torch.sigmoid(x.features), rho)``; note a sigmoid maps 0 to 0.5.

    Args:
        a: a SparseTensor (its features ``[N, C]``) or a tensor.
        rho: the target mean activation, in ``(0, 1)``.
        lam: the weight, ``>= 0``.
        dim: the channel dimension (``-1`` for ``[N, C]``; ``1`` for dense ``[B, C, X, Y, Z]``).
        eps: the clamp margin, in ``(0, 0.5)``.

    Returns:
        A 0-d tensor (differentiable); 0 for an input with no rows.

    Example:
        >>> kl_sparsity_penalty(torch.full((8, 4), 0.5), rho=0.05)   # 4 units, each 0.4946
        tensor(1.9785)
    """
    _check_lam(lam, "kl_sparsity_penalty")
    if not 0 < rho < 1:
        raise ValueError(f"kl_sparsity_penalty: rho must be in (0, 1), got {rho}")
    if not 0 < eps < 0.5:
        raise ValueError(f"kl_sparsity_penalty: eps must be in (0, 0.5), got {eps}")
    f = _features(a, "kl_sparsity_penalty")
    v = _vectors(f, dim, "kl_sparsity_penalty")
    if v.numel() == 0:
        return f.new_zeros(())
    rho_hat = v.mean(0).clamp(eps, 1 - eps)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return lam * kl.sum()


#: Penalty names :class:`ActivationPenalty` accepts.
PENALTIES: Mapping[str, Callable] = {
    "l1": l1_activation_penalty,
    "hoyer": hoyer_penalty,
    "kl": kl_sparsity_penalty,
}


class ActivationPenalty:
    """Collects a sparsity penalty of chosen layers' outputs during the forward pass.

    A forward hook on each named layer adds ``penalty(output, lam=lam, **kwargs)`` to a list;
    :meth:`loss` returns the sum of everything collected since the previous call and clears it.
    By default only forward passes in training mode are collected (``only_training``), so
    evaluation passes in between do not pile up terms.

    Args:
        model: the network.
        layers: the modules whose outputs are penalised: names as in ``model.named_modules()`` or
            the module objects.
        penalty: ``"l1"``, ``"hoyer"``, ``"kl"`` (see :data:`PENALTIES`) or a callable
            ``penalty(output, lam=lam, **kwargs) -> 0-d tensor``.
        lam: the weight passed to the penalty.
        only_training: collect only when the hooked module is in training mode.
        enabled: collect at all (set ``False`` to pause; the hooks then return at once).
        **kwargs: passed to the penalty (e.g. ``rho=0.1`` for ``"kl"``).

    Raises:
        ValueError: no layer, an unknown layer name or penalty name.

    Example:
        >>> pen = ActivationPenalty(net, ["conv1.0.2", "conv2.0.2"], "hoyer", lam=1e-3)
        >>> for x, target in loader:
        ...     loss = task_loss(net(x), target) + pen.loss()
        ...     loss.backward()
    """

    def __init__(self, model: torch.nn.Module, layers, penalty: Union[str, Callable] = "l1", lam: float = 1.0, *,
                 only_training: bool = True, enabled: bool = True, **kwargs):
        if isinstance(penalty, str):
            if penalty not in PENALTIES:
                raise ValueError(f"ActivationPenalty: unknown penalty {penalty!r}; choose one of {list(PENALTIES)} "
                                 "or pass a callable")
            penalty = PENALTIES[penalty]
        elif not callable(penalty):
            raise TypeError(f"ActivationPenalty: penalty must be a name or a callable, got {type(penalty).__name__}")
        _check_lam(lam, "ActivationPenalty")
        self._modules = _resolve_modules(model, layers, "ActivationPenalty")
        if not self._modules:
            raise ValueError("ActivationPenalty: no layer given; name the layers whose outputs to penalise")
        self.model = model
        self.penalty = penalty
        self.lam = lam
        self.kwargs = dict(kwargs)
        self.only_training = bool(only_training)
        self.enabled = bool(enabled)
        self._terms: List[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._make_hook()) for m in self._modules.values()]

    @property
    def layers(self) -> List[str]:
        """The names of the penalised modules."""
        return list(self._modules)

    @property
    def num_pending(self) -> int:
        """How many penalty terms are waiting for :meth:`loss`."""
        return len(self._terms)

    def _make_hook(self):
        def hook(module, inputs, output):
            if not self.enabled or (self.only_training and not module.training):
                return None
            self._terms.append(self.penalty(output, lam=self.lam, **self.kwargs))
            return None

        return hook

    def loss(self) -> torch.Tensor:
        """The sum of the penalties collected since the last call (0 if none), and clears them."""
        terms, self._terms = self._terms, []
        if not terms:
            p = next(self.model.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None,
                               dtype=p.dtype if p is not None and p.is_floating_point() else None)
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def clear(self) -> None:
        """Drops the collected terms."""
        self._terms = []

    def remove(self) -> None:
        """Removes the hooks and drops the collected terms."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms = []

    def __enter__(self) -> "ActivationPenalty":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ----------------------------------------------------------------------------- relufy
def _relu_like(module: torch.nn.Module) -> torch.nn.Module:
    relu = snn.ReLU() if isinstance(module, SparseModule) else torch.nn.ReLU()
    return relu.train(module.training)


def relufy(model: torch.nn.Module, inplace: bool = False,
           types: Sequence[type] = RELUFY_TYPES) -> Tuple[torch.nn.Module, List[str]]:
    """Replaces smooth activation modules (GELU, SiLU, Mish, Hardswish) with ReLU throughout a model.

    ReLU outputs exact zeros, which sparse kernels and activation-sparsity tools can exploit; GELU
    and SiLU almost never do. ``sparseconv.nn`` activations become :class:`sparseconv.nn.ReLU`
    (they take a SparseTensor), ``torch.nn`` ones ``torch.nn.ReLU``. Only modules are replaced:
    activations called as functions inside a ``forward`` are not.

    The swap changes the function the network computes, so accuracy drops: fine-tune the model
    briefly after the swap, as Mirzadeh et al. do ("ReLU Strikes Back: Exploiting Activation
    Sparsity in Large Language Models", 2023).

    Args:
        model: the network.
        inplace: modify ``model`` itself; otherwise a deep copy is modified and ``model`` is untouched.
        types: the module types to replace (default :data:`RELUFY_TYPES`).

    Returns:
        ``(model, names)``: the model with ReLUs (the copy unless ``inplace``) and the names of the
        replaced modules, in order (a module present at several places is listed at each).

    Example:
        >>> net, replaced = relufy(net)
        >>> replaced
        ['block1.act', 'block2.act']
    """
    types = tuple(types)
    if not inplace:
        model = copy.deepcopy(model)
    if types and isinstance(model, types):
        return _relu_like(model), [""]
    replaced: List[str] = []

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if types and isinstance(child, types):
                setattr(parent, name, _relu_like(child))
                replaced.append(full)
            else:
                visit(child, full)

    visit(model, "")
    return model, replaced
