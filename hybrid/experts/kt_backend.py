"""Routed experts on kt-kernel's CPU MoE kernels (its low-level API: `CPUInfer`, `MOEConfig`,
`*_MOE`), using every core this process has without oversubscribing one.

How kt-kernel runs a task, and what follows from it:
- `CPUInfer.submit` queues a task for kt's queue thread, which starts the pool's compute threads
  and busy-waits until they finish; each compute thread then spins ~50 ms before it sleeps.
  `sync()` blocks without spinning but holds the GIL (so does `forward()`): the queue, not a
  Python thread, is what must drive the kernels.
- A thread of normal priority spinning beside a compute thread halves it, in 4 ms scheduler
  ticks. So the pool's compute threads get N-1 cores, one each, and the queue thread is pinned to
  the last core at idle priority: it spins only when nothing else wants that core.
- The compute threads spin ~50 ms after each task, longer than the dense layers between two MoE
  layers take: at nice 19 they yield their cores to torch's threads at once. That needs torch's
  OpenMP threads to give the cores back soon after each op (`hybrid.OPENMP_YIELDS`: a short spin
  set before torch loaded); with libgomp's default spin they would starve kt (4x slower experts,
  measured), so then the compute threads keep normal priority.
- That core is the caller's: in `wait()` it computes the last rows of every expert's intermediate
  dimension with torch while kt computes the others, then blocks in `sync()`, which leaves the
  core to the queue thread. The split is fixed at load, sized by the kernels' relative speed.
- A `forward_task` with more tokens than `max_len` crashes the process: batches are split here.
- kt's K-group INT4 class copies the weights into its own buffers at load (with FP32 scales), so
  the checkpoint's tensors are not needed afterwards; its AVX2 INT4 class reads them in place.
- Online quantization writes kt's files into a folder: ours, under `cache_dir/<key>/layer_N`,
  written beside and renamed into place, reused while its manifest matches.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import hybrid
from hybrid.experts import cpu
from hybrid.experts.torch_backend import PackedInt4Experts, TorchExperts
from hybrid.experts.weights import ExpertWeights
from placement.atomic import atomic_dir
from placement.cpu_probe import node_of
from placement.model_spec import expert_bytes_held

log = logging.getLogger(__name__)

# kt classes per method, best first; the AVX2 build has only the AVX2 ones
CLASSES = {
    "int4_kgroup": ("AMXInt4_KGroup_MOE", "AVX2RawInt4_MOE"),
    "amx_int8": ("AMXInt8_MOE",),
    "amx_int4": ("AMXInt4_MOE",),
    "bf16": ("AMXBF16_MOE", "AVX2BF16_MOE"),
}
QUANTIZED = ("amx_int8", "amx_int4")  # quantized from float weights at load, cached on disk
IN_PLACE = ("AVX2RawInt4_MOE",)  # reads the weight tensors at every forward
# Per-thread speed of each kt kernel over torch's on the same rows at T = 1 (torch: the int4
# kernel for INT4, bf16 matmuls for float experts), measured on an AVX-512 machine without AMX.
# It only balances the caller's share.
KT_OVER_TORCH = {"AMXInt4_KGroup_MOE": 1.4, "AVX2RawInt4_MOE": 0.45, "AMXInt8_MOE": 1.6, "AMXInt4_MOE": 2.8,
                 "AMXBF16_MOE": 0.85, "AVX2BF16_MOE": 0.85}
ALIGN = {"AMXInt4_MOE": 128}  # hidden and intermediate sizes must divide by this, else by 64 (else a crash)
MIN_EXPERTS = {"AMXInt4_KGroup_MOE": 8}  # fewer experts in a layer crash it (seen with 4 to 7)
DEFAULT_CACHE = Path("~/.cache/hybrid/kt")


class Unsupported(RuntimeError):
    """kt-kernel cannot run these experts on this machine (the torch backend can)."""


def resolve(method: str, fmt: str) -> tuple[str, str]:
    """(method, kt class) to use: the one asked for if this build has it, else the best one that
    runs. INT4 weights run as stored; float ones are quantized (or not) at load."""
    from kt_kernel import kt_kernel_ext

    if fmt == "int4":
        if method not in ("auto", "int4_kgroup"):
            raise ValueError(f"method {method!r} quantizes float weights; these experts are INT4 (use int4_kgroup)")
        order = ["int4_kgroup"]
    else:
        if method == "int4_kgroup":
            raise ValueError("method int4_kgroup runs INT4 checkpoints; these experts are float")
        order = [m for m in dict.fromkeys([method, "amx_int8", "bf16", "amx_int4"]) if m != "auto"]
    for m in order:
        for name in CLASSES[m]:
            if hasattr(kt_kernel_ext.moe, name):
                if m != method and method != "auto":
                    log.warning("kt-kernel's %s build has no kernel for %s; using %s", cpu.kt().variant, method, m)
                return m, name
    raise Unsupported(f"kt-kernel's {cpu.kt().variant} build has no kernel for {fmt} experts")


@contextlib.contextmanager
def _quiet():
    """kt-kernel prints progress to stdout from C++; keep it out of the runtime's output."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _place(tid: int, core: int, idle: bool = False, nice: int = 0) -> None:
    """Pin a thread to a core, at idle priority or the given niceness; where the system refuses,
    it runs as it was."""
    try:
        os.sched_setaffinity(tid, {core})
        if idle:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        if nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:
        log.warning("could not place kt-kernel thread %d on core %d: %s", tid, core, e)


def _threads() -> dict[int, str]:
    task = Path("/proc/self/task")
    return {int(t.name): (t / "comm").read_text().strip() for t in task.iterdir()}


class Pool:
    """One kt-kernel `CPUInfer` over a list of cores, shared by every layer that uses them: a
    subpool per NUMA node, each compute thread pinned to its core; with two cores or more, the
    last one is left to the caller and the queue thread."""

    def __init__(self, cores: list[int]):
        from kt_kernel import kt_kernel_ext

        self.caller_core = cores[-1] if len(cores) > 1 else None
        nodes: dict[int, list[int]] = {}
        for c in cores[:-1] if self.caller_core is not None else cores:
            nodes.setdefault(node_of(c), []).append(c)
        cfg = kt_kernel_ext.WorkerPoolConfig()
        cfg.subpool_count = len(nodes)
        cfg.subpool_numa_map = list(nodes)
        cfg.subpool_thread_count = [len(c) for c in nodes.values()]
        before = _threads()
        with _quiet():
            self.cpu = kt_kernel_ext.CPUInfer(cfg)
        self.subpools, self.threads = len(nodes), sum(cfg.subpool_thread_count)
        self._clock = None
        for tid, name in _threads().items():
            if tid in before:
                continue
            if name.startswith("numa_"):  # numa_<node>_m_<i> (thread 0 of a subpool) or numa_<node>_t_<i>
                node, _, i = name[5:].split("_")
                _place(tid, nodes[int(node)][int(i)], nice=19 if hybrid.OPENMP_YIELDS else 0)
            elif self.caller_core is not None:  # the queue thread
                _place(tid, self.caller_core, idle=True)
                with contextlib.suppress(OSError):
                    self._clock = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
        log.info("kt-kernel %s: %d compute threads on cores %s%s", cpu.kt().variant, self.threads,
                 [c for n in nodes.values() for c in n],
                 f", core {self.caller_core} left to the caller" if self.caller_core is not None else "")

    def hand_over(self) -> None:
        """Leave this core to the queue thread until it has started what was submitted: it runs
        at idle priority on the caller's core, so it cannot start while the caller computes. It
        needs ~50 us of CPU to get its task going (less, cut into slices, is not enough)."""
        if self.caller_core is None:
            return
        if self._clock is None:
            time.sleep(100e-6)
            return
        start, deadline = self._queue_ns(), time.perf_counter() + 2e-3
        while self._queue_ns() - start < 50_000 and time.perf_counter() < deadline:
            time.sleep(20e-6)

    def _queue_ns(self) -> int:
        return int(os.pread(self._clock, 64, 0).split()[0])


_POOLS: dict[tuple[int, ...], Pool] = {}


def _silence_at_exit() -> None:
    """kt-kernel's pools print "Goodbye" to stdout as they are destroyed at exit: keep it out of
    the output of whatever ran."""
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


def pool(cores: list[int]) -> Pool:
    key = tuple(cores)
    if not _POOLS:
        atexit.register(_silence_at_exit)
    if key not in _POOLS:
        _POOLS[key] = Pool(cores)
    return _POOLS[key]


def slice_rows(w: ExpertWeights, start: int, stop: int) -> ExpertWeights:
    """Rows [start, stop) of every expert's intermediate dimension: gate and up rows, down columns."""
    if (start, stop) == (0, w.intermediate_size):
        return w
    per_word = 8 if w.format == "int4" else 1
    cut = {"gate": (slice(start, stop), None), "up": (slice(start, stop), None),
           "down": (None, slice(start // per_word, stop // per_word)),
           "gate_scale": (slice(start, stop), None), "up_scale": (slice(start, stop), None),
           "down_scale": (None, slice(start // w.group_size, stop // w.group_size))}
    fields = {}
    for f in ExpertWeights.FIELDS:
        t = getattr(w, f)
        if t is not None:
            r, c = cut[f]
            fields[f] = (t[:, r] if r else t[:, :, c]).contiguous()
    return ExpertWeights(w.format, group_size=w.group_size, **fields)


def share_rows(size: int, unit: int, kernel: str, kt_threads: int) -> int:
    """Rows of each expert the caller's core computes so that both sides finish together; kt keeps
    a multiple of `unit`."""
    return min(round(size / (1 + KT_OVER_TORCH[kernel] * kt_threads) / unit) * unit, size - unit)


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    key: dict

    def valid(self) -> bool:
        """Complete and made from the same weights by the same kernel and kt build."""
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return False
        files = manifest.get("files") or {}
        return manifest.get("key") == self.key and bool(files) and all(
            (self.folder / f).is_file() and (self.folder / f).stat().st_size == n for f, n in files.items())

    @contextlib.contextmanager
    def writing(self):
        """A fresh folder for kt to write into; renamed into place with its manifest on success.
        A stale or mismatched entry and temporary folders left by dead runs are removed first."""
        if self.folder.exists():
            log.info("kt cache %s is stale; rebuilding it", self.folder)
            shutil.rmtree(self.folder)
        for old in self.folder.parent.glob(f".{self.folder.name}.*"):
            if time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        with atomic_dir(self.folder) as tmp:
            yield tmp
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / "manifest.json").write_text(json.dumps({"key": self.key, "files": files}, indent=1))


def cache_entry(root: Path, layer: int, kernel: str, w: ExpertWeights, rows: int, subpools: int) -> CacheEntry:
    """Where kt's quantized copy of the first `rows` rows of these weights lives: keyed by the
    kernel, the kt build and a fingerprint of the weights (a fixed sample of every expert's values)."""
    from kt_kernel import __int8_weight_layout__

    digest = hashlib.sha256()
    for t in (w.gate, w.up, w.down):
        flat = t.reshape(t.shape[0], -1)
        digest.update(flat[:, ::max(1, flat.shape[1] // 4096)].contiguous().view(torch.uint8).numpy().tobytes())
    key = {"kernel": kernel, "kt": cpu.kt().version, "build": cpu.kt().variant, "int8_layout": __int8_weight_layout__,
           "shape": [w.num_experts, w.hidden_size, w.intermediate_size], "rows": rows, "dtype": str(w.gate.dtype),
           "subpools": subpools, "weights": digest.hexdigest()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return CacheEntry(root.expanduser() / name / f"layer_{layer}", key)


class KTExperts:
    """One MoE layer's routed experts on kt-kernel, with a share computed on the caller's core."""

    name = "kt"

    def __init__(self, weights: ExpertWeights, layer: int, method: str = "auto", threads: int | None = None,
                 cache_dir: Path | None = None, top_k: int = 8, max_len: int = 512):
        from kt_kernel import kt_kernel_ext

        assert max_len % 64 == 0, "kt's tiles need max_len divisible by 64"
        self.method, self.kt_class = resolve(method, weights.format)
        cores = cpu.expert_cores(threads)
        self.threads, self.pool = len(cores), pool(cores)
        size, unit = weights.intermediate_size, ALIGN.get(self.kt_class, 64) * self.pool.subpools
        if weights.hidden_size % unit or size % unit:
            raise Unsupported(f"{self.kt_class} takes hidden and intermediate sizes divisible by {unit} (it crashes on "
                              f"others); these experts are {weights.hidden_size} x {size}")
        if weights.num_experts < MIN_EXPERTS.get(self.kt_class, 1):
            raise Unsupported(f"{self.kt_class} crashes on layers of fewer than {MIN_EXPERTS[self.kt_class]} experts; "
                              f"this one has {weights.num_experts}")
        self.hidden_size, self.top_k, self.max_len = weights.hidden_size, top_k, max_len
        share = share_rows(size, unit, self.kt_class, self.pool.threads) if self.pool.caller_core is not None else 0
        self.rows, self.share = size - share, None
        if share:
            part = slice_rows(weights, self.rows, size)
            self.share = PackedInt4Experts(part) if PackedInt4Experts.fits(part) else TorchExperts(part, torch.bfloat16)
        self.kernel = f"kt-kernel {cpu.kt().variant} {self.kt_class}" + (
            f" with {self.share.kernel} on the caller's core" if self.share is not None else "")
        self._copied = weights.num_experts * expert_bytes_held(self.method, self.hidden_size, self.rows,
                                                               weights.group_size)
        self._mask = torch.zeros(weights.num_experts, dtype=torch.bool)  # experts kt skips: none
        self._order = torch.arange(weights.num_experts, dtype=torch.int64)  # kt's expert order: ours
        cfg = kt_kernel_ext.moe.MOEConfig(weights.num_experts, top_k, self.hidden_size, self.rows,
                                          self._mask.data_ptr())
        cfg.layer_idx, cfg.pool, cfg.max_len = layer, self.pool.cpu.backend_, max_len
        with self._source(cfg, weights, layer, Path(cache_dir or DEFAULT_CACHE)), _quiet():
            self.moe = getattr(kt_kernel_ext.moe, self.kt_class)(cfg)
            self.pool.cpu.submit(self.moe.load_weights_task(self._order.data_ptr()))
            self.pool.cpu.sync()
        self._pending = None

    @contextlib.contextmanager
    def _source(self, cfg, weights: ExpertWeights, layer: int, cache_dir: Path):
        """Point kt at its rows of the weights, or at its cached quantized copy of them, for the
        load in the block; keep what kt reads after it."""
        self._keep: list[torch.Tensor] = []
        entry = None
        if self.method in QUANTIZED:
            entry = cache_entry(cache_dir, layer, self.kt_class, weights, self.rows, self.pool.subpools)
            if entry.valid():
                cfg.load, cfg.path = True, str(entry.folder)
                yield
                return
        w = slice_rows(weights, 0, self.rows)
        if w.format == "int4":
            for name, packed, scale in (("gate", w.gate, w.gate_scale), ("up", w.up, w.up_scale),
                                        ("down", w.down, w.down_scale)):
                setattr(cfg, f"{name}_proj", packed.data_ptr())
                setattr(cfg, f"{name}_scale", scale.data_ptr())
                setattr(cfg, f"{name}_projs", [[packed[e].data_ptr() for e in range(w.num_experts)]])
                setattr(cfg, f"{name}_scales", [[scale[e].data_ptr() for e in range(w.num_experts)]])
            cfg.quant_config.bits, cfg.quant_config.group_size, cfg.quant_config.zero_point = 4, w.group_size, False
            tensors = w.tensors()
        else:
            tensors = [t.to(torch.bfloat16).contiguous() for t in (w.gate, w.up, w.down)]
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (t.data_ptr() for t in tensors)
        if self.kt_class in IN_PLACE:
            self._keep = tensors
        if entry is None:
            yield
            return
        with entry.writing() as folder:
            cfg.save, cfg.path = True, str(folder)
            yield

    def nbytes(self) -> int:
        """Host memory this backend holds: kt's copy of its rows and the caller's share."""
        kt = sum(t.nbytes for t in self._keep) if self.kt_class in IN_PLACE else self._copied
        return kt + (self.share.nbytes() if self.share is not None else 0)

    def submit(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        assert self._pending is None, "wait() before the next submit()"
        tokens, k = topk_ids.shape
        if k > self.top_k:
            raise ValueError(f"{k} experts per token; this layer was built for at most {self.top_k}")
        x = hidden.to(torch.bfloat16).contiguous()
        ids = topk_ids.to(torch.int64).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        out = torch.empty(tokens, self.hidden_size, dtype=torch.bfloat16)
        counts = []
        for s in range(0, tokens, self.max_len):
            n = torch.tensor([min(self.max_len, tokens - s)], dtype=torch.int32)
            counts.append(n)
            self.pool.cpu.submit(self.moe.forward_task(n.data_ptr(), k, ids[s].data_ptr(), w[s].data_ptr(),
                                                       x[s].data_ptr(), out[s].data_ptr(), False))
        if counts:
            self.pool.hand_over()
        self._pending = (hidden.dtype, x, ids, w, out, counts)

    def wait(self) -> torch.Tensor:
        dtype, x, ids, w, out, _ = self._pending
        self._pending = None
        part = self._on_caller_core(x, ids, w) if self.share is not None and len(x) else None
        self.pool.cpu.sync()
        if part is not None:
            out += part
        return out.to(dtype)

    def _on_caller_core(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The caller's share, on one thread on the core the pool left to it."""
        mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, {self.pool.caller_core})
        torch.set_num_threads(1)
        try:
            return self.share.forward(x, ids, w)
        finally:
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, mask)
