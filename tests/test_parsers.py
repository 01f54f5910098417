import pytest
from hypothesis import given, settings, strategies as st

from hybrid.tokenizer import (Detokenizer, ReasoningParser, TextDelta, ToolCallArgs, ToolCallEnd,
                              ToolCallParser, ToolCallStart, coalesce)

THINK, THINK_END = "<think>", "</think>"
SEC, SEC_END, CALL, ARGS, CALL_END = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
                                      "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")
MARKERS = [THINK, THINK_END, SEC, SEC_END, CALL, ARGS, CALL_END]


from conftest import token_ids as ids  # noqa: E402


def text_deltas(tok, token_ids):
    detok = Detokenizer(tok)
    return [detok.feed(i) for i in token_ids] + [detok.flush()]


def run(deltas, in_reasoning=False):
    """Reply deltas through both parsers: (reasoning, coalesced content events)."""
    reasoning, tools, events = ReasoningParser(in_reasoning), ToolCallParser(), []
    thought = ""
    for d in deltas:
        r = reasoning.feed(d)
        thought += r.reasoning
        events += tools.feed(r.content)
    r = reasoning.flush()
    thought += r.reasoning
    events += tools.feed(r.content) + tools.flush()
    return thought, coalesce(events)


def every_split(text):
    """The same reply as one delta, one character a delta, and as tokens."""
    return [[text], list(text)]


# --- detokenizer ---

@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_detokenizer_never_emits_half_characters(tok, text):
    deltas = text_deltas(tok, tok.encode(text))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_detokenizer_holds_a_split_character(tok):
    token_ids = tok.encode("😀")
    assert all(len(tok.token_bytes(i)) < 4 for i in token_ids)  # the emoji really is split over tokens
    assert text_deltas(tok, token_ids)[-2:] == ["😀", ""]
    detok = Detokenizer(tok)
    assert [detok.feed(i) for i in token_ids[:-1]] == [""] * (len(token_ids) - 1)
    assert detok.flush() == "\ufffd"  # cut short: the partial character is replaced, not lost silently


# --- reasoning ---

@pytest.mark.parametrize("reply, in_reasoning, thought, content", [
    ("<think>plan</think>answer", False, "plan", "answer"),
    ("plan</think>answer", True, "plan", "answer"),
    ("just an answer with <think> in it", False, "", "just an answer with <think> in it"),
    ("<think>plan" + SEC + "x", False, "plan", SEC + "x"),
    ("<think>cut short</thi", False, "cut short</thi", ""),
    ("<thi", False, "", "<thi"),
    ("", True, "", ""),
])
def test_reasoning_split(reply, in_reasoning, thought, content):
    for deltas in every_split(reply):
        parser, got_r, got_c = ReasoningParser(in_reasoning), "", ""
        for d in deltas + [None]:
            r = parser.flush() if d is None else parser.feed(d)
            got_r, got_c = got_r + r.reasoning, got_c + r.content
        assert (got_r, got_c) == (thought, content)


# --- tool calls ---

def calls(*specs):
    """Expected events for calls given as (id, name, arguments)."""
    out = []
    for i, (call_id, name, args) in enumerate(specs):
        out += [ToolCallStart(i, call_id, name), ToolCallArgs(i, args), ToolCallEnd(i)]
    return out


WELL_FORMED = [
    (["Let me check.", SEC, CALL, "functions.get_weather:0", ARGS, '{"city": "Paris"}', CALL_END, SEC_END],
     [TextDelta("Let me check.")] + calls(("functions.get_weather:0", "get_weather", '{"city": "Paris"}'))),
    ([SEC, CALL, "functions.a:0", ARGS, "{}", CALL_END, "\n", CALL, " functions.b.c:1 ", ARGS, '{"x": [1]}',
      CALL_END, SEC_END], calls(("functions.a:0", "a", "{}"), ("functions.b.c:1", "b.c", '{"x": [1]}'))),
    ([SEC, CALL, "search:3", ARGS, '{"q": "<|im_end|>"}', CALL_END, SEC_END, "after"],
     calls(("search:3", "search", '{"q": "<|im_end|>"}')) + [TextDelta("after")]),
]

MALFORMED = [  # what is not a call comes out as text, markers included
    (["a", SEC, "oops", CALL, "f:0", ARGS, "{}", CALL_END], [TextDelta("a" + SEC + "oops" + CALL + "f:0" + ARGS + "{}"
                                                                       + CALL_END)]),
    ([SEC, CALL, "functions.f:0"], [TextDelta(SEC + CALL + "functions.f:0")]),           # cut inside the id
    ([SEC, CALL, "bad", CALL_END, "x"], [TextDelta(SEC + CALL + "bad" + CALL_END + "x")]),
    ([SEC, CALL, ":0", ARGS, "{}"], [TextDelta(SEC + CALL + ":0" + ARGS + "{}")]),        # no name
    (["text <|tool_calls_sec"], [TextDelta("text <|tool_calls_sec")]),                   # cut inside a marker
    ([SEC, CALL, "f:0", ARGS, '{"a": 1'], calls(("f:0", "f", '{"a": 1'))),               # cut inside arguments
    ([SEC, CALL, "f:0", ARGS, "{}", SEC_END, "tail"], calls(("f:0", "f", "{}")) + [TextDelta("tail")]),
    ([SEC, CALL, "f:0", ARGS, "{}", CALL_END, "junk"], calls(("f:0", "f", "{}")) + [TextDelta("junk")]),
    ([SEC, CALL, "x" * 600, ARGS, "{}"], [TextDelta(SEC + CALL + "x" * 600 + ARGS + "{}")]),
]


@pytest.mark.parametrize("pieces, expected", WELL_FORMED + MALFORMED)
def test_tool_calls_token_by_token_equal_all_at_once(tok, pieces, expected):
    reply = "".join(pieces)
    for deltas in every_split(reply) + [text_deltas(tok, ids(tok, *pieces))]:
        assert run(deltas) == ("", expected)


def test_full_reply_through_both_parsers(tok):
    pieces = [THINK, "The user wants weather.", THINK_END, "Checking.", SEC, CALL, "functions.get_weather:0", ARGS,
              '{"city": "東京"}', CALL_END, SEC_END]
    expected = ("The user wants weather.",
                [TextDelta("Checking.")] + calls(("functions.get_weather:0", "get_weather", '{"city": "東京"}')))
    assert run(text_deltas(tok, ids(tok, *pieces))) == expected
    assert run(text_deltas(tok, ids(tok, *pieces[1:])), in_reasoning=True) == expected
    # reasoning that runs straight into a tool call
    assert run(["<think>hmm", SEC, CALL, "f:0", ARGS, "{}", CALL_END, SEC_END]) == ("hmm", calls(("f:0", "f", "{}")))


def _kept(events):
    """The characters a client gets back, without markup or whitespace."""
    text = "".join(getattr(e, "text", "") + getattr(e, "id", "") for e in events)
    for m in MARKERS:
        text = text.replace(m, "")
    return "".join(text.split())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(MARKERS[2:] + ["functions.f:0", "g:1", "{\"a\": 1}", " ", "\n", "x", "<|", "é"]),
                max_size=14))
def test_any_output_parses_the_same_streamed_and_loses_nothing(pieces):
    reply = "".join(pieces)
    whole, by_char = run([reply]), run(list(reply))
    assert whole == by_char
    stripped = reply
    for m in MARKERS:
        stripped = stripped.replace(m, "")
    assert _kept(whole[1]) == "".join(stripped.split())
