"""Which backend runs a layer's routed experts: the best one that can run them here and passes its
self-check on this CPU, falling back to the plain torch backend, the reference."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from hybrid.experts import cpu, dot_backend, self_check
from hybrid.experts.backend import ExpertBackend
from hybrid.experts.dot_backend import DotExperts
from hybrid.experts.options import ExpertOptions
from hybrid.experts.torch_backend import PackedInt4Experts, TorchExperts
from hybrid.experts.weights import ExpertWeights
from placement.model_spec import INT4_DOT_TAKES

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def make_backend(weights: ExpertWeights, layer: int, options: ExpertOptions = ExpertOptions(),
                 dtype: torch.dtype = torch.bfloat16, top_k: int = 8) -> ExpertBackend:
    """The first backend, best first, that can run these experts here and passes its self-check:
    for INT4 experts our INT4 dot kernel (`auto`, or `dot`, which fails if it cannot run them),
    then kt-kernel (`auto`, or `kt`, which fails if kt-kernel cannot run them at all), then torch's
    packed INT4 kernel, then the plain torch backend (the reference itself, always right).
    `dtype`: the model's compute dtype. The fast kernels compute in bf16 or int8, so `auto` gives a
    model that computes in another dtype (float32 for exact comparisons) the torch backend, which
    honours it. `top_k`: the most experts a token may use (kt-kernel sizes its buffers by it)."""
    return choose_backend(weights, layer, options, dtype, top_k)[0]


def choose_backend(weights: ExpertWeights, layer: int, options: ExpertOptions = ExpertOptions(),
                   dtype: torch.dtype = torch.bfloat16,
                   top_k: int = 8) -> tuple[ExpertBackend, list[self_check.Verdict]]:
    """`make_backend`'s choice and the self-check verdicts it was reached by, refusals first."""
    verdicts = []
    for backend in _candidates(weights, layer, options, dtype, top_k):
        if type(backend) is TorchExperts or not options.self_check:
            return backend, verdicts
        verdicts.append(self_check.check(backend, weights))
        if verdicts[-1].ok:
            return backend, verdicts
        _warn_once(f"refusing expert kernel {verdicts[-1]} on this CPU ({cpu.describe()}); trying the next one")
    raise AssertionError("unreachable: the plain torch backend is always a candidate")


def _candidates(weights: ExpertWeights, layer: int, options: ExpertOptions, dtype: torch.dtype,
                top_k: int) -> Iterator[ExpertBackend]:
    if options.backend == "dot" or (options.backend == "auto" and dtype == torch.bfloat16 and weights.format == "int4"):
        unavailable = dot_backend.why_not()
        reason = unavailable or (None if DotExperts.fits(weights) else
                                 f"it takes INT4 experts in host memory with {INT4_DOT_TAKES}; these are "
                                 f"{weights.format}, {weights.hidden_size} x {weights.intermediate_size}, "
                                 f"group {weights.group_size}")
        if reason is None:
            yield DotExperts(weights)
        elif options.backend == "dot":
            raise RuntimeError(f"expert backend dot was asked for, but {reason}")
        elif unavailable:
            _warn_once(f"the INT4 dot kernel cannot run here: {reason}")
    if options.backend == "kt" or (options.backend == "auto" and dtype == torch.bfloat16):
        reason = cpu.kt().reason
        if reason is None:
            from hybrid.experts.kt.backend import KTExperts
            from hybrid.experts.kt.kernels import Unsupported

            try:
                backend = KTExperts(weights, layer, options.method, options.threads, options.cache_dir, top_k)
            except Unsupported as e:
                reason = str(e)
            else:
                yield backend
        if reason is not None:
            if options.backend == "kt":
                raise RuntimeError(f"expert backend kt was asked for, but {reason}")
            _warn_once(f"routed experts run on the portable torch backend, much slower: {reason}")
    if dtype == torch.bfloat16 and PackedInt4Experts.fits(weights):
        yield PackedInt4Experts(weights)
    yield TorchExperts(weights, dtype)


def default_kernel(options: ExpertOptions = ExpertOptions()) -> tuple[ExpertBackend, list[self_check.Verdict]]:
    """What the default path runs here for an INT4 layer in Kimi's format (group-32 scales), and
    the self-check verdicts it reached that choice by, refusals first."""
    from hybrid.quant import quantize_int4

    g = torch.Generator().manual_seed(0)
    e, h, i = 16, 512, 256
    gate, up, down = (quantize_int4(torch.randn(e * o, n, generator=g) / n**0.5) for o, n in ((i, h), (i, h), (h, i)))
    weights = ExpertWeights("int4", *(q.view(e, -1, q.shape[-1]) for q, _ in (gate, up, down)),
                            *(s.view(e, -1, s.shape[-1]) for _, s in (gate, up, down)))
    return choose_backend(weights, 0, options)

