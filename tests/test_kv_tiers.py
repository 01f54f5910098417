"""The KV cache's host tier: attention split between the tiers equals attention over one tier, in
the model (any split point, any slot layout, decode and prefill in one batch) and in the engine
(pages leaving the device tier while sequences decode, the prefix cache across both tiers)."""

from pathlib import Path
from unittest.mock import patch

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.api import load_model
from hybrid.engine import Engine, EngineConfig, SamplingParams
from hybrid.engine.page_manager import DEVICE, HOST, PageManager
from hybrid.engine.sequence import Sequence
from hybrid.model import attention
from hybrid.model.attention import merge
from hybrid.model.batch import ForwardBatch, TierSlots
from hybrid.model.kv_cache import FP8, KVCache, decode_fp8
from conftest import KEY
from hybrid.server.app import create_app
from hybrid.server.http_server import ServerThread
from hybrid.server.serving import Serving
from hybrid.settings import settings as runtime_settings
from placement.profile import Profile

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, dtype=torch.float32)


def test_merge_of_parts_is_the_softmax_over_all_keys():
    g = torch.Generator().manual_seed(0)
    scores, values = torch.randn(3, 40, generator=g) * 4, torch.randn(40, 5, generator=g)
    whole = torch.softmax(scores, -1) @ values
    parts = []
    for keys in (slice(0, 7), slice(7, 40)):
        lse = torch.logsumexp(scores[:, keys], -1, keepdim=True)
        parts.append((torch.exp(scores[:, keys] - lse) @ values[keys], lse))
    parts.append((torch.zeros(3, 5), torch.full((3, 1), float("-inf"))))  # a part with no key
    out, lse = merge(parts)
    assert torch.allclose(out, whole, atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(scores, -1, keepdim=True), atol=1e-6)


@SETTINGS
@given(data=st.data())
def test_split_attention_equals_one_tier_for_any_split_and_layout(model, data):
    """Prefill some sequences, then one step mixing decode tokens and a prompt chunk: the logits of a
    cache split at any slot, with slots scattered over both tiers, match one tier within 1e-5."""
    lengths = data.draw(st.lists(st.integers(2, 40), min_size=1, max_size=4), label="context lengths")
    chunk = data.draw(st.integers(0, 12), label="new tokens of one more prompt (0: none)")
    total = sum(lengths) + chunk
    num_slots = total + data.draw(st.integers(0, 16), label="spare slots")
    boundary = data.draw(st.integers(0, num_slots), label="first host slot")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    layout = torch.randperm(num_slots, generator=g)[:total]
    ids = torch.randint(0, model.config.vocab_size, (total,), generator=g)
    seqs, at = [], 0
    for n in lengths + ([chunk] if chunk else []):
        seqs.append((ids[at:at + n], layout[at:at + n]))
        at += n

    def run(cache) -> torch.Tensor:
        host_from = cache.host_from
        for tokens, slots in seqs[:len(lengths)]:  # every context but its last token
            model.decoder(ForwardBatch(tokens[:-1], torch.arange(len(tokens) - 1), [len(tokens) - 1], [slots[:-1]],
                                     host_from), cache)
        q = [1] * len(lengths) + ([chunk] if chunk else [])
        step = ForwardBatch(torch.cat([t[-n:] for (t, _), n in zip(seqs, q)]),
                            torch.cat([torch.arange(len(t) - n, len(t)) for (t, _), n in zip(seqs, q)]),
                            q, [s for _, s in seqs], host_from)
        return model.decoder(step, cache)

    whole = run(model.new_cache(num_slots))
    split = run(model.new_cache(num_slots, device_slots=boundary))
    assert torch.allclose(split, whole, rtol=0, atol=1e-5), (split - whole).abs().max()


@SETTINGS
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=3), block=st.sampled_from([1, 5, 16, 4096]),
       kv_dtype=st.sampled_from(["bf16", "fp8"]), scattered=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_attention_in_blocks_equals_one_pass_over_padded_contexts(
        model, lengths, block, kv_dtype, scattered, seed):
    """The CPU's decode attention (each sequence over its own slots, block by block, FP8 scales on
    the scores, blocks merged by log-sum-exp) equals the GPU's shape of it (all sequences at once
    over padded contexts and a mask, the cache read whole) within 1e-5, for runs of consecutive
    slots read in place and for scattered ones."""
    g = torch.Generator().manual_seed(seed)
    cfg, mla = model.config, model.decoder.model.layers[0].self_attn
    cache = model.new_cache(sum(lengths) + 8, kv_dtype=kv_dtype)
    cache.write(0, torch.arange(cache.num_slots), torch.randn(cache.num_slots, cfg.kv_lora_rank, generator=g) * 3,
                torch.randn(cache.num_slots, cfg.qk_rope_head_dim, generator=g))
    layout = torch.randperm(cache.num_slots, generator=g) if scattered else torch.arange(cache.num_slots)
    ends = torch.tensor([0, *lengths]).cumsum(0).tolist()
    part = TierSlots(0, [layout[a:b] for a, b in zip(ends, ends[1:])], 0)
    q_latent = torch.randn(len(lengths), cfg.num_attention_heads, cfg.kv_lora_rank, generator=g) / 8
    q_pe = torch.randn(len(lengths), cfg.num_attention_heads, cfg.qk_rope_head_dim, generator=g)
    index, mask = part.padded
    want = mla._attend(q_latent, q_pe, *cache.read_tier(0, 0, index), mask[:, None])
    with patch.object(attention, "BLOCK_TOKENS", block), patch.object(attention, "PADDED_MAX_TOKENS", 0):
        got = mla._attend_tier(q_latent, q_pe, cache, part)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()


def test_a_block_of_consecutive_slots_is_read_in_place_and_a_scattered_one_gathered():
    cache = KVCache(1, 64, 512, 64)
    cache.write(0, torch.arange(64), torch.randn(64, 512), torch.randn(64, 64))
    data = cache.tiers[0][0].data
    (a, _), (b, _) = cache.blocks(0, 0, torch.arange(8, 40), 16)
    assert (a.data_ptr(), b.data_ptr()) == (data[8].data_ptr(), data[24].data_ptr())  # views: no copy
    (c, scale), = cache.blocks(0, 0, torch.tensor([3, 1, 2]), 16)
    assert scale is None and torch.equal(c, data[[3, 1, 2]])


def test_fp8_codes_decode_to_their_values_with_integer_ops():
    """Every e4m3 code in the normal range decodes exactly; zero and the subnormals (below 2^-6)
    read within 2^-7 of their value; nothing is NaN (the writer never stores e4m3's NaN codes)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    codes = codes[~codes.float().isnan()]
    want, got = codes.float(), decode_fp8(codes).float()
    normal = want.abs() >= 2**-6
    assert torch.equal(got[normal], want[normal])
    assert float((got[~normal] - want[~normal]).abs().max()) <= 2**-7


def _recorded(engine: Engine) -> list[torch.Tensor]:
    """The logits of every step the engine runs, appended to the returned list."""
    steps, run = [], engine.runner.run

    def recording(scheduled):
        logits = run(scheduled)
        steps.append(logits)
        return logits

    engine.runner.run = recording
    return steps


@SETTINGS
@given(page_size=st.sampled_from([1, 2, 4, 8, 16]), device_pages=st.integers(0, 6),
       lengths=st.lists(st.integers(1, 50), min_size=1, max_size=3), new=st.integers(1, 24),
       seed=st.integers(0, 2**16))
def test_sequences_crossing_into_the_host_tier_while_decoding_match_one_tier(
        model, page_size, device_pages, lengths, new, seed):
    """A device tier of a few pages: prompts start on both tiers and pages move to the host as the
    sequences decode past it; every step's logits match an engine with all pages on the device."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    prompts.append(prompts[0] + prompts[-1])  # a prefix of the first shared through the prefix cache
    tokens = (sum(lengths) + len(prompts[-1]) + (new + page_size) * len(prompts)) // page_size * page_size
    params = SamplingParams(max_tokens=new, temperature=0.0)
    runs = []
    for host in (0, max(0, tokens - device_pages * page_size)):
        engine = Engine(model, config=EngineConfig(page_size=page_size, kv_cache_tokens=tokens, host_kv_tokens=host))
        steps = _recorded(engine)
        runs.append((engine.generate(prompts, params), steps, engine))
    (out, steps, _), (split_out, split_steps, split) = runs
    assert split_out == out
    assert len(split_steps) == len(steps)
    for a, b in zip(split_steps, steps):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert split.pages.device_pages == min(device_pages, split.pages.num_pages)


def test_a_decoding_sequence_moves_its_oldest_pages_to_the_host():
    pm = PageManager(num_pages=8, page_size=2, device_pages=3)
    seq = Sequence("a", list(range(7)), SamplingParams(), 20)
    pm.allocate(seq)  # 4 pages: the first on the host, the last 3 on the device
    assert [pm.tier(p) for p in seq.pages] == [HOST, DEVICE, DEVICE, DEVICE]
    seq.num_computed = 7
    pm.publish(seq)
    for token in range(7, 11):
        seq.token_ids.append(token)
        pm.append(seq)
        seq.num_computed += 1
        pm.publish(seq)
    assert [pm.tier(p) for p in seq.pages] == [HOST, HOST, HOST, DEVICE, DEVICE, DEVICE]
    moves = pm.take_moves()
    assert len(moves) == 2 and pm.take_moves() == []
    # the prefix cache follows the moved pages: a new request with the same start finds them on the host
    again = Sequence("b", list(range(9)), SamplingParams(), 20)
    hits = [page for _, page in pm.prefix_hits(again)]
    assert hits == seq.pages[:4] and all(pm.tier(p) == HOST for p in hits[:3])


def test_a_page_another_sequence_shares_stays_where_it_is():
    pm = PageManager(num_pages=6, page_size=2, device_pages=2)
    a = Sequence("a", [1, 2, 3], SamplingParams(), 20)
    pm.allocate(a)
    a.num_computed = 3
    pm.publish(a)
    b = Sequence("b", [1, 2, 9], SamplingParams(), 20)
    pm.allocate(b)  # shares a's first page
    assert b.pages[0] == a.pages[0] and pm.tier(a.pages[0]) == DEVICE
    second = a.pages[1]
    for token in (4, 5):
        a.token_ids.append(token)
        pm.append(a)
    assert a.pages[0] == b.pages[0] and pm.tier(a.pages[0]) == DEVICE  # shared: it stays
    assert pm.moves == [(second, a.pages[1])] and pm.tier(a.pages[1]) == HOST  # a's own moved instead
    assert a.pages[2] == second and pm.tier(a.pages[2]) == DEVICE


def test_fp8_cache_rounds_each_latent_to_e4m3_with_its_own_scales():
    cache = KVCache(1, 4, 512, 64, torch.float32, kv_dtype="fp8")
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(4, 512, generator=g) * torch.tensor([[1e-3], [1.0], [30.0], [1e3]])
    rope = torch.randn(4, 64, generator=g) * 100  # its own scale: the latent's does not bound it
    cache.write(0, torch.arange(4), latent, rope)
    assert cache.tiers[0][0].data.dtype == torch.float8_e4m3fn
    got_latent, got_rope = cache.read(0, torch.arange(4))
    for got, want in ((got_latent, latent), (got_rope, rope)):
        rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert bool((rel < 0.04).all()) and bool((rel > 0).all()), rel  # e4m3: 3 mantissa bits, rounded


def test_fp8_cache_keeps_greedy_decoding_close_to_full_precision(model):
    """Tiny preset, float32 model: the first token's logits (prefill reads the FP8 cache too) within a
    few percent for most prompts, and the greedy tokens mostly the same (`python -m bench.kv_fp8` measures mini)."""
    g = torch.Generator().manual_seed(0)
    errors, first_same = [], 0
    for _ in range(8):
        prompt = torch.randint(0, model.config.vocab_size, (64,), generator=g)
        ref, ref_logits = model.generate(prompt, 4, return_logits=True)
        out, logits = model.generate(prompt, 4, return_logits=True, kv_dtype="fp8")
        errors.append(float((logits[0] - ref_logits[0]).norm() / ref_logits[0].norm()))
        first_same += out[0] == ref[0]
    assert sorted(errors)[len(errors) // 2] < 0.1, errors
    assert 0 < min(errors) and first_same >= 6, (errors, first_same)


def test_logits_through_a_cache_read_the_latents_as_stored(model):
    """What the FP8 quality path measures: a full-precision cache gives the cache-free logits, an
    FP8 one moves them (random weights amplify its rounding: 17% here; tests/test_quality.py holds
    the trained model's perplexity to its tolerance)."""
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    free = model.logits(ids)
    assert torch.allclose(model.logits(ids, kv_dtype="bf16"), free, rtol=0, atol=1e-5)
    rel = float((model.logits(ids, kv_dtype="fp8") - free).norm() / free.norm())
    assert 1e-3 < rel < 0.5, rel


def test_a_profile_with_an_fp8_cache_and_a_host_tier_reaches_the_engine(model, tiny_dir):
    profile = Profile.load(Path(__file__).parents[1] / "profiles/tiny_cpu_2core.yaml", model=tiny_dir)
    profile.kv_cache.dtype, profile.kv_cache.host_tokens = "fp8", 4096
    engine = Engine(model, config=runtime_settings(tiny_dir, profile).engine)
    device, host = engine.runner.cache.tiers[0]
    assert device.data.dtype == host.data.dtype == torch.float8_e4m3fn
    assert host.data.shape[0] == 4096 and engine.pages.device_pages * engine.pages.page_size == device.data.shape[0]
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3)) != [[]]


def test_a_served_request_longer_than_the_device_tier_decodes_as_with_a_large_one(client, tiny_dir):
    """Through the server and the official OpenAI client: a device tier of 64 tokens (4 pages),
    the rest in the host tier, against the module's server with every page on the device."""
    small = Serving.load(tiny_dir, dtype=torch.float32,
                         config=EngineConfig(kv_cache_tokens=16384, host_kv_tokens=16384 - 64))
    assert small.thread.engine.pages.device_pages == 4
    text = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(30))
    kw = dict(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=48, temperature=0,
              logprobs=True, extra_body={"thinking": {"type": "disabled"}})
    with ServerThread(create_app(small, api_key=KEY, max_body_bytes=1 << 20)) as s:
        tiered = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(**kw)
    small.thread.stop()
    whole = client.chat.completions.create(**kw)
    assert tiered.usage.prompt_tokens > 200 and tiered.usage.completion_tokens > 16  # past the device tier
    assert tiered.usage == whole.usage
    assert tiered.choices[0].message.content == whole.choices[0].message.content
    ours, theirs = tiered.choices[0].logprobs.content, whole.choices[0].logprobs.content
    assert [t.token for t in ours] == [t.token for t in theirs]
    assert [t.logprob for t in ours] == pytest.approx([t.logprob for t in theirs], abs=1e-4)


