"""Every runtime path keeps the held-out perplexity of the embedded (trained) model within the
tolerance it documents (hybrid/quality.py), against the float32 path; on a short slice of the
held-out text, so the check stays fast (`python -m bench.quality` reads more)."""

import pytest

from hybrid import quality
from hybrid.default_model import EMBEDDED
from hybrid.tokenizer import Tokenizer

SLICE = 1024


@pytest.fixture(scope="module")
def held():
    return quality.held_out_ids(Tokenizer.from_pretrained(EMBEDDED), SLICE)


@pytest.fixture(scope="module")
def reference(held):
    return quality.perplexity(quality.REFERENCE.load(EMBEDDED).logits, held)


@pytest.mark.parametrize("path", quality.PATHS, ids=lambda p: p.name)
def test_path_perplexity_within_its_tolerance(path, held, reference):
    if path.missing():
        pytest.skip(path.missing())
    ppl = quality.perplexity(path.logits_of(path.load(EMBEDDED)), held)
    assert ppl <= reference * (1 + path.tolerance), f"{path.name}: {ppl:.3f} vs float32 {reference:.3f}"


def test_the_measure_sees_a_broken_path(held, reference):
    """A path whose experts are dropped (routed weights zeroed) moves far beyond any tolerance:
    perplexity is a measure these tests can fail on."""
    model = quality.REFERENCE.load(EMBEDDED)
    for experts in model.moe_experts():
        submit = experts.cpu.submit
        experts.cpu.submit = lambda hidden, ids, weights, submit=submit: submit(hidden, ids, weights * 0)
    broken = quality.perplexity(model.logits, held)
    assert broken > reference * (1 + max(p.tolerance for p in quality.PATHS))
