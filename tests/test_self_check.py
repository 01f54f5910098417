"""The self-check at load: every expert kernel is proven on this CPU against the float32
reference before it serves, and one that disagrees is refused for the next backend."""

import logging

import pytest
import torch

from hybrid.api import load_model
from hybrid.experts import choice, cpu, self_check
from hybrid.experts.choice import default_kernel, make_backend
from hybrid.experts import dot_backend
from hybrid.experts.options import ExpertOptions
from hybrid.experts.torch_backend import TorchExperts
from hybrid.offload.layout import Layout
from test_experts import int4_weights, reference, rel_err, routes
from test_model import prompt, rel


class Scrambled:
    """A planted wrong kernel: the real first candidate's output, rows shuffled and scaled, as a
    kernel reading the wrong layout would give."""

    name, method, kernel = "planted", "int4_kgroup", "planted wrong kernel"

    def __init__(self, inner):
        self.inner = inner

    def submit(self, hidden, topk_ids, topk_weights):
        self.inner.submit(hidden, topk_ids, topk_weights)

    def wait(self):
        out = self.inner.wait()
        return 1.5 * out.roll(1, dims=-1)


@pytest.fixture
def planted(monkeypatch):
    """The first candidate of every layer is wrong; verdicts and warnings start afresh."""
    real = choice._candidates

    def candidates(weights, *args):
        yield Scrambled(next(real(weights, *args)))
        yield from real(weights, *args)

    monkeypatch.setattr(choice, "_candidates", candidates)
    monkeypatch.setattr(self_check, "VERDICTS", {})
    monkeypatch.setattr(choice, "_warned", set())


def test_a_wrong_kernel_is_refused_once_with_its_name_cpu_and_error(planted, caplog):
    weights, dense = int4_weights()
    with caplog.at_level(logging.WARNING):
        layers = [make_backend(weights, layer) for layer in range(3)]
    assert all(not isinstance(b, Scrambled) for b in layers)
    refusals = [r.message for r in caplog.records if "refusing" in r.message]
    assert len(refusals) == 1, refusals
    assert "planted wrong kernel" in refusals[0] and cpu.describe() in refusals[0]
    [verdict] = [v for v in self_check.VERDICTS.values() if v.kernel == "planted wrong kernel"]
    assert not verdict.ok and verdict.error > 0.5 and f"{verdict.error:.2g}" in refusals[0]
    x, ids, w = routes("distinct", 7)
    layers[0].submit(x, ids, w)
    assert rel_err(layers[0].wait(), reference(dense, x, ids, w)) <= 2e-2


def test_the_model_answers_correctly_through_the_next_backend(planted, tiny_dir):
    ids = prompt(1280, 64)
    exact = load_model(tiny_dir, Layout.on("cpu", experts=ExpertOptions(backend="torch")),
                       dtype=torch.float32).logits(ids)
    model = load_model(tiny_dir)  # default path: bf16, auto backend
    assert all(not isinstance(experts.cpu, Scrambled) for experts in model.moe_experts())
    fast = model.logits(ids)
    assert rel(fast, exact) <= 0.3 and (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


def test_without_the_check_the_planted_kernel_would_serve(planted):
    """The check is what stops it: switched off, the wrong kernel is taken."""
    weights, _ = int4_weights()
    assert isinstance(make_backend(weights, 1, ExpertOptions(self_check=False)), Scrambled)


def test_the_reference_is_not_checked_against_itself(monkeypatch):
    monkeypatch.setattr(self_check, "VERDICTS", {})
    weights, _ = int4_weights()
    assert type(make_backend(weights, 1, dtype=torch.float32)) is TorchExperts
    assert self_check.VERDICTS == {}


def test_the_default_kernel_passes_here_and_is_quick():
    backend, verdicts = default_kernel()
    assert verdicts and verdicts[-1].kernel == backend.kernel and verdicts[-1].ok
    assert all(v.seconds < 1.0 for v in verdicts)
    if dot_backend.why_not() is None:
        assert backend.name == "dot"
    elif cpu.kt().usable:
        assert backend.name == "kt"
