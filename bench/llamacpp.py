"""llama.cpp on the same weights, as the baseline the CPU benchmark reports beside the runtime:
one decode step, one prefill and one batched decode step, measured as bench/cpu.py measures the
runtime's; and the check that llama.cpp computes the same model (its logits beside the runtime's).

    python -m bench.llamacpp [--preset mini] [--dtype bf16|f16] [--context 128] [--prompt 2048] [--streams 16]

llama.cpp comes from `llama-cpp-python` (the `bench` extra: `pip install -e ".[bench]"`), driven
through its low-level API with token ids; the model is `bench/gguf_export.py`'s export of the
preset, cached beside it. Prefill submits the whole prompt in one call (n_batch = the prompt)
that llama.cpp computes in micro-batches of UBATCH tokens, its default.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

import hybrid  # noqa: F401  (first: it sets OpenMP's spin before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hybrid.measure import best_seconds  # noqa: E402

UBATCH = 512  # tokens llama.cpp computes at once within a call (its default n_ubatch)


class Session:
    """One llama.cpp context on a loaded model: decode token ids, read logits."""

    def __init__(self, model, n_ctx: int, n_batch: int, n_seq: int, threads: int):
        import llama_cpp as ll

        self.ll, p = ll, ll.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, min(n_batch, UBATCH), n_seq
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = True  # the sequences share one cache of n_ctx cells, as the runtime's pages do
        self.ctx = ll.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))

    def decode(self, tokens, positions, seqs, logits: bool | list[bool] = False) -> None:
        """One llama_decode call; `logits` for every token, or per token."""
        ll, n = self.ll, len(tokens)
        batch = ll.llama_batch_init(n, 0, 1)
        try:
            for i, (t, p, s) in enumerate(zip(tokens, positions, seqs)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = int(t), int(p), 1, int(s)
                batch.logits[i] = logits[i] if isinstance(logits, list) else logits
            batch.n_tokens = n
            if ll.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {n} tokens")
            ll.llama_synchronize(self.ctx)
        finally:
            ll.llama_batch_free(batch)

    def logits(self, i: int) -> np.ndarray:
        """The logits of the i-th output of the last call (negative: from the end)."""
        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        self.ll.llama_free(self.ctx)


@contextlib.contextmanager
def loaded(gguf_path: str | Path):
    """The GGUF model loaded by llama.cpp (CPU only, memory-mapped), quiet but for errors."""
    import llama_cpp as ll

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(str(gguf_path).encode(), ll.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    try:
        yield model
    finally:
        ll.llama_model_free(model)


@contextlib.contextmanager
def session(model, n_ctx: int, n_batch: int, n_seq: int = 1, threads: int = 2):
    s = Session(model, n_ctx, n_batch, n_seq, threads)
    try:
        yield s
    finally:
        s.close()


def _ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits(gguf_path: str | Path, ids: list[int], threads: int = 2) -> torch.Tensor:
    """llama.cpp's float32 logits [T, vocab] of every position of one sequence."""
    with loaded(gguf_path) as model, session(model, len(ids), len(ids), threads=threads) as s:
        s.decode(ids, range(len(ids)), [0] * len(ids), logits=True)
        return torch.from_numpy(np.stack([s.logits(i) for i in range(len(ids))]))


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Logits `a` beside `b` [T, vocab]: relative L2 error per position (the last, the median, the
    worst) and the share of positions whose top-1 token agrees."""
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1)
    return {"rel_l2_last": round(float(rel[-1]), 5), "rel_l2_median": round(float(rel.median()), 5),
            "rel_l2_max": round(float(rel.max()), 5),
            "top1_agree": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}


def agreement(gguf_path: str | Path, folder: str | Path, tokens: int = 32, threads: int = 2) -> dict:
    """llama.cpp's logits beside the runtime's (`load_model(folder)`) on the same random token ids:
    beside the runtime in float32 (the stored weights computed exactly: the reference) and in bf16
    (its default), and, for scale, the runtime's bf16 beside its float32. A random model carries
    rounding a thousand times further at a few positions than at the rest, and there any two
    precisions part: the median says whether the transforms are right, the worst how far rounding
    is carried at those positions."""
    from hybrid.api import load_model

    hm = load_model(folder, dtype=torch.float32)
    ids = _ids(tokens, hm.config.vocab_size)
    f32 = hm.logits(ids)
    del hm
    bf16 = load_model(folder).logits(ids)
    theirs = logits(gguf_path, ids, threads)
    return {"tokens": tokens, "pairs": {"llama.cpp / runtime float32": _compare(theirs, f32),
                                        "llama.cpp / runtime bf16": _compare(theirs, bf16),
                                        "runtime bf16 / runtime float32": _compare(bf16, f32)}}


@contextlib.contextmanager
def decode_steps(gguf_path: str | Path, context: int = 128, threads: int = 2, steps: int = 64):
    """A function `best(n)`: the best of `n` more greedy decode steps (seconds) of one sequence
    that started with `context` random tokens, up to `steps` steps in all; for measuring llama.cpp
    in turns with the runtime."""
    with loaded(gguf_path) as model, session(model, context + steps + 2, context, threads=threads) as s:
        ids = _ids(context, s.n_vocab)
        s.decode(ids, range(context), [0] * context, logits=[False] * (context - 1) + [True])
        token, pos = int(s.logits(-1).argmax()), context

        def step() -> None:
            nonlocal token, pos
            s.decode([token], [pos], [0], logits=True)
            token, pos = int(s.logits(-1).argmax()), pos + 1

        yield lambda n: best_seconds(step, n)


def figures(gguf_path: str | Path, context: int = 128, prompt: int = 2048, streams: int = 16,
            threads: int = 2, steps: int = 8) -> dict:
    """llama.cpp with `threads` threads, in ms: one decode step at `context` tokens of context
    (greedy, the best of `steps`), the prefill of a `prompt`-token prompt (after a short warm-up),
    and one decode step of `streams` sequences at once, each `context` tokens in (best of 3)."""
    with decode_steps(gguf_path, context, threads, steps + 1) as best:
        decode = best(steps)
    with loaded(gguf_path) as model:
        with session(model, prompt, prompt, threads=threads) as s:
            s.decode(list(range(16)), range(16), [0] * 16)
            s.clear()
            ids = _ids(prompt, s.n_vocab)
            start = time.perf_counter()
            s.decode(ids, range(prompt), [0] * prompt, logits=[False] * (prompt - 1) + [True])
            int(s.logits(-1).argmax())
            prefill = time.perf_counter() - start
        span = context + 8
        with session(model, streams * span, streams * context, streams, threads) as s:
            ids = _ids(streams * context, s.n_vocab, seed=1)
            s.decode(ids, list(range(context)) * streams, [q for q in range(streams) for _ in range(context)])
            pos = context

            def batched() -> None:
                nonlocal pos
                s.decode(_ids(streams, s.n_vocab, seed=pos), [pos] * streams, range(streams), logits=True)
                pos += 1

            many = best_seconds(batched, 3)
    return {"threads": threads, "n_ubatch": min(prompt, UBATCH), "context": context, "prompt": prompt,
            "streams": streams, "decode_ms": round(decode * 1e3, 3), "prefill_ms": round(prefill * 1e3, 3),
            "batched_ms": round(many * 1e3, 3), "decode_tok_s": round(1 / decode, 2),
            "prefill_tok_s": round(prompt / prefill, 2), "batched_tok_s": round(streams / many, 2)}


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from bench.common import markdown, save
    from bench.gguf_export import cached
    from hybrid.default_model import preset_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--dtype", choices=("bf16", "f16"), default="bf16", help="of the weights other than experts")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp's (default: torch's)")
    args = ap.parse_args()
    console = Console()
    folder = preset_model(args.preset, console.print)
    path = cached(folder, args.dtype, console.print)
    with console.status("logits of llama.cpp beside the runtime's"):
        agree = agreement(path, folder, threads=args.threads)
    with console.status("llama.cpp: decode, prefill, batched decode"):
        f = figures(path, args.context, args.prompt, args.streams, args.threads)
    t = Table(title=f"llama.cpp, {path.name}, {args.threads} threads")
    for col in ("measure", "ms", "tok/s"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    t.add_row(f"decode step, context {args.context}", f"{f['decode_ms']:,.2f}", f"{f['decode_tok_s']:,.1f}")
    t.add_row(f"prefill of {args.prompt} tokens (n_ubatch {f['n_ubatch']})", f"{f['prefill_ms']:,.1f}",
              f"{f['prefill_tok_s']:,.1f}")
    t.add_row(f"decode step of {args.streams} streams", f"{f['batched_ms']:,.2f}", f"{f['batched_tok_s']:,.1f}")
    a = Table(title=f"logits beside logits, {agree['tokens']} positions of random token ids")
    for col in ("", "rel. L2, last", "rel. L2, median", "rel. L2, worst", "top-1 agrees"):
        a.add_column(col, justify="right" if col else "left")
    for pair, r in agree["pairs"].items():
        a.add_row(pair, *(f"{r[k]:.4f}" for k in ("rel_l2_last", "rel_l2_median", "rel_l2_max")),
                  f"{r['top1_agree']:.0%}")
    for table in (t, a):
        console.print(table)
    record = {"preset": args.preset, "gguf": path.name, **f, "agreement": agree}
    saved = save(f"llamacpp_{args.preset}_{args.dtype}", record, markdown(t) + "\n" + markdown(a))
    console.print(f"saved {saved}")


if __name__ == "__main__":
    main()
