import pytest
import torch

from hybrid.model.synthetic import write_checkpoint
from hybrid.tokenizer import Tokenizer, write_tokenizer

torch.set_num_threads(2)

# Architecture variants the parity tests cover: name -> write_checkpoint overrides.
VARIANTS = {
    "kimi": {},
    "grouped": {"n_group": 4, "topk_group": 2},
    "no_q_lora": {"q_lora_rank": None},
    "no_dense_yarn": {"first_k_dense_replace": 0,
                      "rope_scaling": {"factor": 8.0, "beta_fast": 32.0, "mscale": 0.707}},
    "nested": {"nested": True},
    "fp8": {"quant": "fp8"},
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_dir(models_dir):
    """The default tiny preset (Kimi layout, INT4 routed experts)."""
    return write_checkpoint(models_dir / "tiny")


@pytest.fixture(scope="session")
def variant_dir(models_dir):
    def make(name: str):
        return write_checkpoint(models_dir / name, seed=1, **VARIANTS[name])
    return make


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A Kimi-format tokenizer with 2,048 base tokens."""
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, 2048)
    return Tokenizer.from_pretrained(path)


def token_ids(tok, *pieces):
    """Ids written out by hand: special tokens by name, everything else plain text."""
    return [i for p in pieces for i in ([tok.special[p]] if p in tok.special else tok.encode(p))]

