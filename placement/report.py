"""A plan as a person reads it: rich tables for `hybrid plan`, comment lines for profile files."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from placement.cost import tiers
from placement.memory import GIB, usage
from placement.model_spec import ModelSpec
from placement.profile import LAYER_GROUPS, Profile


def holdings(p: Profile) -> dict[str, list[str]]:
    """What sits on each device, in words: layer ranges per module group, head, routed experts."""
    a = p.model
    out: dict[str, list[str]] = {}
    for r in p.devices.layers:
        groups: dict[str, list[str]] = {}
        for g in LAYER_GROUPS:
            if (g == "dense" and r.first >= a.first_k_dense_replace) or \
                    (g in ("router", "shared") and r.last < a.first_k_dense_replace):
                continue
            groups.setdefault(getattr(r, g), []).append("attn" if g == "attention" else g)
        for device, names in groups.items():
            out.setdefault(device, []).append(f"layers {r.first}-{r.last}: {', '.join(names)}")
    out.setdefault(p.devices.embed, []).append("embed")
    out.setdefault(p.devices.lm_head, []).append("lm_head")
    experts: dict[str, int] = {}
    for layer in a.moe_layers:
        n = len(p.gpu_experts_of(layer))
        if n:
            experts[p.device_of("router", layer)] = experts.get(p.device_of("router", layer), 0) + n
    for device, n in experts.items():
        out.setdefault(device, []).append(f"{n:,} routed experts")
    if p.kv_cache.host_tokens:
        out.setdefault("cpu", []).append(f"KV host tier: {p.kv_cache.host_tokens:,} tokens")
    cpu_n = len(a.moe_layers) * a.n_routed_experts - sum(experts.values())
    out.setdefault("cpu", []).append(f"{cpu_n:,} routed experts ({p.cpu.method} on {p.cpu.backend}, "
                                     f"{_threads(p.cpu.threads)})")
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "cpu", kv[0])))


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}" if n else "-"


def device_table(p: Profile, spec: ModelSpec) -> Table:
    t = Table(title="Placement (GiB)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    t.add_column("device", no_wrap=True)
    t.add_column("what runs there", min_width=22)
    for col in ("weights", "experts", "KV", "work", "used / of"):
        t.add_column(col, justify="right", no_wrap=True)
    use = usage(p, spec)
    for device, items in holdings(p).items():
        u = use[device]
        t.add_row(device, "\n".join(items), _gib(u.weights), _gib(u.experts), _gib(u.kv),
                  _gib(u.workspace + u.stream), f"{u.total / GIB:.1f} / {u.budget / GIB:.0f}")
    return t


def speed_line(p: Profile) -> str:
    pr = p.prediction
    return (f"Predicted speed: decode {pr.decode_tok_s:g} tok/s ({pr.concurrency} sequence(s) at "
            f"{pr.decode_context:,} tokens of context), prefill {pr.prefill_tok_s:g} tok/s "
            f"({pr.prompt_tokens:,}-token prompt)")


def speed_table(p: Profile) -> Table:
    pr = p.prediction
    t = Table(box=box.SIMPLE_HEAD, show_edge=False)
    t.add_column("term")
    t.add_column("decode ms / step", justify="right")
    t.add_column("prefill ms / prompt", justify="right")
    keys = [k for k in pr.decode_ms if k not in ("overlapped", "total")]
    keys += [k for k in pr.prefill_ms if k not in keys and k not in ("overlapped", "total")]
    for k in keys + ["overlapped", "total"]:
        t.add_row(k, _ms(pr.decode_ms.get(k)), _ms(pr.prefill_ms.get(k)), style="bold" if k == "total" else None)
    return t


def curve_table(p: Profile) -> Table:
    """Predicted decode speed against context length, with where each sequence's KV lives."""
    t = Table(title="Predicted decode by context", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("context", "KV on GPU", "KV in host RAM", "decode tok/s"):
        t.add_column(col, justify="right")
    gpu = bool(p.hardware.gpus)
    for context, tok_s in p.prediction.decode_curve.items():
        near, far = tiers(p, context) if gpu else (0, context)
        t.add_row(f"{context:,}", f"{near:,}", f"{far:,}", f"{tok_s:g}")
    return t


def _curve_line(p: Profile) -> str:
    return ", ".join(f"{c // 1024}K {v:g}" for c, v in p.prediction.decode_curve.items())


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _count(n: int) -> str:
    return f"{n / 1e9:,.1f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def _size(n: int) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB else f"{n / (1 << 20):,.1f} MiB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def notes(p: Profile, spec: ModelSpec) -> list[str]:
    kv, pre = p.kv_cache, p.prefill
    kv_bytes = kv.slots * spec.kv_bytes_per_token(kv.dtype)
    rounded = ", each sequence's in whole pages" if kv.slots != kv.context_length * kv.concurrency else ""
    tiers_note = f"; {kv.host_tokens:,} in host RAM" if kv.host_tokens else ""
    stream = (f"prompts of {pre.stream_threshold_tokens:,}+ tokens stream CPU experts to the GPU layer by layer"
              if pre.stream_threshold_tokens else "prefill keeps routed experts on the CPU (no streaming)")
    return [
        f"model {p.model.name}: {_count(spec.total_params)} parameters, {_size(spec.total_bytes)} to load "
        f"({p.model.quant}; the download is {spec.checkpoint_bytes / 1e9:,.1f} GB)",
        f"machine: {p.hardware.summary()}",
        f"KV cache: {kv.context_length:,} tokens x {kv.concurrency} sequence(s) = {kv.slots:,} tokens "
        f"({kv.max_pages:,} pages of {kv.page_size}{rounded}), {_size(kv_bytes)} {kv.dtype}{tiers_note}",
        f"CPU experts: {p.cpu.backend} / {p.cpu.method}, {_threads(p.cpu.threads)} in {p.cpu.threadpools} pool(s); "
        f"{stream}",
    ]


def render(p: Profile, spec: ModelSpec, console: Console) -> None:
    for line in notes(p, spec):
        console.print(line, highlight=False)
    console.print(device_table(p, spec))
    if p.prediction:
        console.print(speed_line(p), highlight=False)
        console.print(speed_table(p))
        if p.prediction.decode_curve:
            console.print(curve_table(p))


def header(p: Profile, spec: ModelSpec, title: str = "") -> str:
    """The comment block a saved profile starts with: the same facts as the tables, as plain text."""
    lines = [title, ""] if title else []
    lines += notes(p, spec)
    use = usage(p, spec)
    for device, items in holdings(p).items():
        u = use[device]
        lines.append(f"{device}: {u.total / GIB:.1f} of {u.budget / GIB:.1f} GiB -- {'; '.join(items)}")
    if p.prediction:
        pr = p.prediction
        lines.append(f"predicted: decode {pr.decode_tok_s:g} tok/s, prefill {pr.prefill_tok_s:g} tok/s")
        if pr.decode_curve:
            lines.append(f"predicted decode tok/s by context: {_curve_line(p)}")
    lines.append("Written by `hybrid plan`; check edits with `hybrid profile validate FILE [--model DIR]`.")
    return "\n".join(lines)
