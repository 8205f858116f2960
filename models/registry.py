"""A registry of reference networks by name (timm style): :func:`register_model`,
:func:`create_model`, :func:`list_models`.

The registry is filled once, at import of :mod:`sparseconv.models`, by the ``@register_model``
decorators of the model modules; it is not meant to change afterwards (registering a name twice
is an error).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List

import torch

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint"]

_REGISTRY: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Registers a model class or factory under ``name``.

    Args:
        name: lower-case identifier such as ``"second"``, unique.

    Raises:
        ValueError: ``name`` is empty, not lower case, or already registered.

    Example:
        >>> @register_model("tiny_net")
        ... class TinyNet(torch.nn.Module): ...
    """
    if not isinstance(name, str) or not name or name != name.lower() or any(c.isspace() for c in name):
        raise ValueError(f"model names are non-empty lower-case strings without spaces, got {name!r}")

    def deco(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models(filter: str = "") -> List[str]:
    """Sorted names of the registered models, optionally those matching a glob ``filter``
    (``"centerpoint*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, filter)] if filter else names


def model_entrypoint(name: str) -> Callable[..., torch.nn.Module]:
    """The class or factory registered as ``name``.

    Raises:
        KeyError: no model of that name; the message lists the registered names.
    """
    if name not in _REGISTRY:
        raise KeyError(f"no model named {name!r}; registered models: {', '.join(list_models()) or '(none)'}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """Builds the model registered as ``name`` with keyword arguments ``kwargs``.

    Args:
        name: a name from :func:`list_models`.
        **kwargs: passed to the model's constructor.

    Returns:
        The model (a fresh ``torch.nn.Module``).

    Raises:
        KeyError: unknown ``name`` (the message lists the registered names).

    Example:
        >>> import sparseconv.models as M
        >>> net = M.create_model("voxel_backbone8x", input_channels=4, grid_size=(176, 200, 20))
    """
    return model_entrypoint(name)(**kwargs)
