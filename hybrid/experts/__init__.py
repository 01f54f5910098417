"""CPU expert backends behind one interface, chosen by the profile's options."""

from __future__ import annotations

import logging

import torch

from hybrid.experts import cpu
from hybrid.experts.backend import ExpertBackend
from hybrid.experts.options import ExpertOptions
from hybrid.experts.torch_backend import PackedInt4Experts, TorchExperts
from hybrid.experts.weights import ExpertWeights

log = logging.getLogger(__name__)
_warned: set[str] = set()


def make_backend(weights: ExpertWeights, layer: int, options: ExpertOptions = ExpertOptions(),
                 dtype: torch.dtype = torch.bfloat16, top_k: int = 8) -> ExpertBackend:
    """kt-kernel where it can run (`auto`, or `kt`, which fails if it cannot), else torch.
    `dtype`: the model's compute dtype. kt-kernel computes in bf16, so `auto` gives a model that
    computes in another dtype (float32 for exact comparisons) the torch backend, which honours it.
    `top_k`: the most experts a token may use (kt-kernel sizes its buffers by it)."""
    if options.backend == "kt" or (options.backend == "auto" and dtype == torch.bfloat16):
        reason = cpu.kt().reason
        if reason is None:
            from hybrid.experts.kt_backend import KTExperts, Unsupported

            try:
                return KTExperts(weights, layer, options.method, options.threads, options.cache_dir, top_k)
            except Unsupported as e:
                reason = str(e)
        if options.backend == "kt":
            raise RuntimeError(f"expert backend kt was asked for, but {reason}")
        if reason not in _warned:
            _warned.add(reason)
            log.warning("routed experts run on the portable torch backend, much slower: %s", reason)
    if dtype == torch.bfloat16 and PackedInt4Experts.fits(weights):
        return PackedInt4Experts(weights)
    return TorchExperts(weights, dtype)


__all__ = ["ExpertBackend", "ExpertOptions", "ExpertWeights", "PackedInt4Experts", "TorchExperts", "make_backend"]
