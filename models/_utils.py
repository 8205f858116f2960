"""Argument checks shared by the model constructors (backbones, VFEs)."""
from __future__ import annotations

import operator
from typing import Any

__all__ = ["int_arg"]


def int_arg(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (a Python, NumPy or torch integer; not a bool or a float).

    Raises:
        ValueError: naming ``name`` and the value.

    Example:
        >>> int_arg(np.int64(3), "layers")
        3
        >>> int_arg(2.0, "layers")
        Traceback (most recent call last):
        ValueError: layers must be an int >= 1, got 2.0
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return out
