"""Multi-head latent attention (MLA), as DeepSeek-V3 / Kimi K2 define it.

Each token is compressed to a 512-dim latent (normalised) plus one 64-dim rope key shared by all
heads; only those are cached. Two ways to attend to them, equal in exact arithmetic:
- expanded (prefill): `kv_b_proj` turns the context's latents into per-head keys and values;
  cheap when many queries share one context.
- absorbed (decode): `kv_b_proj` is folded into the query and the output, so attention runs
  directly on the latents; cheap when few queries read a long context.
Decode attends to each tier of the cache where it lives (kv_cache.py: the GPU over its pages, the
CPU over the host's) and merges the parts exactly by their log-sum-exp, as split-K flash-decoding
merges blocks. On the CPU, a decode step whose contexts lie in one bf16 tier and are not too long
runs the whole layer as one call of hybrid/native/mla_decode.cpp (projections, norms, rope, the
cache write, the absorbed attention, o_proj), which reads the projections in the checkpoint's
layout: `dense_kernel.pack` leaves them so (`reads_own_weights`). `kv_b_proj` is held as its two
halves, each contiguous per head (`w_uk` makes keys, `w_uv` values): all ways read them in place,
where slices of the checkpoint's one matrix would be copied at every step.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.model.batch import ForwardBatch, TierSlots
from hybrid.model.kv_cache import KVCache
from hybrid.model.norm import RMSNorm
from hybrid.model.rope import Rope, apply_rope
from hybrid.native import build, decode
from placement.cpu_probe import bf16_math
from placement.model_config import ModelConfig

# Above this many new tokens per sequence, expanding the latents beats absorbing the weights.
ABSORB_MAX_QUERIES = 16
# Scores of one block of queries (fp32, all heads) on the CPU: sized to stay in the caches' reach,
# and under the 32 MB up to which freed blocks stay in the heap (hybrid/__init__.py).
SCORES_BYTES = 16 << 20
# Keys per block of the CPU's decode attention (_attend_blocks): a block's latents (bf16: 9.4 MB)
# stay in L3 from the scores' matmul to the output's, and the blocks are few enough that their small
# ops (each a thread barrier) cost little. On Zen 4 at 64K tokens, blocks of 4K-64K keys ran within
# noise of each other; 2K and smaller ran slower.
BLOCK_TOKENS = 8192
# Up to this many keys per sequence, a CPU decode step runs the native kernel: its attention over
# the latents is fp32 vector math, which the bf16 GEMMs of the blocked path overtake on long
# contexts (a `mini` decode step's attention on Zen 4, 2 threads: at 1K keys 5.5 against 13.2 ms,
# at 4K 14.3 against 17.6, at 16K 55 against 35).
NATIVE_MAX_TOKENS = 4096
# Up to this many keys per sequence, the CPU's decode attention runs all sequences at once over
# padded copies, as a GPU does: the copies are small, and a batch's sequences share each op (one
# by one, 16 sequences at 128 tokens took a 16-stream decode step 14% longer on Zen 4).
PADDED_MAX_TOKENS = 1024


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.w_uk = nn.Parameter(torch.empty(self.n_heads, self.nope, self.rank), requires_grad=False)
        self.w_uv = nn.Parameter(torch.empty(self.n_heads, self.v_dim, self.rank), requires_grad=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.native_decode = True  # decode steps over short CPU contexts as one native call, where it runs

    def load_kv_b(self, weight: torch.Tensor) -> None:
        """Take the checkpoint's kv_b_proj [heads * (nope + v), rank] as its two halves."""
        w = weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        self.w_uk = nn.Parameter(w[:, : self.nope].contiguous(), requires_grad=False)
        self.w_uv = nn.Parameter(w[:, self.nope:].contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: Rope, cache: KVCache | None) -> torch.Tensor:
        n = x.shape[0]
        seqs, rows, tiers = batch.single_queries  # decode: all sequences in one pass
        if len(seqs) == n and self._native_here(x, cache, tiers):
            return self._native_decode(x, cache, tiers[0], *batch.cos_sin(rope))
        q_nope, q_rope, latent, k_rope = self._inputs(x, *batch.cos_sin(rope))

        out = torch.empty(n, self.n_heads, self.v_dim, dtype=x.dtype, device=x.device)
        if cache is not None:
            new = [slots[-q_len:] for slots, q_len in zip(batch.slots, batch.q_lens)]
            cache.write(self.layer, torch.cat(new), latent, k_rope)
        if seqs:
            rows = rows.to(x.device)
            q = self._absorb(q_nope[rows, None], q_rope[rows, None])
            # the queries reach each tier's memory before any part starts, so the GPU's part runs
            # while the CPU computes the host's
            at = {part.tier: cache.tier_device(self.layer, part.tier) for part in tiers}
            queries = {d: tuple(t.to(d) for t in q) for d in set(at.values())}
            parts = [tuple(t.to(x.device) for t in self._attend_tier(*queries[at[part.tier]], cache, part))
                     for part in tiers]
            out[rows] = self._output(merge(parts)[0].to(x.dtype), 1)[:, 0]
        done = set(seqs)
        for i, (start, q_len) in enumerate(zip(itertools.accumulate([0, *batch.q_lens]), batch.q_lens)):
            if i in done:
                continue
            rows = slice(start, start + q_len)
            if cache is None:
                ctx_latent, ctx_rope = latent[rows], k_rope[rows]
            else:
                ctx_latent, ctx_rope = cache.read(self.layer, batch.slots[i])
            mask = self._mask(q_len, ctx_latent.shape[0], x.device)
            if q_len <= ABSORB_MAX_QUERIES and cache is not None:
                q_latent, q_pe = self._absorb(q_nope[None, rows], q_rope[None, rows])
                part = self._attend(q_latent, q_pe, ctx_latent[None], ctx_rope[None], mask[None])
                out[rows] = self._output(part[0].to(x.dtype), q_len)[0]
            else:
                out[rows] = self._expanded(q_nope[rows], q_rope[rows], ctx_latent, ctx_rope, mask)
        return self.o_proj(out.reshape(n, -1))

    def _inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The queries [n, heads, nope] and [n, heads, rope], the latents [n, rank] (normalised) and
        the rope keys [n, rope] of tokens x [n, hidden]."""
        n = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.n_heads, self.nope + self.rope_dim)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        return (q[..., : self.nope], apply_rope(q[..., self.nope:], cos, sin), self.kv_a_layernorm(latent),
                apply_rope(k_rope, cos, sin))

    @property
    def reads_own_weights(self) -> bool:
        """Whether decode steps run the native kernel here, which reads the projections' weights as
        the checkpoint lays them out: `dense_kernel.pack` then leaves them so."""
        return self.native_decode and decode.isa() is not None and self.o_proj.weight.device.type == "cpu"

    def _native_here(self, x: torch.Tensor, cache: KVCache | None, tiers: list[TierSlots]) -> bool:
        """Whether this decode step runs `hybrid_mla_decode`: on the CPU, every projection plain
        bf16, the contexts in one bf16 tier of the cache and at most NATIVE_MAX_TOKENS long, head
        dims within the kernel's buffers."""
        if (cache is None or len(tiers) != 1 or x.dtype != torch.bfloat16 or self.rope_dim > 256 or self.nope > 512
                or not self.reads_own_weights):
            return False
        tier = cache.tiers[self.layer][tiers[0].tier]
        return (tier.scale is None and tier.data.dtype == torch.bfloat16 and tier.data.device.type == "cpu"
                and tiers[0].longest <= NATIVE_MAX_TOKENS and self._native_weights() is not None)

    def _native_weights(self) -> tuple | None:
        """The kernel's weight arguments, in its order (None for a model without a low-rank query),
        or None where a projection is not a plain bf16 nn.Linear (packed for another kernel). Looked
        up once, and again whenever a module or kv_b's halves are replaced (loading, packing): a
        decode step asks every layer, and a module's attribute lookups cost ~25 us a layer."""
        key = (*map(id, self._modules.values()), id(self._parameters["w_uk"]), id(self._parameters["w_uv"]))
        cached = self.__dict__.get("_native_cache")
        if cached is None or cached[0] != key:
            low_rank = hasattr(self, "q_a_proj")
            names = ("q_a_proj", "q_b_proj") if low_rank else ("q_proj",)
            projections = [getattr(self, name) for name in (*names, "kv_a_proj_with_mqa", "o_proj")]
            weights = None
            if all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in projections):
                q_rank = self.q_a_proj.out_features if low_rank else 0
                norm = lambda n: n.weight.to(torch.bfloat16)  # noqa: E731
                weights = (self.q_a_proj.weight if low_rank else None, norm(self.q_a_layernorm) if low_rank else None,
                           (self.q_b_proj if low_rank else self.q_proj).weight, self.kv_a_proj_with_mqa.weight,
                           norm(self.kv_a_layernorm), self.w_uk, self.w_uv, self.o_proj.weight,
                           torch.tensor([self.o_proj.out_features, q_rank, self.n_heads, self.nope, self.rope_dim,
                                         self.v_dim, self.rank], dtype=torch.int32))
            self.__dict__["_native_cache"] = cached = (key, weights)
        return cached[1]

    def _native_decode(self, x: torch.Tensor, cache: KVCache, part: TierSlots, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
        """One token of each sequence through hybrid/native/mla_decode.cpp: the layer's attention,
        its new latents written to the cache, as one call."""
        tier = cache.tiers[self.layer][part.tier]
        index, _ = part.padded
        slots = index - tier.start if tier.start else index
        *weights, dims = self._native_weights()
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        out = torch.empty_like(x)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        rc = build.load().hybrid_mla_decode(
            decode.CODES[decode.isa()], x.shape[0], ptr(dims), ptr(x), *map(ptr, weights), ptr(cos), ptr(sin),
            ptr(tier.data), ptr(slots), ptr(part.lengths), slots.shape[1], self.kv_a_layernorm.eps, self.scale,
            ptr(out))
        if rc:
            raise RuntimeError(f"the native MLA decode kernel failed ({rc}) on {decode.isa()}")
        return out

    def _mask(self, q_len: int, ctx_len: int, device) -> torch.Tensor:
        """Causal mask for the last q_len positions of a ctx_len context: [q_len, ctx_len] bool."""
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
        return torch.arange(ctx_len, device=device)[None, :] <= q_pos

    def _expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Per-head keys and values from the latents, then attention: torch's fused kernel on a
        GPU; on the CPU, blocks of queries, each one's causal softmax over fp32 scores (`block_probs`)
        times the values in one GEMM (torch's CPU kernel falls back to unfused math for MLA's unequal
        key and value widths, 3x slower)."""
        ctx, h = latent.shape[0], self.n_heads
        k_nope = F.linear(latent, self.w_uk.view(h * self.nope, self.rank)).view(ctx, h, self.nope)
        v = F.linear(latent, self.w_uv.view(h * self.v_dim, self.rank)).view(ctx, h, self.v_dim).transpose(0, 1)
        q = torch.cat((q_nope, q_rope), -1).transpose(0, 1)
        k = torch.cat((k_nope, k_rope[:, None].expand(ctx, h, self.rope_dim)), -1).transpose(0, 1)
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(0, 1)
        out = torch.empty(q.shape[1], h, self.v_dim, dtype=q.dtype, device=q.device)
        block = max(16, SCORES_BYTES // (h * ctx * 4))
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # else each block's GEMMs would copy them
        probs_of = block_probs(q, k, self.scale)
        past = ctx - q.shape[1]  # the mask is causal: query s sees keys 0 .. past + s
        for s in range(0, q.shape[1], block):
            e = min(q.shape[1], s + block)
            probs = probs_of(s, e, past + s + 1)
            out[s:e] = torch.bmm(probs.to(v.dtype), v[:, :probs.shape[-1]]).transpose(0, 1)
        return out

    def _absorb(self, q_nope, q_rope) -> tuple[torch.Tensor, torch.Tensor]:
        """S sequences of q queries each, q_nope, q_rope [S, q, heads, .], as queries on the latents:
        [S, heads * q, rank] (w_uk folded in) and [S, heads * q, rope]. kv_b's halves are read once
        for all S, whatever S is."""
        s, q, h, _ = q_nope.shape
        q_latent = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(h, s * q, self.nope), self.w_uk)  # [h, s*q, rank]
        q_latent = q_latent.view(h, s, q, self.rank).transpose(0, 1).reshape(s, h * q, self.rank)
        return q_latent, q_rope.permute(0, 2, 1, 3).reshape(s, h * q, self.rope_dim)

    def _attend_tier(self, q_latent, q_pe, cache: KVCache, part: TierSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """One-token queries of S sequences [S, heads, .] over their slots in one tier, where it
        lives: outputs [S, heads, rank] and log-sum-exps [S, heads, 1] as `_attend` returns them. On
        a GPU, or on the CPU over short contexts, all sequences at once over their padded slots; on
        the CPU over longer ones, each over its own slots in blocks (`_attend_blocks`), so no padded
        copy, mask or [heads, context] scores are made."""
        if (cache.tier_device(self.layer, part.tier).type != "cpu"
                or part.longest <= PADDED_MAX_TOKENS):
            index, mask = part.padded
            latent, k_rope = cache.read_tier(self.layer, part.tier, index)
            return self._attend(q_latent, q_pe, latent, k_rope, mask.to(q_latent.device)[:, None])
        out = torch.zeros(q_latent.shape, dtype=torch.float32)
        lse = torch.full((*q_latent.shape[:2], 1), float("-inf"))
        for i, slots in enumerate(part.slots):
            if len(slots):
                blocks = cache.blocks(self.layer, part.tier, slots, BLOCK_TOKENS)
                out[i], lse[i] = self._attend_blocks(q_latent[i], q_pe[i], blocks)
        return out, lse

    def _attend_blocks(self, q_latent, q_pe, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """Flash-decoding on the CPU: one token's queries [heads, .] over a context read block by
        block (`Tier.blocks`), each block's scores, softmax and output computed while its latents are
        in the caches, the blocks merged by their log-sum-exp. An FP8 block comes unscaled: its
        per-key scales multiply the [heads, n] scores and probabilities instead of its [n, 576] values."""
        q = torch.cat([q_latent, q_pe], -1)
        parts = []
        for kv, scale in blocks:
            latent = kv[:, : self.rank]
            if scale is None:
                scores = (q @ kv.T).float()
            else:
                scores = (q_latent @ latent.T).float() * scale[:, 0]
                scores += (q_pe @ kv[:, self.rank:].T).float() * scale[:, 1]
            scores *= self.scale
            top = scores.amax(-1, keepdim=True)
            probs = scores.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            if scale is not None:
                probs *= scale[:, 0]
            parts.append(((probs.to(kv.dtype) @ latent).float() / total, top + total.log()))
        return merge(parts)

    def _attend(self, q_latent, q_pe, latent, k_rope, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Absorbed attention over one part of each context, all sequences at once: latent and
        k_rope [S, ctx, .], mask [S, q, ctx] (True: attend). Returns the part's normalised output on
        the latents [S, heads * q, rank] and its log-sum-exp [S, heads * q, 1], both fp32 (-inf
        where a row has no key here)."""
        s, hq, _ = q_latent.shape
        ctx, q = latent.shape[1], mask.shape[1]
        scores = matmul(q_latent, latent.transpose(1, 2))
        scores += matmul(q_pe, k_rope.transpose(1, 2))
        scores = (scores.float() * self.scale).view(s, hq // q, q, ctx).masked_fill(~mask[:, None], float("-inf"))
        scores = scores.view(s, hq, ctx)
        lse = torch.logsumexp(scores, -1, keepdim=True)
        probs = torch.exp(scores - torch.where(lse.isfinite(), lse, 0)).to(latent.dtype)
        return matmul(probs, latent).float(), lse

    def _output(self, out_latent, q: int) -> torch.Tensor:
        """[S, heads * q, rank] attention output on the latents -> [S, q, heads, v] (w_uv folded in)."""
        s, h = out_latent.shape[0], self.n_heads
        out_latent = out_latent.view(s, h, q, self.rank).permute(1, 3, 0, 2).reshape(h, self.rank, s * q)
        return torch.bmm(self.w_uv, out_latent).view(h, self.v_dim, s, q).permute(2, 3, 0, 1)


def block_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> Callable[[int, int, int], torch.Tensor]:
    """For queries q [heads, n, d] and keys k [heads, ctx, d] on the CPU, a function (s, e, seen) ->
    the causal softmax of queries s .. e - 1, where query s + r sees the first seen + r keys:
    [heads, e - s, seen + e - s - 1], zero where masked. Scores in fp32 (rounded to bf16 they would
    move each probability by ~0.4%). bf16 values on a CPU with bf16 instructions go to
    hybrid/native/attention_probs.cpp, which multiplies on those instructions, exactly as fp32 would,
    and returns bf16 probabilities; others to torch's fp32 GEMM and softmax."""
    heads, n, d = q.shape
    lib = build.load()
    if q.dtype == torch.bfloat16 and bf16_math() and lib is not None:
        pairs = k.view(torch.int32).transpose(1, 2).contiguous()  # [heads, d / 2, ctx]

        def native(s: int, e: int, seen: int) -> torch.Tensor:
            out = torch.empty(heads, e - s, seen + e - s - 1, dtype=torch.bfloat16)
            if lib.hybrid_attention_probs(heads, e - s, seen, d, q[:, s:e].data_ptr(), q.stride(0), pairs.data_ptr(),
                                          pairs.shape[2], scale, out.data_ptr()):
                raise RuntimeError("this CPU lacks the AVX512-BF16 instructions the attention kernel needs")
            return out

        return native
    q, k, none = q.float(), k.float(), q.new_zeros(1, 1, 1, dtype=torch.float32)

    def torch_ops(s: int, e: int, seen: int) -> torch.Tensor:
        keys = seen + e - s - 1
        scores = torch.baddbmm(none, q[:, s:e], k[:, :keys].transpose(1, 2), beta=0, alpha=scale)
        later = torch.ones(e - s, keys - seen, dtype=torch.bool, device=q.device).triu()  # row r sees r of these
        scores[..., seen:].masked_fill_(later, float("-inf"))
        return torch.softmax(scores, -1)

    return torch_ops


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over a leading batch dimension. On the CPU, one 2-D matmul per entry: there torch's
    batched bf16 matmul runs 4-8x slower than its 2-D one at decode's shapes (measured on Zen 4,
    one sequence at 32K tokens of context)."""
    if a.device.type != "cpu":
        return a @ b
    return torch.stack([x @ y for x, y in zip(a, b)])


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (output, log-sum-exp) of attention over all keys from those of disjoint parts of them:
    each part weighted by its share exp(lse - lse_total) of the whole softmax."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([lse for _, lse in parts])
    top = lse.max(0).values
    weights = torch.exp(lse - top)  # a part with no key (-inf) weighs 0
    total = weights.sum(0)
    return sum(w * out for w, (out, _) in zip(weights, parts)) / total, top + total.log()
