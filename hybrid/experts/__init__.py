"""CPU expert backends behind one interface, chosen by the profile's options."""

from __future__ import annotations

import torch

from hybrid.experts.backend import ExpertBackend
from hybrid.experts.options import ExpertOptions
from hybrid.experts.torch_backend import TorchExperts
from hybrid.experts.weights import ExpertWeights


def make_backend(weights: ExpertWeights, layer: int, options: ExpertOptions = ExpertOptions(),
                 dtype: torch.dtype = torch.bfloat16) -> ExpertBackend:
    """`dtype`: the model's compute dtype (the torch backend computes in it)."""
    return TorchExperts(weights, dtype)


__all__ = ["ExpertBackend", "ExpertOptions", "ExpertWeights", "TorchExperts", "make_backend"]
