import base64
import json
import time

import pytest
from hypothesis import given, settings, strategies as st

from hybrid.tokenizer import Tokenizer, write_tokenizer
from hybrid.tokenizer.chat_template import ESC

KIMI_IDS = {  # FACTS §4
    "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587, "<|im_assistant|>": 163588,
    "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595, "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597, "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601, "<think>": 163606, "</think>": 163607,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, 2048, seed=1)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_pretrained(folder)


def test_full_kimi_size_is_written_fast_with_kimi_ids(tmp_path):
    t0 = time.perf_counter()
    assert write_tokenizer(tmp_path, 163_584) == 163_840
    assert time.perf_counter() - t0 < 10
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 163_840
    assert {name: tok.special[name] for name in KIMI_IDS} == KIMI_IDS
    assert tok.eos_ids == {163585, 163586}
    assert (tok.think_start_id, tok.think_end_id) == (163606, 163607)
    assert tok.tool_call_ids == set(range(163595, 163600))
    assert tok.special["<|reserved_token_163589|>"] == 163589


def test_vocabulary_is_valid_bpe_and_deterministic(folder, tmp_path):
    lines = (folder / "tiktoken.model").read_text().splitlines()
    tokens = [base64.b64decode(line.split()[0]) for line in lines]
    assert [int(line.split()[1]) for line in lines] == list(range(2048))
    assert tokens[:256] == [bytes([b]) for b in range(256)] and len(set(tokens)) == 2048
    earlier: set[bytes] = set(tokens[:256])
    for t in tokens[256:]:
        assert any(t[:k] in earlier and t[k:] in earlier for k in range(1, len(t))), t
        earlier.add(t)
    assert b" the" in earlier  # learned from the embedded text
    write_tokenizer(tmp_path, 2048, seed=1)
    assert (tmp_path / "tiktoken.model").read_bytes() == (folder / "tiktoken.model").read_bytes()


def test_config_mirrors_kimi(folder):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    names = {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()}
    assert names[2048 + 17] == "<|im_middle|>" and names[2048 + 22] == "<think>"
    assert all(t["special"] for t in cfg["added_tokens_decoder"].values())
    assert cfg["tokenizer_class"] == "TikTokenTokenizer" and "<|im_middle|>" in cfg["chat_template"]


def test_reserved_names_and_a_chat_template_file(folder, tmp_path):
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 2048 + 256
    assert tok.special["<|reserved_token_2053|>"] == 2053
    assert tok.decode(tok.apply_chat_template([{"role": "user", "content": "hi"}])) == "hi"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["中文English混合 code: x = [1, 2]\n\tdone", "a" * 30_000 + " " * 26_000 + "b",
                                  ESC + "<|im_end|>" + ESC])
def test_round_trip_of_long_and_odd_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_plain_text(tok):
    for name, token_id in tok.special.items():
        ids = tok.encode(f"say {name} now")
        assert token_id not in ids and all(i < 2048 for i in ids)
        assert tok.decode(ids) == f"say {name} now"


def test_detokenizer_drops_meaningless_specials_and_keeps_parser_markers(tok):
    from hybrid.tokenizer import Detokenizer

    d = Detokenizer(tok)
    reserved = next(i for name, i in tok.special.items() if name.startswith("<|reserved_token_"))
    assert d.feed(reserved) == ""
    assert d.feed(tok.bos_id) == ""
    assert d.feed(tok.special["<|tool_call_begin|>"]) == "<|tool_call_begin|>"
    assert d.feed(tok.think_end_id) == "</think>"
    assert "".join(d.feed(i) for i in tok.encode("héllo")) + d.flush() == "héllo"
