"""Train the embedded default model from the running Python's standard library, and record how.

    python -m bench.train_default [--steps 400] [--out hybrid/embedded/k2-stdlib]

A byte-pair tokenizer is learned from the training files (hybrid/tokenizer/bpe.py), then a small
Kimi K2-architecture model (hybrid/default_model.py: SHAPE) is trained with transformers'
DeepseekV3ForCausalLM in float32 (hybrid/training.py) on source files and docstring -> function
chat turns (hybrid/corpus.py), for a fixed number of steps (not of seconds: the CPU may be
shared). Held-out files (corpus.HELD_OUT) are seen by neither. It saves the loss curve
(results/train_default.csv), the held-out perplexity of the trained model beside a unigram
baseline and the untrained model, float32 and with INT4 experts, and the routed-expert load
(results/train_default.json and .md), then writes the model in Kimi's format to --out, which
must not exist.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hybrid  # noqa: F401  first: it sets OpenMP's spin before torch loads

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from bench.common import RESULTS, markdown, save  # noqa: E402
from hybrid import corpus, quality, training  # noqa: E402
from hybrid.default_model import EMBEDDED, SHAPE  # noqa: E402
from hybrid.tokenizer import Tokenizer  # noqa: E402
from hybrid.tokenizer.bpe import train_bpe  # noqa: E402
from hybrid.tokenizer.vocab import write_vocabulary  # noqa: E402
from placement.atomic import atomic_write  # noqa: E402

N_BASE_TOKENS = SHAPE["vocab_size"] - 256
EVAL_TOKENS = 4096  # the held-out slice tracked during training


def tokenizer(tokens: list[bytes], folder: Path) -> Tokenizer:
    write_vocabulary(folder, tokens)
    return Tokenizer.from_pretrained(folder)


def load_shares(counts: torch.Tensor) -> dict:
    """Per MoE layer: each expert's share of the routed slots (hottest first), and summaries."""
    layers = {}
    for i, c in enumerate(counts):
        share = (c / c.sum()).sort(descending=True).values
        n = len(share)
        layers[str(i)] = {"shares": [round(float(s), 4) for s in share],
                          "hottest_over_mean": round(float(share[0] * n), 2),
                          "coldest_over_mean": round(float(share[-1] * n), 2),
                          "top_quarter_share": round(float(share[: n // 4].sum()), 3)}
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=quality.WINDOW)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--chat-share", type=float, default=0.35, help="Share of windows that are chat turns.")
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="Router bias update per step (DeepSeek-V3's u).")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=EMBEDDED)
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists (fix: delete it, or give another --out)")
    console = Console()
    torch.set_num_threads(2)
    start = time.monotonic()

    files = corpus.training_files()
    texts = [corpus.read(p) for p in files]
    console.print(f"Python {corpus.python_version()}: {len(files)} training files ({sum(map(len, texts)) / 1e6:.1f} M "
                  f"characters), held out: {', '.join(corpus.HELD_OUT)}")
    tokens = train_bpe(texts, N_BASE_TOKENS)
    tmp = args.out.with_name(f".{args.out.name}.tokenizer")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(tokens, tmp)
    turns = corpus.function_turns(files)
    data = training.Windows.build(tok, texts, turns, args.seq, args.chat_share)
    held = quality.held_out_ids(tok)
    console.print(f"tokenizer: {len(tokens)} base tokens; training text {len(data.code):,} tokens of source and "
                  f"{len(data.chat):,} of {len(turns):,} chat turns; held out {len(held):,} tokens "
                  f"({time.monotonic() - start:.0f} s)")

    config = training.model_config(SHAPE)
    model = training.hf_model(config, args.seed)
    untrained = quality.perplexity(training.logits_fn(model.eval()), held)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"model: {params / 1e6:.2f} M parameters; untrained held-out perplexity {untrained:.1f}")

    loads = training.RouterLoads(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    curve = ["step,tokens,train_loss,held_out_loss,lr,seconds"]
    train_start = time.monotonic()
    for step in range(1, args.steps + 1):
        lr = training.lr_at(step - 1, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        batch = data.batch(args.batch, gen)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads.balance(args.bias_rate)
        held_loss = ""
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            held_loss = f"{torch.tensor(quality.perplexity(training.logits_fn(model), held[:EVAL_TOKENS])).log():.4f}"
        seconds = time.monotonic() - train_start
        curve.append(f"{step},{step * args.batch * args.seq},{loss.item():.4f},{held_loss},{lr:.2e},{seconds:.0f}")
        if held_loss or step % 10 == 0:
            console.print(f"step {step}/{args.steps}: loss {loss.item():.3f}"
                          + (f", held-out {held_loss}" if held_loss else "") + f" ({seconds:.0f} s)")
    train_s = time.monotonic() - train_start
    loads.remove()
    model.eval()

    measure = training.RouterLoads(model)
    trained = quality.perplexity(training.logits_fn(model), held)
    routing = load_shares(measure.counts)
    measure.remove()
    int4 = quality.perplexity(training.logits_fn(training.with_int4_experts(model)), held)
    unigram = quality.unigram_perplexity(torch.cat([data.code, data.chat]), held, config["vocab_size"])
    held_bytes = sum(len(corpus.read(p).encode()) for p in corpus.held_out_files())
    bits_per_byte = {name: round(len(held) * torch.tensor(ppl).log2().item() / held_bytes, 3)
                     for name, ppl in (("unigram", unigram), ("untrained", untrained), ("trained", trained),
                                       ("trained_int4", int4))}
    training.export(model, tokens, args.out, SHAPE)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    total_s = time.monotonic() - start

    from rich.table import Table

    table = Table(title=f"Held-out perplexity, Python {corpus.python_version()} standard library "
                        f"({len(held):,} tokens of {len(corpus.held_out_files())} files)")
    for col in ("model", "perplexity", "bits per byte"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, ppl, key in (("unigram (token frequencies of the training text)", unigram, "unigram"),
                           ("untrained (initial weights)", untrained, "untrained"),
                           ("trained, float32", trained, "trained"),
                           ("trained, routed experts INT4 group-32 (as shipped)", int4, "trained_int4")):
        table.add_row(name, f"{ppl:.2f}", f"{bits_per_byte[key]:.3f}")
    console.print(table)
    atomic_write(RESULTS / "train_default.csv", "\n".join(curve) + "\n")
    every = max(1, args.steps // 10)
    rows = [line.split(",") for line in curve[1:]]
    curve_md = ["| step | tokens | train loss | held-out loss |", "|---|---|---|---|"]
    curve_md += [f"| {r[0]} | {int(r[1]):,} | {r[2]} | {r[3]} |" for r in rows if int(r[0]) % every == 0 or r[0] == "1"]
    load_md = ["| MoE layer | hottest / mean | coldest / mean | share of the hottest quarter |", "|---|---|---|---|"]
    load_md += [f"| {i} | {v['hottest_over_mean']} | {v['coldest_over_mean']} | {v['top_quarter_share']} |"
                for i, v in routing.items()]
    timing = (f"{params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch} x {args.seq} tokens "
              f"({args.steps * args.batch * args.seq:,} tokens) in {train_s / 60:.1f} min, {total_s / 60:.1f} min in "
              f"all, on a CPU shared with other work (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    save("train_default", {
        "python": corpus.python_version(), "held_out": list(corpus.HELD_OUT), "held_out_tokens": len(held),
        "held_out_bytes": held_bytes, "parameters": params, "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": round(train_s), "total_seconds": round(total_s), "tokens_trained": args.steps * args.batch * args.seq,
        "perplexity": {"unigram": unigram, "untrained": untrained, "trained": trained, "trained_int4": int4},
        "bits_per_byte": bits_per_byte, "routing": routing},
        timing + "\n\n" + markdown(table) + "\n**Loss curve** (natural log; all steps in train_default.csv)\n\n"
        + "\n".join(curve_md) + "\n\n**Routed-expert load on the held-out text**\n\n" + "\n".join(load_md) + "\n")
    console.print(f"{timing}\nwrote {args.out}, {RESULTS / 'train_default.csv'} and {RESULTS / 'train_default.md'}")


if __name__ == "__main__":
    main()
