"""The CPU path end to end: one decode step and one prefill broken into parts, each beside its
floor measured in the same run, for the runtime's default path and for the plain torch baseline;
then batched decode.

    python -m bench.cpu [--preset mini] [--context 128] [--prompt 2048] [--streams 16]

Floors: decode = bytes each part reads per token, as held, / host read bandwidth (torch sum over
1 GiB, all threads; the better of the readings just before and after the path's runs); prefill = FLOPs / the highest GEMM throughput among the dense kernels the
runtime can use here (hybrid/measure.py). The baseline is the same model on torch's own ops: its
dense projections on torch's bf16 matmul (`load_model(dense="torch")`) and its decode attention
as torch's ops rather than the native kernel (hybrid/native/mla_decode.cpp); routed experts run on
the default backend in both. Batched decode: one step of `streams` sequences at once, each at the
same context, beside the single-stream step. Where llama-cpp-python is installed (the `bench`
extra), llama.cpp runs the same weights in the same run (bench/llamacpp.py), beside the runtime;
its decode step is measured once more in turns with the runtime's, since this VM's bandwidth can
move 1.5x between two measurements a minute apart.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
from pathlib import Path

import hybrid  # first: it sets OpenMP's spin before torch loads
from hybrid import breakdown

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import llamacpp  # noqa: E402
from bench.common import markdown, save  # noqa: E402
from bench.gguf_export import cached  # noqa: E402
from hybrid.api import HybridModel, load_model  # noqa: E402
from hybrid.default_model import preset_model  # noqa: E402
from hybrid.experts import cpu  # noqa: E402
from hybrid.measure import best_seconds, gemm_tflops, host_gbps  # noqa: E402
from hybrid.model.batch import ForwardBatch  # noqa: E402
from hybrid.model.dense_kernel import fastest  # noqa: E402


def batched_step(hm: HybridModel, streams: int, context: int) -> float:
    """Seconds of one decode step of `streams` sequences, each `context` tokens in (best of a few)."""
    vocab, span = hm.config.vocab_size, context + 8
    cache = hm.new_cache(streams * span)
    ids = torch.randint(0, vocab, (streams * context,), generator=torch.Generator().manual_seed(1))
    slots = [torch.arange(s * span, s * span + context) for s in range(streams)]
    hm.decoder(ForwardBatch(ids, torch.arange(context).repeat(streams), [context] * streams, slots), cache)
    step = ForwardBatch(torch.randint(0, vocab, (streams,)), torch.full((streams,), context), [1] * streams,
                        [torch.arange(s * span, s * span + context + 1) for s in range(streams)])
    return best_seconds(lambda: hm.decoder(step, cache), 3)


def beside_bandwidth(hm: HybridModel, context: int, rounds: int = 4) -> list[dict]:
    """`rounds` times the host's read bandwidth, then at once a decode step (`breakdown.decode_step`,
    the fastest of 8): each step beside a floor read in its own minute, where this VM's bandwidth
    can move 1.5x between a run's first and last reading."""
    floor = sum(breakdown.decode_floor(hm, context, 1.0).values())  # seconds at 1 GB/s
    out = []
    for _ in range(rounds):
        gbps = host_gbps()
        step = breakdown.decode_step(hm, context).total
        out.append({"host_gbps": round(gbps, 2), "ms": round(step * 1e3, 3), "x_floor": round(step * gbps / floor, 3)})
    return out


def run(folder: Path, dense: str, args, console: Console) -> tuple[dict, breakdown.Breakdown, breakdown.Breakdown,
                                                                   breakdown.Breakdown, list[dict]]:
    """Decode step, prefill and batched decode step of the model with this dense kernel, each with
    its floor at 1 GB/s and 1 TFLOP/s (scaled by the rates measured around the runs), and decode
    steps each beside its own bandwidth reading."""
    with console.status(f"loading {folder.name} with dense kernel {dense}"):
        hm = load_model(folder, dense=dense)
        for layer in hm.decoder.model.layers:  # the baseline: torch's ops, its decode attention's too
            layer.self_attn.native_decode = dense != "torch"
    with console.status(f"{dense}: decode step at context {args.context}"):
        decode = breakdown.decode_step(hm, args.context)
    with console.status(f"{dense}: prefill of {args.prompt} tokens"):
        prefill = breakdown.prefill(hm, args.prompt)
    with console.status(f"{dense}: decode step of {args.streams} streams"):
        batched = batched_step(hm, args.streams, args.context)
    with console.status(f"{dense}: decode steps, each beside a bandwidth reading"):
        paired = beside_bandwidth(hm, args.context)
    decode.floor = breakdown.decode_floor(hm, args.context, 1.0)
    prefill.floor = breakdown.prefill_floor(hm, args.prompt, 1.0)
    many = breakdown.Breakdown("batched decode", args.streams, {"total": batched},
                               breakdown.decode_floor(hm, args.context, 1.0, args.streams))
    experts = hm.moe_experts()[0]
    kernels = {"dense": hm.dense_kernel, "experts": getattr(experts, "cpu", experts).kernel}
    del hm
    gc.collect()
    return kernels, decode, prefill, many, paired


def head_to_head(folder: Path, dense: str, gguf: Path, context: int, threads: int, rounds: int = 4) -> dict:
    """The runtime's and llama.cpp's one-stream decode step (ms) measured in turns, a block of 8
    steps each, `rounds` times, so that a swing in the host's bandwidth falls on both: the best of
    each."""
    hm = load_model(folder, dense=dense)
    hm.warm_up()
    ours = theirs = float("inf")
    with llamacpp.decode_steps(gguf, context, threads, steps=9 * rounds) as best:
        for _ in range(rounds):
            ours = min(ours, breakdown.decode_step(hm, context).total)
            theirs = min(theirs, best(8))
    return {"runtime_ms": round(ours * 1e3, 3), "llamacpp_ms": round(theirs * 1e3, 3), "rounds": rounds}


def scaled(b: breakdown.Breakdown, rate: float) -> dict:
    """The breakdown as JSON, its floors (computed at a rate of 1) at `rate`."""
    b.floor = {k: v / rate for k, v in b.floor.items()}
    return b.to_json()


def parts_table(title: str, phase: str, base: dict, fast: dict) -> Table:
    t = Table(title=title)
    for col in ("part", "baseline ms", "runtime ms", "floor ms", "runtime x floor", "baseline x floor"):
        t.add_column(col, justify="right" if col != "part" else "left")
    floor = fast[phase]["floor_ms"]
    for part in breakdown.PARTS + ("total",):
        b = base[phase]["total_ms"] if part == "total" else base[phase]["ms"][part]
        f = fast[phase]["total_ms"] if part == "total" else fast[phase]["ms"][part]
        fl = fast[phase]["floor_total_ms"] if part == "total" else floor[part]
        ratio = lambda x: f"{x / fl:.2f}" if fl > 1e-3 else ""  # noqa: E731
        t.add_row(part, f"{b:,.2f}", f"{f:,.2f}", f"{fl:,.2f}", ratio(f), ratio(b),
                  style="bold" if part == "total" else None)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=16)
    args = ap.parse_args()
    console = Console()
    folder = preset_model(args.preset, console.print)
    with console.status("measuring host bandwidth and GEMM peaks"):
        bws, gemm = [host_gbps()], gemm_tflops()
    console.print(f"{cpu.describe()}; torch threads {torch.get_num_threads()}; OpenMP yields its cores: "
                  f"{hybrid.OPENMP_YIELDS}")
    start = time.time()
    runs = {}
    for name, dense in (("baseline", "torch"), ("runtime", fastest())):
        runs[name] = run(folder, dense, args, console)
        bws.append(host_gbps())
    llama = None
    if importlib.util.find_spec("llama_cpp"):
        path = cached(folder, say=console.print)
        with console.status("llama.cpp on the same weights: decode step, prefill, batched decode step"):
            llama = llamacpp.figures(path, args.context, args.prompt, args.streams, torch.get_num_threads())
        with console.status("the runtime's and llama.cpp's decode step, in turns"):
            llama["turns"] = head_to_head(folder, runs["runtime"][0]["dense"], path, args.context,
                                          torch.get_num_threads())
    else:
        console.print("llama.cpp is not installed (pip install -e '.[bench]'): no llama.cpp figures in this run")
    # each run's decode floors take the better of the two bandwidth readings around it (this VM's
    # bandwidth moves by 1.5x from minute to minute; a reading from before the other run's minutes
    # says little of this one's), the prefill floors the best GEMM rate seen
    bw, peak = [max(bws[i], bws[i + 1]) for i in range(len(runs))], max(gemm.values())
    console.print(f"host read {', '.join(f'{b:.1f}' for b in bws)} GB/s (floors: baseline {bw[0]:.1f}, "
                  f"runtime {bw[1]:.1f}); GEMM peaks " + ", ".join(f"{k} {v:.3f}" for k, v in gemm.items()) + " TFLOP/s")
    base, fast = ({**kernels, "decode": scaled(d, b), "prefill": scaled(p, peak), "batched": scaled(m, b),
                   "beside_bandwidth": paired} for b, (kernels, d, p, m, paired) in zip(bw, runs.values()))
    tables = [parts_table(f"decode step, context {args.context} ({fast['dense']} dense, {fast['experts']})",
                          "decode", base, fast),
              parts_table(f"prefill of {args.prompt} tokens", "prefill", base, fast)]
    single = fast["decode"]["total_ms"]
    batched = Table(title=f"batched decode: one step of {args.streams} streams")
    for col in ("", "ms / step", "tok/s", "x one stream", "floor ms", "x floor"):
        batched.add_column(col, justify="right")
    for name, r in (("baseline", base), ("runtime", fast)):
        one, many = r["decode"]["total_ms"], r["batched"]["total_ms"]
        batched.add_row(f"{name}, 1 stream", f"{one:,.1f}", f"{1e3 / one:,.1f}", "1.00",
                        f"{r['decode']['floor_total_ms']:,.1f}", f"{one / r['decode']['floor_total_ms']:.2f}")
        batched.add_row(f"{name}, {args.streams} streams", f"{many:,.1f}", f"{args.streams * 1e3 / many:,.1f}",
                        f"{args.streams * one / many:.2f}", f"{r['batched']['floor_total_ms']:,.1f}",
                        f"{many / r['batched']['floor_total_ms']:.2f}")
    tables.append(batched)
    paired = Table(title="decode step beside a bandwidth reading taken just before it (each the fastest of 8 steps)")
    for col in ("", *(f"round {i + 1}" for i in range(len(fast["beside_bandwidth"]))), "median x floor"):
        paired.add_column(col, justify="right")
    for name, r in (("baseline", base), ("runtime", fast)):
        rounds = r["beside_bandwidth"]
        paired.add_row(name, *(f"{x['ms']:.1f} ms at {x['host_gbps']:.0f} GB/s: {x['x_floor']:.2f}x" for x in rounds),
                       f"{statistics.median(x['x_floor'] for x in rounds):.2f}")
    tables.append(paired)
    if llama:
        t = Table(title=f"llama.cpp on the same weights ({llama['threads']} threads, n_ubatch {llama['n_ubatch']})")
        for col in ("", "llama.cpp ms", "runtime ms", "llama.cpp / runtime"):
            t.add_column(col, justify="right")
        turns = llama["turns"]
        for name, ms, ours in (("decode step", llama["decode_ms"], fast["decode"]["total_ms"]),
                               (f"decode step, in turns ({turns['rounds']} rounds)", turns["llamacpp_ms"],
                                turns["runtime_ms"]),
                               ("prefill", llama["prefill_ms"], fast["prefill"]["total_ms"]),
                               (f"decode step of {args.streams} streams", llama["batched_ms"],
                                fast["batched"]["total_ms"])):
            t.add_row(name, f"{ms:,.1f}", f"{ours:,.1f}", f"{ms / ours:.2f}")
        tables.append(t)
    for t in tables:
        console.print(t)
    figures = {"preset": args.preset, "context": args.context, "prompt": args.prompt, "streams": args.streams,
               "host_gbps": [round(b, 2) for b in bws],
               "gemm_tflops": {k: round(v, 4) for k, v in gemm.items()}, "cpu": cpu.describe(),
               "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - start, 1),
               "baseline": base, "runtime": fast, "decode_tok_s": round(1e3 / single, 2),
               "prefill_tok_s": round(args.prompt * 1e3 / fast["prefill"]["total_ms"], 2), "llamacpp": llama}
    md = (f"{cpu.describe()}; torch threads {torch.get_num_threads()}; host read "
          f"{', '.join(f'{b:.1f}' for b in bws)} GB/s (decode floors at {bw[0]:.1f} for the baseline, "
          f"{bw[1]:.1f} for the runtime: the better reading around each); GEMM peaks "
          + ", ".join(f"{k} {v:.3f}" for k, v in gemm.items()) + " TFLOP/s\n\n")
    for t in tables:
        md += markdown(t) + "\n"
    console.print(f"saved {save(f'cpu_{args.preset}', figures, md)}")


if __name__ == "__main__":
    main()
