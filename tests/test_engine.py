"""The engine on the tiny model: batching gives each request what it gets alone, prompts are
chunked, the prefix cache is shared and evicted, pages come back, sampling honours its parameters."""

import asyncio
import functools
from pathlib import Path

import pytest
import torch

from hybrid.api import load_model
from hybrid.settings import settings
from hybrid.engine import Engine, EngineConfig, EngineThread, PromptTooLong, SamplingParams
from hybrid.engine.page_manager import PageManager
from hybrid.engine.sampler import sample
from hybrid.engine.scheduler import Scheduler
from hybrid.engine.sequence import Sequence, Status
from hybrid.tokenizer import Tokenizer
from placement.profile import Profile

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir)


def prompts(n: int, seed: int = 0, low: int = 3, high: int = 90) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(0, 1000, (k,), generator=g).tolist() for k in lengths]


def test_batched_greedy_matches_each_request_alone(model):
    """Chunked prefill (16-token budget) next to decoding, many sequences per step: the same tokens
    as the cache-free reference decoding each prompt by itself."""
    engine = Engine(model, config=EngineConfig(max_batch_tokens=16))
    batch = prompts(10)
    out = engine.generate(batch, GREEDY)
    assert out == [model.generate(p, 12, stop_ids=engine.stop_ids) for p in batch]
    assert engine.pages.num_used == 0


def test_steps_mix_decode_tokens_and_a_prompt_chunk(model):
    engine = Engine(model, config=EngineConfig(max_batch_tokens=32))
    engine.add_request(prompts(1)[0][:5], GREEDY)
    engine.step()  # the short prompt is prefilled and samples its first token
    engine.add_request(list(range(100)), GREEDY)
    scheduled = engine.scheduler.schedule()
    assert [n for _, n in scheduled] == [1, 31]  # one decode token, then a chunk of the long prompt


def test_preemption_under_a_small_cache_keeps_greedy_outputs(model):
    """Eight pages of 4 slots for 4 requests of up to 20 tokens: decoding runs out of pages,
    the newest sequences are preempted and resumed, and every request still completes exactly."""
    engine = Engine(model, config=EngineConfig(page_size=4, kv_cache_tokens=32))
    batch = prompts(4, seed=1, low=6, high=9)
    out = engine.generate(batch, GREEDY)
    assert out == [model.generate(p, 12, stop_ids=engine.stop_ids) for p in batch]
    assert engine.pages.num_used == 0


def test_prefix_cache_shares_full_pages_of_a_second_turn(model):
    engine = Engine(model, config=EngineConfig(page_size=8))
    first = prompts(1, seed=2, low=40, high=41)[0]
    reply = engine.generate([first], GREEDY)[0]
    second = first + reply + [7, 8, 9]
    rid = engine.add_request(second, GREEDY)
    seq = engine.requests[rid]
    engine.step()
    hit = (len(first) + len(reply) - 1) // 8 * 8  # the last token of the first turn is not in the cache
    assert seq.num_cached_tokens == hit > 0
    while engine:
        engine.step()
    assert seq.output_ids == model.generate(second, 12, stop_ids=engine.stop_ids)


def computed(pm: PageManager, tokens: list[int]) -> Sequence:
    """A sequence given its pages, every token computed and its full pages keyed."""
    seq = Sequence("r", tokens, GREEDY, 1)
    pm.allocate(seq)
    seq.num_computed = len(tokens)
    pm.publish(seq)
    return seq


def test_page_manager_shares_prefix_pages_and_evicts_the_deepest_first():
    pm = PageManager(num_pages=4, page_size=2)
    run = functools.partial(computed, pm)
    a = run([1, 2, 3, 4, 5])  # pages [1 2] [3 4] [5]: the two full ones are keyed
    first_pages = a.pages[:2]
    assert pm.num_used == 3 and len(pm.cached) == 2
    pm.release(a)
    assert pm.num_used == 0 and pm.num_cached == 2 and pm.num_free == 4
    b = run([1, 2, 3, 4, 9])
    assert b.pages[:2] == first_pages and pm.num_cached == 0
    pm.release(b)
    run([7, 7, 8, 8, 6])  # three pages: the two empty ones, then the cached [3 4] is evicted, not [1 2]
    assert [page for _, page in pm.prefix_hits(Sequence("q", [1, 2, 3, 4, 5], GREEDY, 1))] == first_pages[:1]


def test_a_reused_prefix_is_the_last_to_be_evicted():
    """Least recently used first: X then Y are released, X is used again, so a new page
    evicts Y's, and X's stays in the cache."""
    pm = PageManager(num_pages=3, page_size=2)

    def run(tokens):
        pm.release(computed(pm, tokens))

    x = [1, 2, 9]  # one full page each, keyed; the last token's page is freed
    y = [3, 4, 9]
    run(x)
    run(y)
    reused = Sequence("x again", x, GREEDY, 1)
    assert len(list(pm.prefix_hits(reused))) == 1
    run(x)
    assert pm.num_free == 3 and len(pm.evictable) == 2
    run([5, 6, 7])  # two pages: the free one, then one cached page must go
    assert len(list(pm.prefix_hits(Sequence("q", x, GREEDY, 1)))) == 1
    assert list(pm.prefix_hits(Sequence("q", y, GREEDY, 1))) == []


def test_stop_strings_and_tokens(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompts(1, seed=3)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    text = tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    got, reason = "", None
    while engine:
        for o in engine.step():
            got += o.text
            reason = o.finish_reason
    assert reason == "stop" and got == text[:text.index(stop)]
    by_token = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[3]]))[0]
    assert by_token == free[:free.index(free[3]) + 1]


def test_a_profile_sizes_the_cache_the_context_and_the_chunks(model, tiny_dir):
    profile = Profile.load(Path(__file__).parents[1] / "profiles/tiny_cpu_2core.yaml", model=tiny_dir)
    engine = Engine(model, config=settings(tiny_dir, profile).engine)
    kv = profile.kv_cache
    assert (engine.pages.num_pages, engine.pages.page_size) == (kv.max_pages, kv.page_size)
    assert engine.max_model_len == kv.context_length
    assert engine.scheduler.max_batch_tokens == profile.prefill.chunk_tokens


def test_prompt_too_long_is_refused_up_front(model):
    engine = Engine(model, config=EngineConfig(kv_cache_tokens=64))
    with pytest.raises(PromptTooLong, match="64 tokens"):
        engine.add_request(list(range(64)), GREEDY)
    rid = engine.add_request(list(range(40)), SamplingParams(temperature=0))  # max_tokens: what fits
    assert engine.requests[rid].max_tokens == 24


def test_abort_frees_pages_at_once(model):
    engine = Engine(model)
    rid = engine.add_request(list(range(50)), SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    assert engine.pages.num_used > 0
    assert engine.abort(rid).finish_reason == "abort"
    assert engine.pages.num_used == 0 and not engine


def run_until(engine, done, got: dict[str, list[int]]) -> None:
    """Step the engine until `done()` holds (at most 200 steps), adding its outputs to `got`."""
    for _ in range(200):
        if done():
            return
        for o in engine.step():
            got[o.request_id] += o.token_ids
    raise AssertionError("the state was never reached")


def emptied(engine) -> bool:
    return (engine.pages.num_used, len(engine.scheduler.waiting), len(engine.scheduler.running),
            len(engine.requests)) == (0, 0, 0, 0)


STATES = {
    # state: (engine config, target prompt, how to tell the target reached the state)
    "waiting": (dict(max_running=1), list(range(5, 25)), lambda seq: seq.status is Status.WAITING),
    "half_prefilled": (dict(max_batch_tokens=8), list(range(5, 45)),
                       lambda seq: seq.status is Status.RUNNING and 0 < seq.num_computed < seq.num_prompt_tokens),
    "decoding": (dict(), list(range(5, 25)), lambda seq: seq.status is Status.RUNNING and seq.num_output_tokens >= 2),
    "preempted": (dict(page_size=4, kv_cache_tokens=32), list(range(5, 12)),
                  lambda seq: seq.status is Status.WAITING and seq.num_output_tokens > 0),
}


@pytest.mark.parametrize("state", list(STATES))
def test_abort_in_every_state_frees_everything_and_leaves_the_others_exact(model, state):
    """A request aborted while waiting, half-prefilled, decoding or preempted: its pages and its
    place in the queues come back at once, and the requests around it get what they get alone."""
    config, target, reached = STATES[state]
    engine = Engine(model, config=EngineConfig(**config))
    others = prompts(3, seed=4, low=6, high=9)
    ids = [engine.add_request(p, GREEDY) for p in others[:1]]
    rid = engine.add_request(target, SamplingParams(temperature=0, max_tokens=40))
    ids += [engine.add_request(p, GREEDY) for p in others[1:]]
    seq, got = engine.requests[rid], {i: [] for i in ids + [rid]}
    run_until(engine, lambda: reached(seq), got)
    held = len(seq.pages)
    used = engine.pages.num_used
    out = engine.abort(rid)
    assert (out.finish_reason, out.finished, seq.status) == ("abort", True, Status.FINISHED)
    assert engine.pages.num_used == used - held and engine.abort(rid) is None
    assert seq not in engine.scheduler.waiting and seq not in engine.scheduler.running
    while engine:
        for o in engine.step():
            assert o.request_id != rid
            got[o.request_id] += o.token_ids
    assert [got[i] for i in ids] == [model.generate(p, 12, stop_ids=engine.stop_ids) for p in others]
    assert emptied(engine)


def test_abort_all_ends_every_request_in_any_state(model):
    engine = Engine(model, config=EngineConfig(max_batch_tokens=8, max_running=2))
    ids = [engine.add_request(p, GREEDY) for p in prompts(4, seed=6, low=4, high=30)]
    engine.step()
    engine.step()
    states = {engine.requests[i].status for i in ids}
    assert states == {Status.RUNNING, Status.WAITING}
    outs = engine.abort_all("shutdown", "the server is shutting down")
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all((o.finish_reason, o.error) == ("shutdown", "the server is shutting down") for o in outs)
    assert emptied(engine) and not engine and engine.step() == []


def test_max_running_bounds_the_batch_and_the_outputs_stay_exact(model):
    engine = Engine(model, config=EngineConfig(max_running=2))
    batch = prompts(5, seed=7)
    ids = [engine.add_request(p, GREEDY) for p in batch]
    got, most = {i: [] for i in ids}, 0
    while engine:
        for o in engine.step():
            got[o.request_id] += o.token_ids
        most = max(most, len(engine.scheduler.running))
        assert len(engine.scheduler.running) <= 2
    assert most == 2
    assert [got[i] for i in ids] == [model.generate(p, 12, stop_ids=engine.stop_ids) for p in batch]


def test_preemption_takes_the_most_recently_admitted_sequence():
    """Three decoding sequences, no free page: the last admitted goes back to the front of the
    queue, its pages freed; the first two keep theirs and decode."""
    pm = PageManager(num_pages=6, page_size=2)
    scheduler = Scheduler(pm, max_batch_tokens=64, max_running=8)
    seqs = [Sequence(f"r{i}", [1, 2, 3, 4], GREEDY, 8) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert [n for _, n in scheduler.schedule()] == [4, 4, 4] and pm.num_free == 0
    for seq in seqs:  # each prompt computed, one token sampled: each needs a third page
        seq.num_computed = 4
        seq.token_ids.append(5)
    batch = scheduler.schedule()
    assert [(s.request_id, n) for s, n in batch] == [("r0", 1), ("r1", 1)]
    assert scheduler.running == seqs[:2] and list(scheduler.waiting) == [seqs[2]]
    assert seqs[2].status is Status.WAITING and seqs[2].pages == [] and [len(s.pages) for s in seqs[:2]] == [3, 3]


def test_a_failing_step_ends_the_requests_in_flight_with_an_error_and_the_thread_serves_on(model, monkeypatch):
    engine = Engine(model)
    thread = EngineThread(lambda: engine).start()
    run = engine.runner.run
    failures = iter([RuntimeError("out of memory")])

    def fail_once(scheduled):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return run(scheduled)

    monkeypatch.setattr(engine.runner, "run", fail_once)

    async def main():
        broken = [o async for o in thread.generate(list(range(20)), GREEDY)]
        fine = [o async for o in thread.generate(list(range(20)), GREEDY)]
        return broken, fine

    broken, fine = asyncio.run(asyncio.wait_for(main(), 120))
    thread.stop()
    assert [(o.finish_reason, o.error, o.token_ids) for o in broken] == [
        ("error", "internal error: RuntimeError: out of memory", [])]
    assert sum((o.token_ids for o in fine), []) == model.generate(list(range(20)), 12, stop_ids=engine.stop_ids)
    assert emptied(engine)


def test_the_engine_thread_builds_its_engine_and_hands_a_failure_to_start(model):
    """The model's parallel ops all run on the engine thread, loading and warm-up included; what
    building raises, start() raises."""
    import threading

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return Engine(model)

    thread = EngineThread(build).start()
    assert built_on == ["engine"] and thread.engine is not None
    thread.stop()

    def broken():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        EngineThread(broken).start()


def test_engine_thread_serves_asyncio_and_aborts_a_consumer_that_leaves(model):
    thread = EngineThread(lambda: Engine(model)).start()

    async def main():
        full = [o.token_ids async for o in thread.generate(list(range(20)), GREEDY)]
        agen = thread.generate(list(range(30)), SamplingParams(temperature=0, max_tokens=1000))
        await agen.__anext__()
        await agen.aclose()  # what a client disconnect does
        return full

    full = asyncio.run(main())
    thread.stop()  # drains the abort first; the model is the engine thread's until then
    assert thread.engine.pages.num_used == 0 and not thread.engine
    assert sum(full, []) == model.generate(list(range(20)), 12, stop_ids=thread.engine.stop_ids)


# ---- sampling ---------------------------------------------------------------------------------

def test_seeded_sampling_does_not_depend_on_the_batch():
    logits = torch.randn(3, 500)
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.7, top_p=0.9, seed=6),
              SamplingParams(temperature=0)]

    def draw(rows):
        gens = [torch.Generator().manual_seed(params[i].seed) if params[i].seed else None for i in rows]
        return sample(logits[rows].clone(), [params[i] for i in rows], [[] for _ in rows], gens)

    together = draw([0, 1, 2])
    assert together == [draw([0])[0], draw([1])[0], draw([2])[0]]
    assert together[2] == int(logits[2].argmax())


def test_filters_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    draws = lambda **kw: set(sample(logits.clone(), [SamplingParams(**kw)] * 200, [[]] * 200, [None] * 200))
    assert draws(temperature=1, top_k=2) <= {0, 1}
    assert draws(temperature=1, top_p=0.5) == {0}  # token 0 alone holds 64% of the mass
    assert draws(temperature=1, min_p=0.3) <= {0, 1}  # p1/p0 = e^-1 > 0.3 > e^-2
    assert len(draws(temperature=1)) >= 4


def test_penalties_push_repeated_tokens_down():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    assert sample(logits.clone(), [SamplingParams(temperature=0, frequency_penalty=0.05)], [[0, 0, 0]], [None]) == [1]
    assert sample(logits.clone(), [SamplingParams(temperature=0, presence_penalty=0.2)], [[0]], [None]) == [1]
    assert sample(logits.clone(), [SamplingParams(temperature=0, presence_penalty=0.2)], [[1]], [None]) == [0]


def test_logits_processor_hook_constrains_the_choice():
    force = lambda ids, row: torch.full_like(row, float("-inf")).index_fill_(0, torch.tensor([2]), 0.0)
    logits = torch.randn(2, 10)
    p = [SamplingParams(temperature=1.0, logits_processors=[force]), SamplingParams(temperature=0)]
    assert sample(logits.clone(), p, [[], []], [None, None]) == [2, int(logits[1].argmax())]
