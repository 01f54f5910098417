"""CPU expert backends against an fp32 reference computed here from the same weights.

INT4 weights are made from known integer values and scales (packed with the project's packer),
so the reference multiplies those values directly and shares no unpacking code with the
backends. kt-kernel cases skip where kt-kernel cannot run; what only kt-kernel has (its float
methods, cache, threads and builds) is in test_kt_kernel.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hybrid.experts import cpu
from hybrid.experts.choice import make_backend
from hybrid.experts import dot_backend
from hybrid.experts.dot_backend import DotExperts
from hybrid.experts.options import ExpertOptions
from hybrid.experts.torch_backend import PackedInt4Experts, TorchExperts
from hybrid.experts.weights import ExpertWeights
from hybrid.quant import pack_int4

E, H, I, K = 16, 256, 256, 4
CHUNK = 64  # kt's max_len in these tests: 100 tokens need two tasks
KT = pytest.mark.skipif(not cpu.kt().usable, reason=f"kt-kernel cannot run here: {cpu.kt().reason}")


def int4_weights(seed: int = 0) -> tuple[ExpertWeights, tuple[torch.Tensor, ...]]:
    """(weights, dense fp32 gate/up/down) from random 4-bit values and bf16 group scales."""
    g = torch.Generator().manual_seed(seed)
    packed, dense = [], []
    for out, inp in ((I, H), (I, H), (H, I)):
        values = torch.randint(-8, 8, (E, out, inp), generator=g)
        scale = (torch.rand(E, out, inp // 32, generator=g) * 0.02 / inp**0.5 + 0.01 / inp**0.5).to(torch.bfloat16)
        packed += [pack_int4(values), scale]
        dense.append(values.float() * scale.float().repeat_interleave(32, -1))
    gate, gs, up, us, down, ds = packed
    return ExpertWeights("int4", gate, up, down, gs, us, ds), tuple(dense)


def first_96_rows(w: ExpertWeights) -> ExpertWeights:
    """The first 96 intermediate rows of INT4 experts: a size kt-kernel cannot run (it needs
    multiples of 64)."""
    return ExpertWeights("int4", w.gate[:, :96], w.up[:, :96], w.down[:, :, :12],
                         w.gate_scale[:, :96], w.up_scale[:, :96], w.down_scale[:, :, :3])


def float_weights(seed: int = 0) -> tuple[ExpertWeights, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(E, out, inp, generator=g) / inp**0.5).to(torch.bfloat16)
          for out, inp in ((I, H), (I, H), (H, I))]
    return ExpertWeights("float", *ws), tuple(w.float() for w in ws)


def reference(dense, x, ids, w) -> torch.Tensor:
    """sum over slots k of w[t, k] * down(silu(gate x) * up x) of expert ids[t, k]; -1 slots skipped."""
    gate, up, down = dense
    out = torch.zeros(x.shape[0], down.shape[1])
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                out[t] += w[t, k] * (down[e] @ (F.silu(gate[e] @ x[t].float()) * (up[e] @ x[t].float())))
    return out


def routes(kind: str, tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden, ids, weights. `positions`: every expert in every top-k slot, a few slots -1 (another
    backend's) and one token with none; `same`: every token the same experts; `distinct`: no
    expert chosen twice in the batch (as far as the experts go)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    if kind == "positions":
        ids = (torch.arange(tokens)[:, None] + torch.arange(K)[None] * (E // K + 1)) % E
        ids[1::5, 2] = -1
        ids[3 % tokens] = -1
    elif kind == "same":
        ids = torch.randperm(E, generator=g)[:K].repeat(tokens, 1)
    else:
        ids = torch.stack([(torch.arange(K) + t * K) % E for t in range(tokens)])[:, torch.randperm(K, generator=g)]
    return x, ids.long(), torch.rand(tokens, K, generator=g)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp(min=1e-12))


def kt(weights: ExpertWeights, **kw):
    from hybrid.experts.kt.backend import KTExperts

    return KTExperts(weights, 1, max_len=CHUNK, **kw)


INT4_BACKENDS = {
    "torch": (lambda w: TorchExperts(w), 1e-5),
    "dot-avx512_vnni": (lambda w: DotExperts(w, "avx512_vnni"), 2e-2),  # int8 activations in blocks of 32
    "dot-avx2": (lambda w: DotExperts(w, "avx2"), 2e-2),
    "torch-packed": (PackedInt4Experts, 1e-2),
    "kt-one-core": (lambda w: kt(w, threads=1), 2e-2),
    "kt-all-cores": (lambda w: kt(w), 2e-2),
    "kt-avx2-kernel": (lambda w: kt(w), 2e-2),  # the AVX2 build's kernel, which reads the weights in place
}


def only_kernel(monkeypatch, method: str, name: str) -> None:
    """Make kt-kernel's `name` the one kernel for `method` (skip where this build lacks it)."""
    from kt_kernel import kt_kernel_ext

    from hybrid.experts.kt import kernels

    if not hasattr(kt_kernel_ext.moe, name):
        pytest.skip(f"kt-kernel's {cpu.kt().variant} build has no {name}")
    monkeypatch.setitem(kernels.CLASSES, method, (name,))


@pytest.fixture(scope="module")
def int4():
    return int4_weights()


@pytest.fixture(scope="module")
def float16():
    return float_weights()


@pytest.mark.parametrize("name", list(INT4_BACKENDS))
def test_int4_parity(name, int4, monkeypatch):
    if name.startswith("kt") and not cpu.kt().usable:
        pytest.skip(f"kt-kernel cannot run here: {cpu.kt().reason}")
    if name.startswith("dot-") and (dot_backend.why_not() or name[4:] not in dot_backend.runnable()):
        pytest.skip(f"the INT4 dot kernel's {name[4:]} code cannot run here: {dot_backend.why_not() or 'not this CPU'}")
    if name == "kt-avx2-kernel":
        only_kernel(monkeypatch, "int4_kgroup", "AVX2RawInt4_MOE")
    make, tol = INT4_BACKENDS[name]
    weights, dense = int4
    backend = make(weights)
    for tokens in (1, 7, 64, CHUNK + 36):
        for kind in ("positions", "same", "distinct"):
            x, ids, w = routes(kind, tokens)
            backend.submit(x, ids, w)
            out = backend.wait()
            assert out.shape == x.shape and out.dtype == x.dtype
            assert rel_err(out, reference(dense, x, ids, w)) <= tol, (name, tokens, kind)


@KT
@pytest.mark.skipif(dot_backend.why_not() is not None, reason=f"the INT4 dot kernel cannot run here: {dot_backend.why_not()}")
def test_make_backend_picks_the_dot_kernel_or_kt_and_refuses_what_they_cannot_run(int4, caplog, monkeypatch):
    from hybrid.experts import choice
    from hybrid.experts.kt.backend import KTExperts

    monkeypatch.setattr(choice, "_warned", set())  # the fallback's warning, even where another test gave it

    assert isinstance(make_backend(int4[0], 1), DotExperts)
    assert isinstance(make_backend(int4[0], 1, ExpertOptions(backend="kt")), KTExperts)
    with pytest.raises(ValueError, match="int4_kgroup"):
        make_backend(int4[0], 1, ExpertOptions(backend="kt", method="amx_int8"))
    odd = first_96_rows(int4_weights()[0])
    with caplog.at_level(logging.WARNING):
        assert isinstance(make_backend(odd, 1), PackedInt4Experts)  # neither takes 96 rows (kt-kernel crashes)
    assert "divisible by 64" in caplog.text
    with pytest.raises(RuntimeError, match="divisible by 64"):
        make_backend(odd, 1, ExpertOptions(backend="kt"))
    with pytest.raises(RuntimeError, match="divisible by 128"):
        make_backend(odd, 1, ExpertOptions(backend="dot"))


def test_a_shape_kt_refuses_still_gets_the_reference_result(int4):
    """96 intermediate rows (kt-kernel needs multiples of 64): whichever kernel the default path
    falls back to gives the layer's result, checked against the dense reference."""
    weights, (gate, up, down) = int4
    backend = make_backend(first_96_rows(weights), 1)
    assert backend.name == "torch"
    for tokens in (2, 7):
        x, ids, w = routes("positions", tokens)
        want = reference((gate[:, :96], up[:, :96], down[:, :, :96]), x.bfloat16(), ids, w)
        backend.submit(x.bfloat16(), ids, w)
        assert rel_err(backend.wait(), want) <= 2e-2, backend.kernel


def test_fallback_says_so_once(int4, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "kt", lambda: cpu.KtStatus(None, None, "kt-kernel is not importable (test)"))
    monkeypatch.setattr(dot_backend, "why_not", lambda: "no C++ compiler (test)")
    with caplog.at_level(logging.WARNING):
        backends = [make_backend(int4[0], layer) for layer in range(3)]
    assert all(b.name == "torch" for b in backends)
    assert caplog.text.count("kt-kernel is not importable (test)") == 1
    assert caplog.text.count("no C++ compiler (test)") == 1
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        make_backend(int4[0], 0, ExpertOptions(backend="dot"))
    with pytest.raises(RuntimeError, match="not importable"):
        make_backend(int4[0], 0, ExpertOptions(backend="kt"))
    assert type(make_backend(int4[0], 0, dtype=torch.float32)) is TorchExperts  # exact where asked


def test_options_and_cpu_facts():
    with pytest.raises(ValueError):
        ExpertOptions(method="int8")
    with pytest.raises(ValueError):
        ExpertOptions(threads=0)
    assert set(cpu.isa()) == {"AMX", "AVX-512 BF16", "AVX-512 VNNI", "AVX-512", "AVX2"}
    assert cpu.expert_cores(1) == cpu.expert_cores()[:1]
    flags = open("/proc/cpuinfo").read().split()
    assert dict(cpu.report())["AMX"] == ("yes" if {"amx_tile", "amx_int8", "amx_bf16"} <= set(flags) else "no")
    assert dict(cpu.report())["AVX2"] == ("yes" if "avx2" in flags else "no")


def _in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_default_backend_int4_layer_matches_the_dequantized_reference(tokens, int4):
    """What the runtime uses by default on this CPU (bf16, auto backend), past kt's task size."""
    weights, dense = int4
    backend = make_backend(weights, 1)
    for kind in ("distinct", "same", "positions"):
        x, ids, w = routes(kind, tokens)
        x = x.to(torch.bfloat16)
        backend.submit(x, ids, w)
        assert rel_err(backend.wait(), reference(dense, x, ids, w)) <= 2e-2, (backend.kernel, kind)


CHECK_PACKED = """
    import sys; sys.path.insert(0, "tests")
    import torch
    from test_experts import int4_weights, reference, routes, rel_err
    from hybrid.experts.torch_backend import PackedInt4Experts
    weights, dense = int4_weights()
    backend = PackedInt4Experts(weights)
    print("CAPABILITY", torch.backends.cpu.get_cpu_capability())
    for tokens in (1, 7, 300):
        x, ids, w = routes("distinct", tokens)
        print("ERR", rel_err(backend.forward(x.bfloat16(), ids, w), reference(dense, x.bfloat16(), ids, w)))
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_packed_int4_is_right_at_every_torch_cpu_capability(capability):
    """torch lays its int4 operand out per CPU capability: forcing the weaker ones checks, on a
    stronger CPU, the paths an AVX2-only or older CPU takes."""
    run = _in_subprocess(CHECK_PACKED, ATEN_CPU_CAPABILITY=capability)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"CAPABILITY {capability.upper()}" in run.stdout
    errors = [float(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("ERR")]
    assert len(errors) == 3 and max(errors) <= 2e-2, errors
