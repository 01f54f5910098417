"""Training the default model with transformers' DeepseekV3ForCausalLM (the project's logits
reference) in float32, and writing it in Kimi's on-disk format through `synthetic.write_checkpoint`.

Routing is balanced as DeepSeek-V3 balances it, without an auxiliary loss: after each step every
router's `e_score_correction_bias` moves by `bias_rate` towards the experts that step used less
than average. A small rate leaves the skew real routing has (some experts hot, some cold) while
keeping every expert alive. Needs transformers (installed with the test extras).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid.corpus import FunctionTurn
from hybrid.model.checkpoint import tensor_shapes
from hybrid.model.synthetic import kimi_config, write_checkpoint
from hybrid.tokenizer import Tokenizer
from placement.model_config import ModelConfig


def hf_model(config: dict, seed: int = 0):
    """A freshly initialised float32 DeepseekV3ForCausalLM for a Kimi-style config dict."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = {k: v for k, v in config.items()
           if k not in ("quantization_config", "architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).float()


def checkpoint_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights by checkpoint name (transformers fuses each layer's experts into
    `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`; a checkpoint names each expert)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = ModelConfig.from_dict(_config_dict(model))
    out = {}
    for name in tensor_shapes(cfg):
        if ".mlp.experts." not in name:
            out[name] = state[name]
            continue
        layer, expert, proj = name.removesuffix(".weight").rsplit(".", 2)  # "...experts", "e", "gate_proj"
        e, fused = int(expert), layer + "."
        if proj == "down_proj":
            out[name] = state[fused + "down_proj"][e]
        else:
            gate, up = state[fused + "gate_up_proj"][e].chunk(2, dim=0)
            out[name] = gate if proj == "gate_proj" else up
    return out


def _config_dict(model) -> dict:
    cfg = model.config.to_dict()
    cfg["model_type"] = "kimi_k2"
    return cfg


def export(model, tokens: list[bytes], path: Path, overrides: dict) -> Path:
    """Write `model` as a Kimi-format checkpoint folder (routed experts INT4 group-32), atomically."""
    return write_checkpoint(path, "tiny", quant="int4", weights=checkpoint_weights(model), tokens=tokens, **overrides)


def model_config(overrides: dict) -> dict:
    return kimi_config("tiny", "int4", **overrides)


@dataclass
class Windows:
    """Training text as token streams, cut into windows of `seq + 1` tokens: source files at any
    offset, chat turns from their first token (so the model sees whole conversations)."""

    code: torch.Tensor
    chat: torch.Tensor
    chat_starts: torch.Tensor
    seq: int
    chat_share: float

    @classmethod
    def build(cls, tok: Tokenizer, texts: list[str], turns: list[FunctionTurn], seq: int,
              chat_share: float) -> "Windows":
        eos = tok.special["[EOS]"]
        code = [i for text in texts for i in tok.encode(text) + [eos]]
        chat, starts = [], []
        for t in turns:
            starts.append(len(chat))
            chat += tok.apply_chat_template([{"role": "user", "content": t.request},
                                             {"role": "assistant", "content": t.reply}], add_generation_prompt=False)
        chat_t = torch.tensor(chat)
        starts_t = torch.tensor(starts)
        return cls(torch.tensor(code), chat_t, starts_t[starts_t < len(chat) - seq - 1], seq, chat_share)

    def batch(self, size: int, gen: torch.Generator) -> torch.Tensor:
        rows = []
        for _ in range(size):
            if torch.rand((), generator=gen) < self.chat_share:
                start = int(self.chat_starts[torch.randint(len(self.chat_starts), (), generator=gen)])
                rows.append(self.chat[start:start + self.seq + 1])
            else:
                start = int(torch.randint(len(self.code) - self.seq - 1, (), generator=gen))
                rows.append(self.code[start:start + self.seq + 1])
        return torch.stack(rows)


class RouterLoads:
    """Counts of tokens routed to each expert, per MoE layer, read from the routers' outputs."""

    def __init__(self, model):
        self.routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.counts = torch.zeros(len(self.routers), self.routers[0].e_score_correction_bias.numel())
        self._hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def record(module, args, output):
            ids = output[-1]  # (logits, weights, indices)
            self.counts[i] += torch.bincount(ids.reshape(-1), minlength=self.counts.shape[1]).float()
        return record

    def balance(self, rate: float) -> None:
        """DeepSeek-V3's bias update from the counts so far, which it then clears."""
        with torch.no_grad():
            for router, load in zip(self.routers, self.counts):
                router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        self.counts.zero_()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def logits_fn(model):
    """`ids [T] -> float32 logits [T, vocab]` of a transformers model, as `quality.perplexity` takes."""
    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids[None]).logits[0].float()
    return run


def with_int4_experts(model):
    """A copy of `model` whose routed experts went through the checkpoint's INT4 group-32 format."""
    import copy

    from hybrid.quant import dequantize_int4, quantize_int4

    q = copy.deepcopy(model)
    with torch.no_grad():
        for layer in q.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            for p in (experts.gate_up_proj, experts.down_proj) if experts is not None else ():
                flat = p.reshape(-1, p.shape[-1])
                p.copy_(dequantize_int4(*quantize_int4(flat)).reshape(p.shape))
    return q
