"""The same placement as launch flags for other engines: SGLang with kt-kernel, and llama.cpp.

Both take one number of GPU experts where a profile lists them per layer, and split layers across
GPUs their own way (SGLang: tensor parallel; llama.cpp: `--tensor-split` by layer), so the flags
reproduce the totals of the plan rather than its exact expert lists.
"""

from __future__ import annotations

from placement.model_spec import ModelSpec
from placement.profile import Profile

KT_METHOD = {"int4_kgroup": "RAWINT4", "amx_int4": "AMXINT4", "amx_int8": "AMXINT8", "bf16": "BF16"}


def _gpu_experts_per_layer(p: Profile) -> int:
    moe = list(p.model.moe_layers)
    return sum(len(p.gpu_experts_of(layer)) for layer in moe) // max(1, len(moe))


def _command(program: str, flags: list[tuple[str, object]], notes: list[str]) -> str:
    lines = [f"# {n}" for n in notes] + [program + " \\"]
    lines += [f"  {flag} {value}".rstrip() + " \\" for flag, value in flags]
    lines[-1] = lines[-1].removesuffix(" \\")
    return "\n".join(lines)


SGLANG_KT = "sglang-kt"  # kvcache-ai's SGLang build with kt-kernel's --kt-* options (KTransformers' install docs)


def sglang(p: Profile, model_dir: str = "MODEL_DIR") -> str:
    """`python -m sglang.launch_server` with kt-kernel's --kt-* flags, which only kvcache-ai's SGLang
    build (`pip install sglang-kt`, as KTransformers documents) has."""
    if not p.hardware.gpus:
        return "# SGLang with kt-kernel needs at least one GPU; this plan has none (use `hybrid serve`)."
    notes = [f"SGLang + kt-kernel for the placement of {p.model.name} (same totals; SGLang splits layers "
             "across GPUs by tensor parallel, not by range).",
             f"The --kt-* options exist only in kvcache-ai's SGLang build: `pip install {SGLANG_KT}` (uninstall "
             "the official `sglang` first), with kt-kernel."]
    if p.cpu.backend == "torch":
        notes.append("kt-kernel does not run on this plan's CPU (its experts run on the torch backend): this "
                     "command will not run there.")
    weights = model_dir
    if p.cpu.method != "int4_kgroup":
        weights = "CPU_WEIGHTS_DIR"
        notes.append(f"{KT_METHOD[p.cpu.method]} reads CPU weights converted by kt-kernel's convert_cpu_weights.py "
                     "into CPU_WEIGHTS_DIR.")
    flags = [("--model-path", model_dir), ("--trust-remote-code", ""), ("--kt-method", KT_METHOD[p.cpu.method]),
             ("--kt-weight-path", weights), ("--kt-cpuinfer", p.cpu.threads),
             ("--kt-threadpool-count", p.cpu.threadpools), ("--kt-num-gpu-experts", _gpu_experts_per_layer(p))]
    if p.prefill.stream_threshold_tokens is not None:
        flags.append(("--kt-gpu-prefill-token-threshold", p.prefill.stream_threshold_tokens))
    if p.decode.defer_experts:
        flags.append(("--kt-max-deferred-experts-per-token", p.decode.defer_experts))
    kv = p.kv_cache
    flags += [("--tensor-parallel-size", len(p.hardware.gpus)), ("--context-length", _gpu_context(p, notes)),
              ("--max-total-tokens", kv.device_tokens), ("--max-running-requests", kv.concurrency),
              ("--chunked-prefill-size", p.prefill.chunk_tokens)]
    return _command("python -m sglang.launch_server", flags, notes)


def _gpu_context(p: Profile, notes: list[str]) -> int:
    """Context per sequence of an engine that keeps the whole KV cache on the GPUs: the device tier's."""
    kv = p.kv_cache
    if not kv.host_tokens:
        return kv.context_length
    per_seq = kv.device_tokens // kv.concurrency
    notes.append(f"The plan keeps {kv.host_tokens:,} KV tokens in host RAM, which this engine cannot: its context "
                 f"is the GPU tier's {per_seq:,} tokens per sequence, not {kv.context_length:,}.")
    return per_seq


def llamacpp(p: Profile, spec: ModelSpec, gguf: str = "MODEL.gguf") -> str:
    """`llama-server` flags: llama.cpp keeps a layer's routed experts on the CPU or on a GPU as a
    whole, so the plan's GPU expert memory becomes a count of layers (`--n-cpu-moe`)."""
    a = spec.arch
    moe = len(a.moe_layers)
    on_gpu = sum(len(p.gpu_experts_of(layer)) for layer in a.moe_layers) // a.n_routed_experts
    notes = [f"llama.cpp for the placement of {p.model.name}: the GGUF's own quantization sets the sizes; "
             f"the plan's GPU experts fill {on_gpu} of {moe} MoE layers."]
    kv = p.kv_cache
    flags: list[tuple[str, object]] = [("-m", gguf), ("-ngl", a.num_hidden_layers + 1 if p.hardware.gpus else 0)]
    if p.hardware.gpus:
        flags.append(("--n-cpu-moe", moe - on_gpu))
    if len(p.hardware.gpus) > 1:
        counts = {f"cuda:{i}": 0 for i in range(len(p.hardware.gpus))}
        for r in p.devices.layers:
            counts[r.attention] = counts.get(r.attention, 0) + r.last - r.first + 1
        flags.append(("--tensor-split", ",".join(str(counts[d]) for d in sorted(counts) if d != "cpu")))
    batch = min(p.prefill.chunk_tokens, 4096)  # llama.cpp caps the micro-batch (-ub) at the batch (-b)
    flags += [("-c", _gpu_context(p, notes) * kv.concurrency), ("-np", kv.concurrency), ("-t", p.cpu.threads),
              ("-b", batch), ("-ub", batch), ("-fa", "on")]
    return _command("llama-server", flags, notes)
