"""`hybrid profile record` as a user runs it: activation counts of real prompts, added up over
runs, read back by `hybrid plan --stats`."""

import json

from typer.testing import CliRunner

from hybrid.cli import app
from placement.model_config import ModelConfig
from hybrid.tokenizer import Tokenizer

PROMPTS = ["What is the weather in Paris?", "Write a haiku about the sea.", "Sum 2 and 3."]


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_record_counts_every_routed_slot_of_every_prompt_and_adds_up_runs(tiny_dir, tmp_path):
    """With one generated token, each prompt passes the model once: every MoE layer counts
    (prompt tokens) x (experts per token) activations, however the router spread them."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "stats.json"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is no prompt
    cfg, tok = ModelConfig.from_file(tiny_dir), Tokenizer.from_pretrained(tiny_dir)
    tokens = sum(len(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS)
    per_layer = tokens * cfg.num_experts_per_tok
    args = ("profile", "record", str(prompts), "--out", str(out), "--model", str(tiny_dir), "--max-tokens", "1")
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert f"{per_layer * len(cfg.moe_layers):,} expert activations over {len(cfg.moe_layers)} MoE layers" in first.output
    layers = json.loads(out.read_text())["layers"]
    assert sorted(map(int, layers)) == cfg.moe_layers
    assert all(len(c) == cfg.n_routed_experts and sum(c) == per_layer for c in layers.values())
    assert run(*args).exit_code == 0
    again = json.loads(out.read_text())["layers"]
    assert again == {k: [2 * n for n in c] for k, c in layers.items()}
    planned = run("plan", "--config", str(tiny_dir / "config.json"), "--gpu", "8GB", "--ram", "16GB",
                  "--cores", "8", "--isa", "avx512", "--stats", str(out), "--out", str(tmp_path / "p.yaml"))
    assert planned.exit_code == 0, planned.output
