"""Everything that would stop a Profile from running as written, each with the field's path and a fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from placement.errors import PlacementError
from placement.memory import GIB, LAYER_GROUPS, host_reserve, usage
from placement.model_spec import INT4_DOT_TAKES, Arch, int4_dot_fits

if TYPE_CHECKING:
    from placement.profile import Profile

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} (fix: {self.fix})"


class ProfileError(PlacementError):
    """A profile that cannot be run; the message lists every problem."""

    def __init__(self, problems: list[Problem], source: str = "profile"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def check(p: Profile, checkpoint: Arch | None = None, broken: set[str] = frozenset()) -> list[Problem]:
    """Every problem, in one pass. `broken`: dotted paths of the fields that failed the schema
    (reported already); the checks that read them are left out, every other one runs."""
    def have(*parts: str) -> bool:
        return not any(b == p or b.startswith(p + ".") or p.startswith(b + ".") for b in broken for p in parts)

    out: list[Problem] = []
    if have("version") and p.version != PROFILE_VERSION:
        out.append(Problem("version", f"{p.version} is not supported (this build reads version {PROFILE_VERSION})",
                           f"re-plan with this build, or set version: {PROFILE_VERSION} if the file follows it"))
    if have("model"):
        _model(p, checkpoint, out)
    layout_ok = have("model", "hardware.gpus", "devices") and _devices(p, out)
    experts_ok = have("model", "gpu_experts") and _experts(p, out, layout_ok)
    if have("model", "hardware.cpu", "cpu"):
        _cpu(p, out)
    if have("model", "kv_cache"):
        _kv(p, out)
    if have("model", "hardware.gpus", "prefill", "decode"):
        _prefill_decode(p, out, layout_ok)
    if layout_ok and experts_ok and not broken:
        _memory(p, out)
    return out


def _model(p: Profile, checkpoint: Arch | None, out: list) -> None:
    dims = p.model.model_dump(exclude={"config_hash"})
    if Arch(**dims).digest() != p.model.config_hash:
        out.append(Problem("model.config_hash", "does not match the model dimensions in this file (edited?)",
                           "re-plan for the checkpoint: hybrid plan --model DIR --out FILE"))
    if checkpoint is None:
        return
    theirs = checkpoint.model_dump()
    for key, mine in dims.items():
        if key != "name" and theirs[key] != mine:
            out.append(Problem(f"model.{key}", f"profile says {mine!r}, the checkpoint's config.json says "
                               f"{theirs[key]!r}", "re-plan for this checkpoint: hybrid plan --model DIR"))


def _device(p: Profile, path: str, value: str, out: list) -> bool:
    try:
        p.gpu_index(value)
        return True
    except ValueError:
        n = len(p.hardware.gpus)
        gpus = "'cuda:0'" if n == 1 else f"cuda:0..cuda:{n - 1}"
        have = f"'cpu' or {gpus} (hardware lists {n} GPU(s))" if n else "'cpu' (hardware lists no GPU)"
        out.append(Problem(path, f"unknown device {value!r}", f"use {have}"))
        return False


def _devices(p: Profile, out: list) -> bool:
    fields = [("devices.embed", p.devices.embed), ("devices.lm_head", p.devices.lm_head)]
    fields += [(f"devices.layers.{i}.{g}", getattr(r, g)) for i, r in enumerate(p.devices.layers) for g in LAYER_GROUPS]
    ok = all([_device(p, path, value, out) for path, value in fields])  # a list: report every one
    n = p.model.num_hidden_layers
    cover, ranges_ok = [0] * n, True
    for i, r in enumerate(p.devices.layers):
        groups = {getattr(r, g) for g in LAYER_GROUPS}
        if ok and len(groups) > 1:
            out.append(Problem(f"devices.layers.{i}", f"splits a layer's attention, router, shared and dense over "
                               f"{' and '.join(sorted(groups))}; the runtime runs a layer's modules on one device",
                               "give all four the same device"))
        if r.first > r.last or r.last >= n:
            out.append(Problem(f"devices.layers.{i}", f"range {r.first}-{r.last} is not within layers 0-{n - 1}",
                               f"use first <= last <= {n - 1}"))
            ranges_ok = False
            continue
        for layer in range(r.first, r.last + 1):
            cover[layer] += 1
    if not ranges_ok:  # coverage means nothing until every range is within the model
        return False
    for what, bad in (("are in no range", [i for i, c in enumerate(cover) if c == 0]),
                      ("are in more than one range", [i for i, c in enumerate(cover) if c > 1])):
        if bad:
            out.append(Problem("devices.layers", f"layers {_spans(bad)} {what}",
                               f"give ranges that cover each of layers 0-{n - 1} exactly once"))
    return ok and all(c == 1 for c in cover)


def _experts(p: Profile, out: list, layout_ok: bool) -> bool:
    a, before = p.model, len(out)
    e = a.n_routed_experts
    for layer, ids in p.gpu_experts.items():
        path = f"gpu_experts.{layer}"
        if not 0 <= layer < a.num_hidden_layers:
            out.append(Problem(path, f"there is no layer {layer} (the model has layers 0-{a.num_hidden_layers - 1})",
                               "remove this entry"))
            continue
        if not a.first_k_dense_replace <= layer:
            out.append(Problem(path, f"layer {layer} is a dense layer: it has no routed experts", "remove this entry"))
            continue
        if len(ids) > e:
            out.append(Problem(path, f"lists {len(ids)} experts; the layer has {e}", f"list at most {e} ids"))
            continue
        bad = sorted({i for i in ids if not 0 <= i < e})
        if bad:
            out.append(Problem(path, f"expert ids {bad[:8]} are out of range", f"use ids 0-{e - 1}"))
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            out.append(Problem(path, f"expert ids {dups[:8]} are listed more than once", "list each id once"))
        if ids and layout_ok and p.device_of("router", layer) == "cpu":
            out.append(Problem(path, f"layer {layer}'s router runs on cpu, so these experts have no GPU to live on",
                               f"put layer {layer}'s router on a cuda device, or empty this list"))
    return len(out) == before


def _cpu(p: Profile, out: list) -> None:
    c, cpu, quant = p.cpu, p.hardware.cpu, p.model.quant
    if c.threads > cpu.cores:
        out.append(Problem("cpu.threads", f"{c.threads} threads but the machine has {cpu.cores} physical cores",
                           f"use at most {cpu.cores} (all of them: the runtime leaves the last to the driving thread)"))
    pools = cpu.pools(min(c.threads, cpu.cores))
    if c.threadpools != pools:
        out.append(Problem("cpu.threadpools", f"{c.threadpools} pool(s), but the runtime makes one kt-kernel pool per "
                           f"NUMA node its {c.threads} threads run on ({cpu.numa_nodes} node(s) of "
                           f"{-(-cpu.cores // cpu.numa_nodes)} cores): {pools}", f"set it to {pools}"))
    if c.method == "int4_kgroup" and quant != "int4":
        out.append(Problem("cpu.method", f"int4_kgroup reads INT4 checkpoints in place; this one stores {quant}",
                           "use amx_int8 or amx_int4 (AMX CPUs) or bf16"))
    if c.method.startswith("amx") and not cpu.has("amx"):
        out.append(Problem("cpu.method", f"{c.method} needs AMX, which the profile's CPU lacks",
                           "use int4_kgroup (INT4 checkpoints) or bf16"))
    if c.backend == "torch" and c.method.startswith("amx"):
        out.append(Problem("cpu.backend", f"the torch backend runs experts as stored (int4_kgroup) or as bf16, "
                           f"not {c.method}", "use backend kt, or method bf16"))
    if c.backend == "kt" and not cpu.has("avx2"):
        out.append(Problem("cpu.backend", "kt-kernel's MoE kernels need AVX2 at least, which the profile's CPU lacks",
                           f"use backend torch with method {'int4_kgroup' if quant == 'int4' else 'bf16'}"))
    if c.backend == "dot":
        a = p.model
        if not cpu.has("avx2"):
            out.append(Problem("cpu.backend", "the INT4 dot kernel needs AVX2 at least, which the profile's CPU lacks",
                               "use backend torch"))
        if quant != "int4":
            out.append(Problem("cpu.backend", f"the INT4 dot kernel runs INT4 checkpoints as stored; this one stores "
                               f"{quant}", "use backend kt"))
        elif c.method != "int4_kgroup":
            out.append(Problem("cpu.backend", f"the INT4 dot kernel runs INT4 experts as stored (int4_kgroup), not "
                               f"{c.method}", "use method int4_kgroup, or backend kt"))
        elif not int4_dot_fits(a.hidden_size, a.moe_intermediate_size, a.group_size):
            out.append(Problem("cpu.backend", f"the INT4 dot kernel takes {INT4_DOT_TAKES}; this model has "
                               f"{a.hidden_size}, {a.moe_intermediate_size} and {a.group_size}", "use backend kt"))


def _kv(p: Profile, out: list) -> None:
    """The runtime gives each sequence whole pages, so the cache is counted in them: max_tokens a
    whole number of pages, enough for every sequence's context rounded up to pages."""
    kv = p.kv_cache
    if kv.page_size & (kv.page_size - 1):
        out.append(Problem("kv_cache.page_size", f"{kv.page_size} is not a power of two", "use 16, 32, 64 or 128"))
    else:
        pages = -(-kv.max_tokens // kv.page_size)
        need = kv.concurrency * -(-kv.context_length // kv.page_size) * kv.page_size
        if kv.max_tokens % kv.page_size:
            out.append(Problem("kv_cache.max_tokens", f"{kv.max_tokens} is not a whole number of pages of "
                               f"{kv.page_size} (the runtime allocates whole pages)",
                               f"set it to {pages * kv.page_size} and max_pages to {pages}"))
        elif kv.max_pages != pages:
            out.append(Problem("kv_cache.max_pages", f"{kv.max_pages} pages do not hold max_tokens {kv.max_tokens}",
                               f"set it to max_tokens / page_size = {pages}"))
        if kv.max_tokens < need:
            out.append(Problem("kv_cache.max_tokens", f"{kv.max_tokens} is less than concurrency x context_length "
                               f"in whole pages of {kv.page_size} = {need}",
                               f"raise it to {need} or lower context_length or concurrency"))
    if kv.host_tokens > kv.max_tokens or kv.host_tokens % kv.page_size:
        out.append(Problem("kv_cache.host_tokens", f"{kv.host_tokens} is not a whole number of pages of "
                           f"{kv.page_size} within max_tokens {kv.max_tokens}",
                           f"use a multiple of {kv.page_size} up to {kv.max_tokens // kv.page_size * kv.page_size}"))
    if kv.context_length > p.model.max_position_embeddings:
        out.append(Problem("kv_cache.context_length", f"{kv.context_length} exceeds the model's "
                           f"max_position_embeddings ({p.model.max_position_embeddings})",
                           f"use at most {p.model.max_position_embeddings}"))


def _prefill_decode(p: Profile, out: list, layout_ok: bool) -> None:
    k = p.model.num_experts_per_tok
    if p.decode.defer_experts >= k:
        out.append(Problem("decode.defer_experts", f"{p.decode.defer_experts} defers every routed expert "
                           f"(the model picks {k} per token)", f"use 0-{k - 1}; 0 is exact"))
    pre = p.prefill
    for device in pre.stream_buffer_mib:
        if _device(p, f"prefill.stream_buffer_mib.{device}", device, out) and device == "cpu":
            out.append(Problem(f"prefill.stream_buffer_mib.{device}", "experts stream to GPUs, not to the CPU",
                               "remove this entry"))
    if pre.stream_threshold_tokens is None:
        return
    if not p.hardware.gpus:
        out.append(Problem("prefill.stream_threshold_tokens", "is set but the machine has no GPU to stream to",
                           "set it to null"))
        return
    if not layout_ok:
        return
    spec = p.spec()
    need = -(-2 * spec.bytes["expert"] // (1 << 20))
    gpus = {p.device_of("router", layer) for layer in p.model.moe_layers} - {"cpu"}
    for device in sorted(gpus):
        have = pre.stream_buffer_mib.get(device, 0)
        if have < need:
            out.append(Problem(f"prefill.stream_buffer_mib.{device}", f"{have} MiB cannot stage two experts "
                               f"({need} MiB)", f"give it at least {need} MiB, or set stream_threshold_tokens: null"))


def _memory(p: Profile, out: list) -> None:
    spec = p.spec()
    for device, u in usage(p, spec).items():
        over = u.total - u.budget
        if over <= 0:
            continue
        parts = (f"weights {u.weights / GIB:.1f}, experts {u.experts / GIB:.1f}, KV {u.kv / GIB:.1f}, "
                 f"workspace {u.workspace / GIB:.1f}, stream {u.stream / GIB:.1f} GiB")
        if device == "cpu":
            reserve = host_reserve(u.budget) / GIB
            fix = (f"keep about {-(-over // spec.expert_host_bytes(p.cpu.method))} more experts on GPUs, "
                   "use a smaller CPU method (amx_int4), or add RAM")
            out.append(Problem("hardware.ram_gib", f"the CPU side needs {u.total / GIB:.1f} GiB ({parts}; "
                               f"{reserve:.1f} GiB of it kept for the system) but the machine has "
                               f"{u.budget / GIB:.1f} GiB: short by {over / GIB:.1f} GiB", fix))
            continue
        if u.experts >= over:
            path = f"gpu_experts (on {device})"
            fix = f"remove at least {-(-over // spec.bytes['expert'])} experts from the lists of {device}'s layers"
        else:
            path = f"kv_cache.max_tokens (on {device})"
            page = p.kv_cache.page_size * spec.kv_bytes_per_token(p.kv_cache.dtype)
            fix = f"lower it by at least {-(-over // page) * p.kv_cache.page_size}, or move layers to another device"
        out.append(Problem(path, f"{device} would hold {u.total / GIB:.1f} GiB ({parts}): {over / GIB:.2f} GiB "
                           f"over its {u.budget / GIB:.1f} GiB budget", fix))


def _spans(layers: list[int]) -> str:
    spans, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return ", ".join(spans)
