"""Base class of the sparse layers."""
import torch

__all__ = ["SparseModule"]


class SparseModule(torch.nn.Module):
    """Marker base class: a module that takes a :class:`~sparseconv.SparseTensor` itself.

    :class:`~sparseconv.nn.SparseSequential` passes a SparseTensor to these
    whole, and applies any other ``torch.nn.Module`` to its features.
    """
