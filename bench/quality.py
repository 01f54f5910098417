"""Perplexity of each runtime path on held-out standard-library text, beside the float32 path.

    python -m bench.quality [--model DIR] [--tokens 16384]

The model is the embedded default (trained: see `python -m bench.train_default`) unless --model is
given; the text is the first --tokens tokens of the held-out files (hybrid/corpus.py: HELD_OUT),
read in windows of 256 tokens; decode paths, fed one token a step, read the first 1,024 of them
(hybrid/quality.py: DECODE_TOKENS). Each path (hybrid/quality.py: PATHS) is loaded as
`load_model` loads it, and its perplexity is compared with the float32 reference's over the same
tokens against the tolerance it documents; the kernel that actually ran its experts is named (a kernel that fails
its self-check on this CPU is replaced by the next, and the table says so). Paths this machine
cannot run (no GPU, no kt-kernel build) are listed with the reason.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hybrid  # noqa: F401  first: it sets OpenMP's spin before torch loads

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import markdown, save  # noqa: E402
from hybrid import corpus, quality  # noqa: E402
from hybrid.default_model import EMBEDDED  # noqa: E402
from hybrid.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=EMBEDDED)
    ap.add_argument("--tokens", type=int, default=16384, help="Held-out tokens to read.")
    args = ap.parse_args()
    console = Console()
    ids = quality.held_out_ids(Tokenizer.from_pretrained(args.model), args.tokens)

    table = Table(title=f"Held-out perplexity by runtime path: {args.model.name}, {len(ids):,} tokens of the "
                        f"Python {corpus.python_version()} standard library")
    numbers = ("tokens", "perplexity", "float32, same tokens", "vs float32", "tolerance")
    for col in ("path", "experts ran on", *numbers, "within", "note"):
        table.add_column(col, justify="right" if col in numbers else "left")
    figures = {}
    reference = {}  # float32 perplexity over each stretch of the text a path reads, by its length
    for path in (quality.REFERENCE, *quality.PATHS):
        text = path.text(ids)
        missing = path.missing()
        if missing:
            table.add_row(path.name, "-", f"{len(text):,}", "-", "-", "-", f"{path.tolerance:.1%}", "not run", missing)
            figures[path.name] = {"skipped": missing}
            continue
        start = time.monotonic()
        model = path.load(args.model)
        kernel = model.moe_experts()[0].cpu.kernel
        if path is quality.REFERENCE:
            lengths = sorted({len(p.text(ids)) for p in (path, *quality.PATHS)})
            reference = {n: quality.perplexity(path.logits_of(model), ids[:n]) for n in lengths}
        ppl = reference[len(text)] if path is quality.REFERENCE else quality.perplexity(path.logits_of(model), text)
        del model
        change = ppl / reference[len(text)] - 1
        ok = change <= path.tolerance
        table.add_row(path.name, kernel, f"{len(text):,}", f"{ppl:.3f}", f"{reference[len(text)]:.3f}",
                      f"{change:+.2%}", f"{path.tolerance:.1%}", "yes" if ok else "NO", path.note)
        figures[path.name] = {"tokens": len(text), "perplexity": ppl, "reference": reference[len(text)],
                              "relative": change, "tolerance": path.tolerance, "kernel": kernel,
                              "within": ok, "seconds": round(time.monotonic() - start, 1)}
        console.print(f"{path.name}: {ppl:.3f} ({change:+.2%}) on {kernel}")
    console.print(table)
    path = save("quality", {"model": args.model.name, "python": corpus.python_version(), "tokens": len(ids),
                            "decode_tokens": min(quality.DECODE_TOKENS, len(ids)),
                            "torch": torch.__version__, "paths": figures}, markdown(table))
    console.print(f"saved {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
