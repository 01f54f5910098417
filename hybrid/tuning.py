"""Measured against predicted: run a placement for a few hundred tokens and set the figures beside
what the planner's cost model expects of it, so a profile is tuned by numbers."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from hybrid.api import HybridModel, load_model
from hybrid.measure import measure


def with_proven_backend(hw):
    """`hw`, this machine's CPU, with the expert backend that proves itself here (the default
    path's choice, which `hybrid doctor` shows), so a plan for this machine runs as planned."""
    from hybrid.experts.choice import default_kernel

    hw.cpu.expert_backend = default_kernel()[0].name
    return hw


def plan_here(folder: Path):
    """A plan of the checkpoint at `folder` for this machine, at the host read bandwidth measured
    on it now (the cost model's default is a per-core figure from another machine)."""
    from hybrid.measure import host_gbps
    from placement.hardware import detect
    from placement.model_spec import ModelSpec
    from placement.planner import plan

    hw = with_proven_backend(detect())
    hw.measured.host_gbps = round(max(host_gbps() for _ in range(3)), 1)  # it can swing 1.5x within seconds
    return plan(ModelSpec.from_config(folder), hw)


def compare(model: HybridModel, profile, prompt: int, decode: int, host_now: bool = False) -> Table:
    """The model's measured speed beside the profile's predicted one. `host_now`: predict at the
    host read bandwidth measured just before and after the measurement (their mean), not at the
    profile's: on a shared machine it can move 1.5x between planning and measuring."""
    from hybrid.measure import host_gbps
    from placement import cost

    spec, hw = profile.spec(), profile.hardware
    before = host_gbps() if host_now else None
    got = measure(model, prompt, decode)
    if host_now:
        measured = hw.measured.model_copy(update={"host_gbps": round((before + host_gbps()) / 2, 1)})
        hw = hw.model_copy(update={"measured": measured})
    fig = cost.figures(hw, profile.cpu.backend, profile.cpu.method, profile.cpu.threads)
    want_decode, decode_ms = cost.decode(profile, spec, fig, context=prompt + decode // 2)  # as measured
    want_prefill, prefill_ms = cost.prefill(profile, spec, fig, prompt=prompt)
    table = Table(title=f"{model.folder.name}: measured vs predicted ({hw.summary()})")
    for col in ("phase", "measured tok/s", "predicted tok/s", "measured / predicted", "measured ms", "predicted ms"):
        table.add_column(col, justify="right")
    for phase, tok_s, want, ms, pred_ms in (
            ("prefill", got.prefill_tok_s, want_prefill, got.prefill_s * 1e3, prefill_ms["total"]),
            ("decode", got.decode_tok_s, want_decode, got.decode_s * 1e3 / got.decode_tokens, decode_ms["total"])):
        table.add_row(phase, f"{tok_s:,.1f}", f"{want:,.1f}", f"{tok_s / want:.2f}", f"{ms:,.2f}", f"{pred_ms:,.2f}")
    table.caption = (f"decode waited {got.expert_s / got.decode_tokens * 1e3:.2f} ms/token on routed experts; "
                     f"predicted decode breakdown (ms): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in decode_ms.items() if k != "total"))
    return table


def parts(model: HybridModel, prompt: int) -> list:
    """One decode step and one prefill of `prompt` tokens by part, each beside its floor measured
    now on this machine (host bandwidth for decode, the best GEMM peak for prefill)."""
    from hybrid import breakdown
    from hybrid.measure import gemm_tflops, host_gbps

    gbps, peaks = host_gbps(), gemm_tflops()
    decode = breakdown.decode_step(model)
    decode.floor = breakdown.decode_floor(model, 128, gbps)
    prefill = breakdown.prefill(model, prompt)
    prefill.floor = breakdown.prefill_floor(model, prompt, max(peaks.values()))
    best = max(peaks, key=peaks.get)
    return [breakdown.table(decode, f"one decode step at context 128 (floor: bytes / {gbps:.1f} GB/s host read; "
                                    f"dense kernel {model.dense_kernel})"),
            breakdown.table(prefill, f"prefill of {prompt} tokens (floor: FLOPs / {peaks[best]:.3f} TFLOP/s, {best})")]


def record(folder: Path, profile, prompts: list[str], out: Path, max_tokens: int = 32, progress=None) -> dict:
    """Run `prompts` (chat user turns) through the model and add their per-layer expert
    activation counts to the stats file `out` (created if missing; written atomically)."""
    from placement.model_config import ModelConfig
    from hybrid.offload.stats import ActivationStats
    from hybrid.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    stats = ActivationStats(ModelConfig.from_file(folder).n_routed_experts)
    model = load_model(folder, profile, stats=stats)
    if out.exists():
        stats.merge_file(out)
    for i, text in enumerate(prompts):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        model.generate(ids, max_tokens, stop_ids=set(tokenizer.eos_ids))
        if progress:
            progress(i + 1, len(prompts))
    stats.save(out)
    return stats.to_json()
