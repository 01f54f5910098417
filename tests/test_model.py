"""The decoder against transformers' DeepseekV3ForCausalLM, on generated Kimi-format checkpoints."""

import pytest
import torch

from hybrid.api import load_model as _load_model
from hybrid.experts.options import ExpertOptions
from hybrid.model.batch import ForwardBatch
from hybrid.model.synthetic import write_checkpoint
from hybrid.offload.layout import Layout
from reference import load_reference
from conftest import VARIANTS


def load_model(folder, dtype=torch.bfloat16):
    """The model with the portable torch expert backend, which computes in the model's dtype."""
    return _load_model(folder, Layout.on("cpu", experts=ExpertOptions(backend="torch")), dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def prompt(vocab: int, n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, variant_dir, tmp_path):
    folder = variant_dir(variant)
    ours = load_model(folder, dtype=torch.float32)
    ref = load_reference(folder, tmp_path / "ref")
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert rel(ours.logits(ids), expected) <= 1e-4


def test_greedy_generation_matches_reference_and_cache_free_logits(tiny_dir, tmp_path):
    ours = load_model(tiny_dir, dtype=torch.float32)
    ref = load_reference(tiny_dir, tmp_path / "ref")
    ids = prompt(ours.config.vocab_size)
    tokens, step_logits = ours.generate(ids, 32, return_logits=True)
    expected = ref.generate(ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 32:].tolist()
    assert tokens == expected
    full = torch.cat([ids, torch.tensor(tokens)])
    cache_free = ours.logits(full)[31:63]  # the logits that chose each generated token
    for step in range(32):
        assert rel(step_logits[step], cache_free[step]) <= 1e-4, f"step {step}"


def test_decode_logits_are_the_cache_free_logits(tiny_dir):
    """`logits(decode=True)` feeds the tokens one a step through the cache (what the quality bench
    measures as generation's path); it needs a cache to say how latents are stored."""
    model = load_model(tiny_dir, dtype=torch.float32)
    ids = prompt(model.config.vocab_size, 40)
    assert rel(model.logits(ids, kv_dtype="bf16", decode=True), model.logits(ids)) <= 1e-5
    with pytest.raises(ValueError, match="kv_dtype"):
        model.logits(ids, decode=True)


# INT4 checkpoints of other shapes: wider layers and more experts (kt's tiles), an intermediate
# size kt-kernel cannot take (the torch fallback), group-limited routing.
SHAPES = {
    "tiny": {},
    "wide": {"hidden_size": 512, "moe_intermediate_size": 256, "n_routed_experts": 32, "num_experts_per_tok": 8},
    "odd_rows": {"moe_intermediate_size": 96},
    "grouped": {"n_group": 4, "topk_group": 2},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_default_path_tracks_float32(shape, models_dir):
    """The default path (bf16, the backend this CPU gets) against the float32 model with the
    reference torch backend. With random weights bf16 rounding flips some routing choices, which
    moves logits by ~0.1 relative; a broken kernel is off by ~1."""
    folder = write_checkpoint(models_dir / f"shape_{shape}", seed=2, **SHAPES[shape])
    ids = prompt(1280, 64)
    exact = load_model(folder, dtype=torch.float32).logits(ids)
    fast = _load_model(folder).logits(ids)
    assert rel(fast, exact) <= 0.3
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


def test_a_batch_of_decode_steps_equals_each_alone(tiny_dir):
    """Decode rows of contexts of different lengths attend in one padded pass: the padding must
    not leak into any of them."""
    model = load_model(tiny_dir, dtype=torch.float32)
    lengths, span = (5, 17, 9), 32
    cache = model.new_cache(len(lengths) * span)
    prompts = [prompt(model.config.vocab_size, n) for n in lengths]
    slots = [torch.arange(i * span, i * span + n + 1) for i, n in enumerate(lengths)]
    for ids, s in zip(prompts, slots):
        model.decoder(ForwardBatch.single(ids, 0, s[:-1]), cache)
    nxt = torch.tensor([7, 8, 9])
    together = model.decoder(ForwardBatch(nxt, torch.tensor(lengths), [1, 1, 1], slots), cache)
    for i, (n, s) in enumerate(zip(lengths, slots)):
        alone = model.decoder(ForwardBatch.single(nxt[i:i + 1], n, s), cache)[0]
        assert rel(together[i], alone) <= 1e-5, i


def test_prefill_attention_in_blocks_of_queries_equals_one_block(tiny_dir, monkeypatch):
    from hybrid.model import attention

    model = load_model(tiny_dir, dtype=torch.float32)
    ids = prompt(model.config.vocab_size, 40)
    whole = model.logits(ids)
    monkeypatch.setattr(attention, "SCORES_BYTES", 1)  # blocks of 16 queries: 3 blocks
    assert rel(model.logits(ids), whole) <= 1e-6


def test_warm_up_runs_the_decode_kernels_and_leaves_no_trace(tiny_dir):
    """`warm_up` (run before `hybrid serve` starts its engine) runs decode steps of one and of two
    sequences, which build the kernels where they run (the native decode kernel where it runs, the
    compiled GEMV where chosen), and changes nothing generation sees."""
    from unittest.mock import patch

    from hybrid.model import attention
    from hybrid.native import decode

    model = load_model(tiny_dir)
    ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(5))
    before = model.generate(ids, 6)
    with patch.object(attention.MLA, "_native_decode", autospec=True,
                      side_effect=attention.MLA._native_decode) as spy:
        model.warm_up()
    layers = model.config.num_hidden_layers
    assert spy.call_count == (2 * layers if decode.isa() else 0)
    assert model.generate(ids, 6) == before


def test_prefill_probabilities_come_from_fp32_scores_of_the_bf16_values():
    """A block of the CPU prefill's causal softmax, on the bf16 attention kernel where this CPU has
    bf16 instructions (`bf16_math`) and on torch's fp32 ops for fp32 values: for bf16 values both
    are the float64 softmax to their output's rounding (bf16: 2^-9), where bf16 scores would move
    each probability by ~0.4%, and zero where masked. Ragged sizes (tiles of 8 queries, 32 keys),
    blocks that start inside the queries, a query that sees one key."""
    from hybrid.model.attention import block_probs

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 45, 192, generator=g).bfloat16() for _ in range(2))
    for s, e, seen in ((0, 45, 1), (13, 30, 20), (40, 41, 5), (0, 20, 26)):
        keys = seen + e - s - 1
        scores = 0.3 * q[:, s:e].double() @ k[:, :keys].double().transpose(1, 2)
        hidden = torch.arange(keys)[None] >= seen + torch.arange(e - s)[:, None]
        want = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        for dtype, bound in ((torch.bfloat16, 2**-8), (torch.float32, 1e-5)):
            got = block_probs(q.to(dtype), k.to(dtype), 0.3)(s, e, seen).double()
            assert got.shape == want.shape and torch.all(got[..., hidden] == 0), (s, e, seen, dtype)
            assert ((got - want).abs() <= bound * want + 1e-30).all(), (s, e, seen, dtype)


def test_a_bf16_prompt_on_a_cpu_without_bf16_math_takes_torchs_fp32_scores(tiny_dir, monkeypatch):
    """Where the CPU has no bf16 instructions (AVX2), a bf16 model's prompt attention takes torch's
    fp32 scores instead of the bf16 kernel. Over several blocks of queries after a cached prefix,
    each path this CPU runs is as near the float32 model as bf16 gets, and, where both run, the two
    give the same logits to bf16's rounding."""
    from hybrid.model import attention
    from placement.cpu_probe import bf16_math

    monkeypatch.setattr(attention, "SCORES_BYTES", 1)  # blocks of 16 queries
    ids = prompt(1280, 40)

    def logits(model) -> torch.Tensor:
        cache = model.new_cache(40)
        model.decoder(ForwardBatch.single(ids[:24], 0, torch.arange(24)), cache)
        return model.decoder(ForwardBatch.single(ids[24:], 24, torch.arange(40)), cache, logits_index=torch.arange(16))

    exact = logits(load_model(tiny_dir, dtype=torch.float32))
    model = load_model(tiny_dir)
    got = {}
    for path in (False, True) if bf16_math() else (False,):
        monkeypatch.setattr(attention, "bf16_math", lambda: path)
        got[path] = logits(model)
        assert rel(got[path], exact) <= 0.3, path  # as test_default_path_tracks_float32 holds bf16
    if len(got) == 2:
        assert rel(got[False], got[True]) <= 1e-2
