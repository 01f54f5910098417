"""What storing the latent KV cache as FP8 costs in accuracy: greedy decoding of the same prompts
with a bf16 cache and an FP8 (e4m3, per-token scales) cache, the model itself in bf16.

    python -m bench.kv_fp8 [--preset mini] [--prompts 8] [--prompt-tokens 512] [--new 64]

Per prompt both runs decode greedily; `agree` is how many leading tokens they share. Logit error
compares the two runs' logits at every step up to and including the first that differs (their
inputs are identical there): relative L2 error ||fp8 - bf16|| / ||bf16|| and the largest absolute
difference. The bf16 cache itself rounds latents computed in bf16, so it is the reference.
"""

from __future__ import annotations

import argparse

import hybrid  # noqa: F401  (first: it sets OpenMP's spin before torch loads)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import markdown, save  # noqa: E402
from hybrid.api import load_model  # noqa: E402
from hybrid.default_model import preset_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    console = Console()
    hm = load_model(preset_model(args.preset, console.print))
    g = torch.Generator().manual_seed(0)
    table = Table(title=f"FP8 against bf16 KV cache, {args.preset}: greedy decoding of {args.new} tokens after "
                        f"{args.prompt_tokens}-token prompts")
    for col in ("prompt", "tokens agreeing", "steps compared", "rel. L2 logit error", "max |logit diff|",
                "logit std"):
        table.add_column(col, justify="right")
    rows = []
    for i in range(args.prompts):
        prompt = torch.randint(0, hm.config.vocab_size, (args.prompt_tokens,), generator=g)
        ref, ref_logits = hm.generate(prompt, args.new, return_logits=True, kv_dtype="bf16")
        out, logits = hm.generate(prompt, args.new, return_logits=True, kv_dtype="fp8")
        agree = next((k for k, (a, b) in enumerate(zip(out, ref)) if a != b), args.new)
        n = min(agree + 1, args.new)
        diff = logits[:n] - ref_logits[:n]
        rel = float(diff.norm() / ref_logits[:n].norm())
        rows.append({"agree": agree, "steps": n, "rel_l2": rel, "max_abs": float(diff.abs().max()),
                     "logit_std": float(ref_logits[:n].std())})
        table.add_row(str(i), f"{agree} / {args.new}", str(n), f"{rel:.4f}", f"{rows[-1]['max_abs']:.4f}",
                      f"{rows[-1]['logit_std']:.3f}")
    agreed = sum(r["agree"] for r in rows)
    mean_rel = sum(r["rel_l2"] for r in rows) / len(rows)
    table.add_row("all", f"{agreed} / {args.new * len(rows)}", str(sum(r["steps"] for r in rows)),
                  f"{mean_rel:.4f} (mean)", f"{max(r['max_abs'] for r in rows):.4f} (max)", "", style="bold")
    console.print(table)
    figures = {"preset": args.preset, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new, "prompts": rows,
               "tokens_agreeing": agreed, "tokens_total": args.new * len(rows), "mean_rel_l2": mean_rel}
    path = save("kv_fp8", figures, markdown(table))
    console.print(f"saved {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
