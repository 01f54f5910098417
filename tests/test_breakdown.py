"""The bench breakdown: parts that add up to the wall time, floors computed from what is held."""

import pytest
import torch

from hybrid import breakdown
from hybrid.api import load_model


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def test_decode_parts_add_up_to_the_step(tiny):
    step = breakdown.decode_step(tiny, context=16, steps=3)
    assert set(step.seconds) == set(breakdown.PARTS)
    assert all(v >= 0 for v in step.seconds.values())
    for part in ("attention", "router", "routed experts", "lm_head", "dense MLP", "shared experts"):
        assert step.seconds[part] > 0, part
    assert step.total == pytest.approx(sum(step.seconds.values()))


def test_decode_floor_counts_the_bytes_each_part_reads(tiny):
    cfg, gbps = tiny.config, 10.0
    floor = breakdown.decode_floor(tiny, context=100, host_gbps=gbps)
    lm_head = cfg.vocab_size * cfg.hidden_size * 2  # bf16
    assert floor["lm_head"] == pytest.approx(lm_head / (gbps * 1e9))
    moe_layers = len(cfg.moe_layers)
    one_expert = sum(experts.cpu.nbytes() for experts in tiny.moe_experts()) / cfg.n_routed_experts
    assert floor["routed experts"] == pytest.approx(cfg.num_experts_per_tok * one_expert / (gbps * 1e9), rel=1e-3)
    # INT4 with bf16 group scales: 3 matrices of hidden x intermediate per expert and layer
    per_weight = one_expert / (moe_layers * 3 * cfg.hidden_size * cfg.moe_intermediate_size)
    assert 0.5 <= per_weight <= 0.75
    kv = 100 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    longer = breakdown.decode_floor(tiny, context=200, host_gbps=gbps)
    assert longer["attention"] - floor["attention"] == pytest.approx(kv / (gbps * 1e9))
    # a batch reads each touched expert once: more than one token's, less than batch x one token's
    batched = breakdown.decode_floor(tiny, context=100, host_gbps=gbps, batch=16)
    assert floor["routed experts"] < batched["routed experts"] < 16 * floor["routed experts"]
    assert batched["lm_head"] == floor["lm_head"]


def test_prefill_floor_counts_flops(tiny):
    cfg, tokens = tiny.config, 64
    floor = breakdown.prefill_floor(tiny, tokens, peak_tflops=1.0)
    routed = 2 * tokens * cfg.num_experts_per_tok * len(cfg.moe_layers) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert floor["routed experts"] == pytest.approx(routed / 1e12)
    assert floor["lm_head"] == pytest.approx(2 * cfg.vocab_size * cfg.hidden_size / 1e12)  # the last token only


def test_prefill_parts(tiny):
    p = breakdown.prefill(tiny, tokens=48)
    assert p.tokens == 48 and p.seconds["routed experts"] > 0 and p.seconds["attention"] > 0
    assert p.to_json()["total_ms"] == pytest.approx(p.total * 1e3, abs=1e-2)


def test_hooks_are_removed(tiny):
    with breakdown.timed_parts(tiny.decoder):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.decoder.modules())
    torch.testing.assert_close(tiny.logits(torch.arange(4)), tiny.logits(torch.arange(4)))
