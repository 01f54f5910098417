"""Quality as a user would notice it: perplexity on held-out standard-library text.

Every runtime path (expert backend and kernel, compute dtype, dense kernel, expert deferral, KV
cache, decode) states its tolerance as the most its perplexity may exceed the float32 path's,
relative; the tests hold each path to it and `python -m bench.quality` records the figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from hybrid.corpus import held_out_files, read
from hybrid.tokenizer import Tokenizer

WINDOW = 256  # tokens per window: the default model's training context
# Decode paths read only the first DECODE_TOKENS held-out tokens (four windows) and are compared
# with float32 over those same tokens: a decode step takes ~45 ms on a 2-core CPU, so the bench's
# 16,384 tokens would take 12 minutes a path.
DECODE_TOKENS = 1024


@dataclass(frozen=True)
class ComputePath:
    """One way the runtime computes, as `load_model` arguments, and its documented tolerance:
    the most its held-out perplexity may exceed the float32 path's (0.01 = 1%)."""

    name: str
    tolerance: float
    dtype: torch.dtype = torch.bfloat16
    backend: str = "auto"
    method: str = "auto"
    dense: str | None = None
    defer: int = 0
    device: str = "cpu"  # where the dense modules run
    gpu_experts: bool = False  # every routed expert resident on `device` (the GPU hot-expert cache)
    kv_dtype: str | None = None  # each window attends through a KV cache stored so (None: no cache)
    decode: bool = False  # each window fed one token a step through that cache, as generation runs
    note: str = ""

    def missing(self) -> str | None:
        """Why this path cannot run on this machine, or None."""
        from hybrid.experts import cpu
        from hybrid.experts import dot_backend
        from hybrid.model import dense_kernel

        if self.device != "cpu" and not torch.cuda.is_available():
            return "no GPU on this machine"
        if self.backend == "kt" and cpu.kt().reason:
            return cpu.kt().reason
        if self.backend == "dot" and dot_backend.why_not():
            return dot_backend.why_not()
        if self.dense and self.dense not in dense_kernel.supported():
            return {"onednn": "the onednn dense kernel needs bf16 instructions",
                    "compiled": "the compiled dense kernel needs a C++ compiler"}[self.dense]
        return None

    def load(self, folder):
        """The model at `folder`, loaded to compute this way."""
        from hybrid.api import load_model
        from hybrid.experts.options import ExpertOptions
        from hybrid.model.checkpoint import Checkpoint
        from hybrid.offload.layout import Layout

        hot = {}
        if self.gpu_experts:
            ckpt = Checkpoint(folder)
            hot = {layer: list(range(ckpt.config.n_routed_experts)) for layer in ckpt.config.moe_layers}
            ckpt.close()
        layout = Layout.on(self.device, defer=self.defer, hot_experts=hot,
                           experts=ExpertOptions(backend=self.backend, method=self.method))
        return load_model(folder, layout, dtype=self.dtype, dense=self.dense)

    def logits_of(self, model) -> Callable[[torch.Tensor], torch.Tensor]:
        """`ids -> float32 logits` of `model` (as `load` made it) computed this way, as `perplexity` takes."""
        return partial(model.logits, kv_dtype=self.kv_dtype, decode=self.decode)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        """The part of the held-out `ids` this path reads (a decode path: the first DECODE_TOKENS)."""
        return ids[:DECODE_TOKENS] if self.decode else ids


REFERENCE = ComputePath("float32, torch experts", 0.0, torch.float32, "torch", note="the reference: dequantized INT4, fp32")
PATHS = (
    ComputePath("bf16, torch backend", 0.005, backend="torch", dense="torch",
         note="bf16 activations and dense weights; experts on torch's packed INT4 kernel where it proves itself"),
    ComputePath("bf16, INT4 dot kernel", 0.005, backend="dot", dense="torch",
         note="our INT4 kernel: int8 activations against the checkpoint's own INT4 (the default path)"),
    ComputePath("bf16, kt int4_kgroup", 0.005, backend="kt", method="int4_kgroup", dense="torch",
         note="kt-kernel on the checkpoint's own INT4 (where the dot kernel cannot run)"),
    ComputePath("bf16, dense on oneDNN", 0.005, backend="torch", dense="onednn",
         note="the CPU-speed work's dense kernel, vs torch's bf16 matmul"),
    # With 4 experts per token, k = 1 defers a quarter of a token's routed experts (Kimi: one of 8).
    ComputePath("bf16, deferral k = 1", 0.02, backend="torch", dense="torch", defer=1,
         note="each token's lowest-weight expert added one MoE layer late"),
    ComputePath("bf16, deferral k = 2", 0.04, backend="torch", dense="torch", defer=2,
         note="its two lowest-weight experts added one MoE layer late"),
    ComputePath("bf16, FP8 KV cache", 0.005, backend="torch", dense="torch", kv_dtype="fp8",
                note="latents read back from float8 e4m3 with per-token scales (kv_cache.dtype: fp8)"),
    # Generation's own path: one token a step, attention absorbed into the latents of the cache.
    ComputePath("bf16, decode", 0.005, backend="torch", dense="torch", kv_dtype="bf16", decode=True,
                note="one token a step, absorbed attention over the bf16 latent cache (what generation runs: "
                     "the native decode kernel where it runs)"),
    ComputePath("bf16, decode, FP8 KV cache", 0.005, backend="torch", dense="torch", kv_dtype="fp8", decode=True,
                note="the same over latents stored as float8 e4m3 (kv_cache.dtype: fp8)"),
    ComputePath("bf16, decode, compiled GEMV", 0.005, backend="torch", dense="compiled", kv_dtype="bf16",
                decode=True, note="one token a step with the dense projections on the compiled GEMV (compiled.py)"),
    ComputePath("bf16, decode, INT4 dot kernel", 0.005, backend="dot", dense="compiled", kv_dtype="bf16",
                decode=True, note="one token a step with the routed experts on the INT4 dot kernel, dense on the compiled GEMV"),
    ComputePath("bf16, dense on the GPU", 0.005, device="cuda", note="attention, shared and dense MLPs on cuda:0; experts on the CPU"),
    ComputePath("bf16, all experts on the GPU", 0.005, device="cuda", gpu_experts=True,
         note="every routed expert in the GPU's hot-expert cache"),
)


def held_out_ids(tok: Tokenizer, limit: int | None = None) -> torch.Tensor:
    """The held-out files' tokens, each file ended by `[EOS]`; the first `limit` tokens if given."""
    eos = tok.special["[EOS]"]
    ids: list[int] = []
    for path in held_out_files():
        ids += tok.encode(read(path)) + [eos]
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids[:limit])


def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, window: int = WINDOW) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each window of `ids`
    (windows side by side, each read from its own start)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = logits_of(chunk)[:-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


def unigram_perplexity(train_ids: torch.Tensor, ids: torch.Tensor, vocab: int, window: int = WINDOW) -> float:
    """The same measure for a model that knows only each token's frequency in `train_ids`
    (add-one smoothed): the floor any trained model must beat."""
    logp = torch.log((torch.bincount(train_ids, minlength=vocab).double() + 1) / (len(train_ids) + vocab))
    return perplexity(lambda chunk: logp.float().expand(len(chunk), -1), ids, window)
