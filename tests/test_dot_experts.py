"""The INT4 dot kernel (hybrid/experts/dot_backend.py, hybrid/native/int4_moe.cpp): every
instruction set this CPU runs, every scale group it takes, against the fp32 reference of test_experts (which multiplies the known integer values
and shares no unpacking code with the kernel); its build cached and never left half written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hybrid.api import load_model
from hybrid.experts import dot_backend
from hybrid.experts.dot_backend import DotExperts
from hybrid.experts import self_check
from hybrid.experts.options import ExpertOptions
from hybrid.experts.weights import ExpertWeights
from hybrid.offload.layout import Layout
from hybrid.quant import pack_int4
from placement.cpu_probe import bf16_math
from test_experts import H, reference, rel_err, routes

pytestmark = pytest.mark.skipif(dot_backend.why_not() is not None,
                                reason=f"the INT4 dot kernel cannot run here: {dot_backend.why_not()}")
E, I = 16, 384  # test_experts' routes() picks among 16 experts
ISAS = [isa for isa, _, _ in dot_backend.ISAS]


def weights(group: int, seed: int = 0) -> tuple[ExpertWeights, tuple[torch.Tensor, ...]]:
    """Random 4-bit values (all 16 of them) with bf16 scales per `group`, and the dense fp32 experts."""
    g = torch.Generator().manual_seed(seed)
    packed, dense = [], []
    for out, inp in ((I, H), (I, H), (H, I)):
        values = torch.randint(-8, 8, (E, out, inp), generator=g)
        scale = (torch.rand(E, out, inp // group, generator=g) + 0.5).div(8 * inp**0.5).to(torch.bfloat16)
        packed += [pack_int4(values), scale]
        dense.append(values.float() * scale.float().repeat_interleave(group, -1))
    gate, gs, up, us, down, ds = packed
    return ExpertWeights("int4", gate, up, down, gs, us, ds, group_size=group), tuple(dense)


def runnable(isa: str) -> None:
    if isa not in dot_backend.runnable():
        pytest.skip(f"this CPU does not execute {isa}")


def gemms_run() -> None:
    """The bf16 GEMMs exist only where the CPU has AVX512-BF16 (and the AVX-512 layout)."""
    runnable("avx512_vnni")
    if not bf16_math():
        pytest.skip("this CPU lacks AVX512-BF16: the dot backend has no bf16 GEMMs here")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_every_group_size_and_batch_matches_the_reference(isa, group):
    """Within the error of int8 activations (blocks of 32: ~1%), for one token, a few, and more
    than one pass of the kernel's token blocks, with slots of another backend (-1) skipped."""
    runnable(isa)
    w, dense = weights(group)
    backend = DotExperts(w, isa)
    for tokens in (1, 3, 9, 37, dot_backend.CHUNK + 5):
        for kind in ("positions", "same", "distinct"):
            x, ids, gate = routes(kind, tokens)
            out = backend.forward(x.bfloat16(), ids, gate)
            assert out.dtype == torch.bfloat16 and out.shape == (tokens, H)
            assert rel_err(out, reference(dense, x.bfloat16(), ids, gate)) <= 2e-2, (isa, group, tokens, kind)


@pytest.mark.parametrize("isa", ISAS)
def test_a_batch_gives_each_token_what_it_gets_alone(isa):
    """The kernel reads each chosen expert once for the whole batch; that must not mix tokens up.
    Each output row is one thread's sum in a fixed order, so the match is exact."""
    runnable(isa)
    w, _ = weights(32)
    backend = DotExperts(w, isa)
    x, ids, gate = routes("positions", 11)
    together = backend.forward(x, ids, gate)
    for t in range(11):
        assert torch.equal(together[t], backend.forward(x[t:t + 1], ids[t:t + 1], gate[t:t + 1])[0])


def test_thread_count_does_not_change_the_result():
    w, _ = weights(32)
    backend = DotExperts(w)
    x, ids, gate = routes("distinct", 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backend.forward(x, ids, gate)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, backend.forward(x, ids, gate))


def test_the_self_check_passes_and_would_catch_a_wrong_kernel(monkeypatch):
    monkeypatch.setattr(self_check, "VERDICTS", {})
    w, _ = weights(32)
    assert self_check.check(DotExperts(w), w).ok
    backend = DotExperts(w)
    backend.scales = (backend.scales[0].roll(1, 1), *backend.scales[1:])  # one row off, as a wrong stride reads them
    monkeypatch.setattr(self_check, "VERDICTS", {})
    assert not self_check.check(backend, w).ok


def test_what_it_refuses():
    w, _ = weights(32)
    assert DotExperts.fits(w)
    assert not DotExperts.fits(ExpertWeights("float", *(torch.zeros(E, 128, 128, dtype=torch.bfloat16),) * 3))
    assert not DotExperts.fits(ExpertWeights("int4", w.gate[:, :192], w.up[:, :192], w.down[:, :, :24],
                                             w.gate_scale[:, :192], w.up_scale[:, :192], w.down_scale[:, :, :6]))
    assert not DotExperts.fits(ExpertWeights("int4", w.gate, w.up, w.down, w.gate_scale, w.up_scale, w.down_scale,
                                             group_size=16))


def test_the_build_is_cached_and_written_whole(tmp_path):
    """A fresh cache builds the library once, by rename: no partial file is ever at its name, and
    a second process loads it without building."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = ("from hybrid.native import build; import os; "
            "before = set(os.listdir(build.CACHE)) if build.CACHE.exists() else set(); "
            "assert build.load() is not None, build.why_not(); "
            "print(sorted(set(os.listdir(build.CACHE)) - before))")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    built = eval(first.stdout.strip())
    assert len(built) == 1 and built[0].startswith("hybrid-") and built[0].endswith(".so")
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.strip() == "[]", second.stderr
    assert os.listdir(tmp_path / "hybrid" / "kernels") == built  # no temporary left beside it


@pytest.mark.parametrize("isa", ISAS)
def test_the_model_on_each_instruction_sets_code_tracks_float32(isa, tiny_dir, monkeypatch):
    """The whole tiny model with its routed experts on this code (as an AVX2-only CPU runs it, where
    that is the code): its logits about as near the float32 reference as the bf16 path on torch's
    backend gets (measured: 0.139 against 0.140, both codes), and as many of its next tokens."""
    runnable(isa)
    monkeypatch.setattr(dot_backend, "runnable", lambda: [isa])
    ids = torch.randint(0, 1280, (64,), generator=torch.Generator().manual_seed(0))
    exact = load_model(tiny_dir, Layout.on("cpu", experts=ExpertOptions(backend="torch")),
                       dtype=torch.float32).logits(ids)
    bf16 = load_model(tiny_dir, Layout.on("cpu", experts=ExpertOptions(backend="torch"))).logits(ids)
    model = load_model(tiny_dir)
    assert all(e.cpu.name == "dot" and e.cpu.isa == isa for e in model.moe_experts())
    fast = model.logits(ids)
    agree = lambda a: float((a.argmax(-1) == exact.argmax(-1)).float().mean())  # noqa: E731
    assert rel_err(fast, exact) <= 1.25 * rel_err(bf16, exact)
    assert agree(fast) >= agree(bf16) - 0.1


def prompt_routes(tokens: int = 400, seed: int = 0):
    """Experts 0-7 chosen ~200 times each (a prompt's), experts 8-15 three times each, one slot -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(tokens)])
    ids[:24, 3] = 8 + torch.arange(24) % 8
    ids[5, 1] = -1
    return torch.randn(tokens, H, generator=g), ids, torch.rand(tokens, 4, generator=g)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_a_prompts_experts_run_as_bf16_gemms_nearer_the_reference(group):
    """Experts with DOT_GEMM_MIN_TOKENS pairs or more in a call run as bf16 GEMMs on weights dequantized
    from the kernel's layout, the rest on the dot products, in the same call: the sum is nearer the
    fp32 reference than int8 activations get, and only the many-token experts took the GEMMs."""
    gemms_run()
    w, dense = weights(group)
    gemms, dots = DotExperts(w, "avx512_vnni", gemms=True), DotExperts(w, "avx512_vnni", gemms=False)
    ran = []
    mlp = gemms.mlp
    gemms.mlp = lambda e, x: ran.append(e) or mlp(e, x)
    x, ids, gate = prompt_routes()
    ref = reference(dense, x.bfloat16(), ids, gate)
    out = gemms.forward(x.bfloat16(), ids, gate)
    assert sorted(ran) == list(range(8))
    assert rel_err(out, ref) <= 1e-2 and rel_err(out, ref) < rel_err(dots.forward(x.bfloat16(), ids, gate), ref)


def test_the_gemms_read_each_weight_where_the_layout_put_it():
    """Each of gate, up and down dequantized from the reordered bytes, times the identity: exactly the
    stored values times their scales, rounded to bf16, columns in `layout_order`, gate's and up's rows
    in the order of down's columns."""
    gemms_run()
    w, dense = weights(64)
    backend = DotExperts(w, "avx512_vnni", gemms=True)
    hidden, inter = backend.order
    assert sorted(hidden.tolist()) == list(range(H)) and sorted(inter.tolist()) == list(range(I))
    e = E - 1
    for i, (matrix, rows, cols) in enumerate(zip(dense, (inter, inter, None), (hidden, hidden, inter))):
        got = backend._product(i, e, torch.eye(matrix.shape[-1], dtype=torch.bfloat16))
        want = matrix[e][:, cols] if rows is None else matrix[e][rows][:, cols]
        assert torch.equal(got, want.bfloat16()), i


def test_without_avx512_bf16_a_prompt_stays_on_the_dot_products(monkeypatch):
    """Where the CPU lacks AVX512-BF16 the backend has no GEMMs: by default it keeps its dot products
    for every expert (and its self-check their tokens only), and asking for the GEMMs is refused."""
    runnable("avx512_vnni")
    monkeypatch.setattr(dot_backend, "bf16_math", lambda: False)
    w, _ = weights(32)
    backend = DotExperts(w, "avx512_vnni")
    assert not backend.gemms and backend.gemm_min_tokens is None and "GEMMs" not in backend.kernel
    with pytest.raises(ValueError, match="AVX512-BF16"):
        DotExperts(w, "avx512_vnni", gemms=True)
