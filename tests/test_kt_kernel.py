"""kt-kernel's routed experts (hybrid/experts/kt/): its float methods and their load-time
quantization against references computed here, its on-disk cache, the split of a layer between
its pool and the caller's core and where its threads run, and each of its builds (AMX, AVX2) on
the CPUs that load them. The shared weights, routes and fp32 reference are test_experts'."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hybrid.experts import cpu
from hybrid.experts.torch_backend import TorchExperts
from placement.cpu_probe import has
from test_experts import (CHUNK, I, KT, _in_subprocess, float16, float_weights, int4, int4_weights,  # noqa: F401
                          kt, only_kernel, reference, rel_err, routes)

@KT
@pytest.mark.parametrize("method, kernel, tol", [("amx_int8", "AMXInt8_MOE", 5e-2), ("bf16", "AMXBF16_MOE", 1e-2),
                                                 ("bf16", "AVX2BF16_MOE", 1e-2)])
@pytest.mark.parametrize("threads", [1, None])
def test_float_parity(method, kernel, tol, threads, float16, tmp_path, monkeypatch):
    """BF16 experts quantized at load (INT8 within the bound the runtime promises) or run as they
    are."""
    only_kernel(monkeypatch, method, kernel)
    weights, dense = float16
    backend = kt(weights, method=method, threads=threads, cache_dir=tmp_path)
    assert backend.method == method
    for tokens in (1, 7, CHUNK + 36):
        x, ids, w = routes("positions", tokens)
        backend.submit(x, ids, w)
        assert rel_err(backend.wait(), reference(dense, x, ids, w)) <= tol


def int4_rows(w: torch.Tensor) -> torch.Tensor:
    """kt-kernel's INT4 quantization of float rows, as its AMX buffers do it: a scale of
    max|row| / 112, each value rounded to int8 and then to a multiple of 16 (so 15 levels, -7..7
    of max|row| / 7), halves away from zero."""
    d = w.abs().amax(-1, keepdim=True) / 112
    q = torch.round(w / torch.where(d > 0, d, 1)).clamp(-128, 127)
    return torch.sign(q) * torch.floor((q.abs() + 8) / 16) * 16 * d


def int8_tokens(x: torch.Tensor) -> torch.Tensor:
    """kt-kernel's INT8 activations: one scale of max|row| / 127 per token."""
    d = x.abs().amax(-1, keepdim=True) / 127
    return torch.round(x / torch.where(d > 0, d, 1)).clamp(-128, 127) * d


def int4_reference(dense, x, ids, w, rows: int) -> torch.Tensor:
    """What INT4 per-row experts compute: kt's rows [0, rows) of each expert's intermediate
    dimension quantized as `int4_rows` (down per row over those columns) on INT8 activations, the
    caller's rows [rows, I) in bf16 as they are."""
    gate, up, down = dense
    gq, uq, dq = int4_rows(gate[:, :rows]), int4_rows(up[:, :rows]), int4_rows(down[:, :, :rows])
    out = torch.zeros(x.shape[0], down.shape[1])
    for t in range(x.shape[0]):
        xb = x[t].to(torch.bfloat16).float()
        xq = int8_tokens(xb)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                h = int8_tokens((F.silu(gq[e] @ xq) * (uq[e] @ xq)).to(torch.bfloat16).float())
                caller = F.silu(gate[e, rows:] @ xb) * (up[e, rows:] @ xb)
                out[t] += w[t, k] * (dq[e] @ h + down[e, :, rows:] @ caller)
    return out


@KT
@pytest.mark.parametrize("threads", [1, None])
def test_amx_int4_computes_int4_rows_as_kt_kernel_quantizes_them(threads, float16, tmp_path, monkeypatch):
    """BF16 experts quantized at load to INT4 with one scale per row: 0.15-0.23 from the float
    experts (coarse by construction), and within 1% of those same rows quantized here, so an error
    of a tenth in what the runtime does with them cannot hide in the quantization's."""
    only_kernel(monkeypatch, "amx_int4", "AMXInt4_MOE")
    weights, dense = float16
    backend = kt(weights, method="amx_int4", threads=threads, cache_dir=tmp_path)
    assert backend.method == "amx_int4"
    for tokens in (7, CHUNK + 36):
        x, ids, w = routes("positions", tokens)
        backend.submit(x, ids, w)
        out = backend.wait()
        assert rel_err(out, int4_reference(dense, x, ids, w, backend.rows)) <= 3e-2
        assert 0.1 <= rel_err(out, reference(dense, x, ids, w)) <= 0.3  # the quantization is there


@KT
def test_quantized_cache_is_written_reused_and_rebuilt(float16, tmp_path, monkeypatch):
    only_kernel(monkeypatch, "amx_int8", "AMXInt8_MOE")
    weights, _ = float16
    x, ids, w = routes("positions", 9)
    first = kt(weights, method="amx_int8", threads=1, cache_dir=tmp_path)
    first.submit(x, ids, w)
    expected = first.wait()
    [manifest] = list(tmp_path.glob("*/layer_1/manifest.json"))
    folder = manifest.parent
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"
    stamp = manifest.stat().st_mtime_ns
    again = kt(weights, method="amx_int8", threads=1, cache_dir=tmp_path)  # loads the files
    again.submit(x, ids, w)
    assert torch.equal(again.wait(), expected) and manifest.stat().st_mtime_ns == stamp
    victim = next(p for p in folder.rglob("*.kt"))
    victim.write_bytes(victim.read_bytes()[:10])  # truncated: the entry no longer matches its manifest
    rebuilt = kt(weights, method="amx_int8", threads=1, cache_dir=tmp_path)
    rebuilt.submit(x, ids, w)
    assert torch.equal(rebuilt.wait(), expected) and manifest.stat().st_mtime_ns != stamp


def test_cache_entries_are_whole_or_absent_on_every_cpu(tmp_path):
    """The on-disk cache's own logic, without a kernel: an entry is valid only with its manifest's
    key and every file at its size; a failed write leaves nothing; a stale entry and a dead run's
    leftovers are cleared before the next write."""
    import time

    from hybrid.experts.kt.cache import CacheEntry

    key = {"kernel": "K", "weights": "abc"}
    entry = CacheEntry(tmp_path / "k" / "layer_1", key)
    with pytest.raises(RuntimeError), entry.writing() as folder:
        (folder / "part.kt").write_bytes(b"x" * 100)
        raise RuntimeError("kt failed midway")
    assert not entry.valid() and list((tmp_path / "k").iterdir()) == []
    with entry.writing() as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "part.kt").write_bytes(b"x" * 100)
    assert entry.valid() and not CacheEntry(entry.folder, {**key, "weights": "abd"}).valid()
    (entry.folder / "sub" / "part.kt").write_bytes(b"x" * 99)
    assert not entry.valid()
    dead = tmp_path / "k" / ".layer_1.dead"
    dead.mkdir()
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    with entry.writing() as folder:
        (folder / "part.kt").write_bytes(b"y")
    assert entry.valid() and not dead.exists() and not (entry.folder / "sub").exists()


@pytest.mark.skipif(not (os.uname().machine == "x86_64" and cpu.has("avx2")),
                    reason="kt-kernel needs an x86-64 CPU with AVX2")
def test_kt_kernel_loads_where_it_should():
    """On an x86-64 CPU with AVX2, `make install` gives a kt-kernel that must load: if it does not,
    every kt test would skip and the suite would stay green, so this fails instead."""
    assert cpu.kt().usable, cpu.kt().reason


@pytest.mark.parametrize("make", [int4_weights, float_weights])
def test_row_slices_add_up_to_the_layer(make):
    """The split kt-kernel and the caller's core share: rows [0, r) plus rows [r, I) is the layer."""
    from hybrid.experts.kt.row_split import slice_rows

    weights, _ = make()
    x, ids, w = routes("positions", 7)
    whole = TorchExperts(weights).forward(x, ids, w)
    parts = sum(TorchExperts(slice_rows(weights, a, b)).forward(x, ids, w) for a, b in ((0, 192), (192, I)))
    assert torch.allclose(parts, whole, rtol=1e-4, atol=1e-6)


@KT
def test_one_core_is_not_shared(int4):
    from hybrid.experts.kt.row_split import share_rows

    share = share_rows(2048, 64, "AMXInt4_KGroup_MOE", 1)
    assert share % 64 == 0 and 0 < share < 2048
    assert share_rows(128, 128, "AMXInt4_MOE", 3) == 0  # one tile of rows: nothing to share
    backend = kt(int4[0], threads=1)
    assert backend.share is None and backend.pool.caller_core is None


@KT
@pytest.mark.skipif(len(cpu.expert_cores()) < 2, reason="needs 2 physical cores to share a layer between")
def test_split_and_thread_placement(int4):
    """On two cores (on many, the caller's share of these small experts rounds to no rows)."""
    cores = cpu.expert_cores(2)
    backend = kt(int4[0], threads=2)
    assert 0 < backend.rows < I and backend.share is not None and backend.pool.caller_core == cores[-1]
    placed = {}
    for task in os.listdir("/proc/self/task"):
        name = open(f"/proc/self/task/{task}/comm").read().strip()
        placed.setdefault(name, []).append((os.sched_getaffinity(int(task)), os.sched_getscheduler(int(task))))
    assert ({cores[0]}, os.SCHED_OTHER) in placed["numa_0_m_0"]
    assert any(aff == {cores[-1]} and pol == os.SCHED_IDLE for aff, pol in sum(placed.values(), []))


@pytest.mark.skipif(not has("amx_tile", "amx_int8", "amx_bf16"), reason="this CPU lacks AMX")
def test_amx_build_runs_amx_kernels():
    """kt-kernel's `amx` build (AMX tiles) on an AMX CPU: INT8 from BF16 weights within bound."""
    run = _in_subprocess("""
        import sys; sys.path.insert(0, "tests")
        from test_experts import float_weights, reference, routes, rel_err, kt
        weights, dense = float_weights()
        backend = kt(weights, method="amx_int8", threads=1)
        x, ids, w = routes("positions", 9)
        backend.submit(x, ids, w)
        print("ERR", rel_err(backend.wait(), reference(dense, x, ids, w)))
    """, KT_KERNEL_CPU_VARIANT="amx")
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split("ERR")[1]) <= 5e-2


@pytest.mark.skipif(has("amx_tile") or cpu.kt().version is None, reason="this CPU has AMX (or no kt-kernel)")
def test_amx_build_is_refused_without_amx():
    """Forcing the `amx` build on a CPU without AMX would die with SIGILL in its tile kernels."""
    run = _in_subprocess("from hybrid.experts import cpu; print(cpu.kt().reason)", KT_KERNEL_CPU_VARIANT="amx")
    assert run.returncode == 0 and "cannot execute" in run.stdout


@pytest.mark.skipif(cpu.kt().version is None or not has("avx2"), reason="needs kt-kernel and an AVX2 CPU")
@pytest.mark.parametrize("threads", [1, None])
def test_kt_avx2_build_is_right(threads):
    """kt-kernel's `avx2` build, which AVX2-only CPUs load (any x86-64 CPU with AVX2 can run it):
    its INT4 kernel alone (one thread) and beside the caller's torch share (all cores)."""
    run = _in_subprocess(f"""
        import sys; sys.path.insert(0, "tests")
        from test_experts import int4_weights, reference, routes, rel_err, kt
        from hybrid.experts import cpu
        weights, dense = int4_weights()
        backend = kt(weights, threads={threads})
        print("KERNEL", cpu.kt().variant, backend.kt_class)
        for tokens in (1, 7, 300):
            x, ids, w = routes("distinct", tokens)
            backend.submit(x, ids, w)
            print("ERR", rel_err(backend.wait(), reference(dense, x.bfloat16(), ids, w)))
    """, KT_KERNEL_CPU_VARIANT="avx2", ATEN_CPU_CAPABILITY="avx2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "KERNEL avx2 AVX2RawInt4_MOE" in run.stdout
    errors = [float(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("ERR")]
    assert len(errors) == 3 and max(errors) <= 2e-2, errors


@pytest.mark.skipif(cpu.kt().reason is not None or len(cpu.expert_cores()) < 2,
                    reason="kt-kernel cannot run here, or one core leaves nothing to share")
@pytest.mark.parametrize("torch_first", [False, True])
def test_kt_threads_yield_to_torch_only_when_openmp_gives_the_cores_back(torch_first):
    """Imported first, hybrid shortens OpenMP's spin, and kt's compute threads run at nice 19 below
    torch's; imported after torch, it cannot, and they keep normal priority (else torch's spinning
    threads would starve them)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = textwrap.dedent(f"""
        {'import torch' if torch_first else ''}
        import os, hybrid, torch, sys
        sys.path.insert(0, "tests")
        from test_experts import int4_weights
        from hybrid.experts.kt.backend import KTExperts
        from hybrid.experts.kt.pool import thread_names
        KTExperts(int4_weights()[0], 0)
        nice = [int(open(f"/proc/self/task/{{t}}/stat").read().rsplit(")", 1)[1].split()[16])
                for t, name in thread_names().items() if name.startswith("numa_")]
        print("RESULT", hybrid.OPENMP_YIELDS, os.environ.get("GOMP_SPINCOUNT"), os.nice(0), nice)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    yields, spin, own, nice = run.stdout.split("RESULT")[1].split(maxsplit=3)
    if torch_first:  # the process's own priority, whatever it was started with
        assert (yields, spin) == ("False", "None") and set(eval(nice)) == {int(own)}
    else:
        assert (yields, spin) == ("True", "5000") and set(eval(nice)) == {19}
