"""Small helpers that keep sparseconv working across torch versions."""
from __future__ import annotations

import functools

import torch

__all__ = ["eager_only"]


def _disabled(fn):
    """``torch._dynamo.disable(fn)``, made once per function."""
    wrapped = fn.__dict__.get("_sparseconv_disabled")
    if wrapped is None:
        import torch._dynamo

        wrapped = torch._dynamo.disable(fn)
        fn._sparseconv_disabled = wrapped
    return wrapped


def eager_only(fn):
    """Keeps ``fn`` out of ``torch.compile`` graphs: under compilation it runs eagerly, behind a
    graph break (``torch.compiler.disable``); in eager mode it is a plain call.

    Unlike decorating with ``torch.compiler.disable``, this never imports ``torch._dynamo`` (about a
    second) in programs that do not compile.
    """

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _disabled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return inner
