"""Small helpers that keep sparseconv working across torch versions."""
from __future__ import annotations

import functools

__all__ = ["eager_only"]


def eager_only(fn):
    """Keeps ``fn`` out of ``torch.compile`` graphs (it runs eagerly, with a graph break).

    Same as ``torch.compiler.disable(fn)``, but torch._dynamo (about a second to import) is only
    imported on the first call, not when sparseconv is imported.
    """

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        disabled = getattr(fn, "__sparseconv_disabled", None)
        if disabled is None:
            import torch._dynamo

            disabled = torch._dynamo.disable(fn)
            setattr(fn, "__sparseconv_disabled", disabled)
        return disabled(*args, **kwargs)

    return inner
