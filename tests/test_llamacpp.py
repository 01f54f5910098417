"""llama.cpp computes the model the GGUF export writes as the runtime computes the checkpoint, and
its figures come out (the `bench` extra; skipped where llama-cpp-python is not installed)."""

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[bench]')")

from bench.gguf_export import export  # noqa: E402
from bench.llamacpp import agreement, figures  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    return export(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_llamacpp_logits_are_the_runtime_float32_logits(tiny_gguf, tiny_dir):
    # 0.015 here; a wrong transform (RoPE's pairs taken as halves, YaRN's attention scale left out)
    # is off by 0.5 and more. Rounding flips a near-tied expert at a few positions: the median.
    r = agreement(tiny_gguf, tiny_dir)["pairs"]["llama.cpp / runtime float32"]
    assert r["rel_l2_median"] < 0.03
    assert r["top1_agree"] >= 0.8


def test_figures_time_each_phase(tiny_gguf):
    f = figures(tiny_gguf, context=16, prompt=64, streams=4, steps=2)
    assert all(f[k] > 0 for k in ("decode_ms", "prefill_ms", "batched_ms"))
    assert f["prefill_tok_s"] == pytest.approx(64e3 / f["prefill_ms"], rel=1e-3)
