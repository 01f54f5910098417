"""kt-kernel's thread pools: one `CPUInfer` per set of cores, shared by every layer on them, its
threads pinned and prioritised so kt and torch never fight for a core.

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
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from pathlib import Path

import hybrid
from hybrid.experts import cpu
from hybrid.experts.kt.quiet import quiet, silence_at_exit
from placement.cpu_probe import node_of

log = logging.getLogger(__name__)


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


def thread_names() -> dict[int, str]:
    """This process's threads: id -> name (a thread that ends while being listed is left out)."""
    names = {}
    for t in Path("/proc/self/task").iterdir():
        try:
            names[int(t.name)] = (t / "comm").read_text().strip()
        except FileNotFoundError:
            pass
    return names


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
        before = thread_names()
        with quiet():
            self.cpu = kt_kernel_ext.CPUInfer(cfg)
        self.subpools, self.threads = len(nodes), sum(cfg.subpool_thread_count)
        self._clock = None
        for tid, name in thread_names().items():
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


def pool(cores: list[int]) -> Pool:
    """The pool over `cores`, made on first use."""
    key = tuple(cores)
    if not _POOLS:
        atexit.register(silence_at_exit)
    if key not in _POOLS:
        _POOLS[key] = Pool(cores)
    return _POOLS[key]
