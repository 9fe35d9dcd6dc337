"""The ``messages`` (chat) data format: rendering parity with transformers, loss masks, truncation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from framework.data.chat import ChatEncoder, TemplateMarkError, parse_record, tokenize_messages
from framework.runtime.errors import DataError
from framework.data.prepare import prepare
from framework.data.tokenizer import Tokenizer
from tests.real_model import smollm2_tokenizer_dir
from tests.tokenizer_fixture import CHAT_FAMILIES, FIXTURES, TEMPLATES, make_family_tokenizer

CHAT = FIXTURES / "chat"

END_OF_TURN = {"llama3_instruct": "<|eot_id|>", "mistral_instruct": "</s>", "gemma_it": "<end_of_turn>",
               "qwen2_5_tools": "<|im_end|>"}


@pytest.fixture(scope="module")
def family_dirs(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {f: make_family_tokenizer(Path(tiny_tokenizer_dir), root / f, f) for f in CHAT_FAMILIES}


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CONVERSATIONS = {
    "llama3_instruct": [
        {"messages": [S("You are terse."), U("Capital of France?"), A("Paris.")]},
        {"messages": [U("Hi!"), A("Hello! How can I help?"), U("Count to three."), A("One, two, three.")]},
        {"messages": [U("  padded question  "), A("  padded answer \n")]},  # the template trims contents
    ],
    "mistral_instruct": [
        {"messages": [S("You are terse."), U("Capital of France?"), A("Paris.")]},
        {"messages": [U("Hi!"), A("Hello! How can I help?"), U("Count to three."), A("One, two, three.")]},
    ],
    "gemma_it": [
        {"messages": [U("Capital of France?"), A("Paris.")]},
        {"messages": [U("Hi!"), A("Hello! How can I help?"), U("Count to three."), A(" One, two, three. ")]},
    ],
    "qwen2_5_tools": records(CHAT / "tools.jsonl") + [
        {"messages": [U("Hi!"), A("Hello! How can I help?"), U("Count to three."), A("One, two, three.")]},
        {"messages": [S("You are terse."), U("Capital of France?"), A("Paris.")]},
    ],
}


def hf_ids(tok_dir: Path, family: str, messages, tools):
    from transformers import PreTrainedTokenizerFast

    _, _, bos, eos = CHAT_FAMILIES[family]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token=bos, eos_token=eos)
    template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    out = hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True)
    if not isinstance(out, list):
        out = out["input_ids"]
    return list(out)


def target_pieces(sample, tok: Tokenizer) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    pieces, run = [], []
    for i, m in zip(sample.input_ids + [None], sample.loss_mask + [0]):
        if m:
            run.append(i)
        elif run:
            pieces.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return pieces


# --- rendering parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(CHAT_FAMILIES))
def test_token_identical_to_transformers(family, family_dirs):
    tok = Tokenizer.from_dir(family_dirs[family])
    enc = ChatEncoder(tok)
    for rec in CONVERSATIONS[family]:
        messages, tools = parse_record("x.jsonl", 1, rec)
        ours = enc.encode(messages, tools).input_ids
        assert ours == hf_ids(family_dirs[family], family, messages, tools), rec
        assert tok.decode(ours, skip_special_tokens=False) == enc.render(messages, tools)


@pytest.mark.real_model
def test_token_identical_to_transformers_smollm2():
    from transformers import AutoTokenizer

    smollm2 = smollm2_tokenizer_dir()
    tok = Tokenizer.from_dir(smollm2)
    hf = AutoTokenizer.from_pretrained(str(smollm2))
    enc = ChatEncoder(tok)
    for rec in CONVERSATIONS["llama3_instruct"][:2]:
        messages, tools = parse_record("x.jsonl", 1, rec)
        sample = enc.encode(messages, tools)
        out = hf.apply_chat_template(messages, tokenize=True)
        assert sample.input_ids == list(out if isinstance(out, list) else out["input_ids"])
        assert target_pieces(sample, tok) == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


# --- loss masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(CHAT_FAMILIES))
def test_mask_covers_exactly_assistant_contents_and_end_of_turn(family, family_dirs):
    tok = Tokenizer.from_dir(family_dirs[family])
    enc = ChatEncoder(tok)
    eot = END_OF_TURN[family]
    for rec in CONVERSATIONS[family]:
        messages, tools = parse_record("x.jsonl", 1, rec)
        sample = enc.encode(messages, tools)
        pieces = target_pieces(sample, tok)
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert len(pieces) == len(assistants)
        for piece, m in zip(pieces, assistants):
            assert piece.endswith(eot), piece
            if m.get("tool_calls"):
                body = piece[: -len(eot)]
                assert body.count("<tool_call>") == len(m["tool_calls"]) and body.endswith("</tool_call>")
                for tc in m["tool_calls"]:
                    assert json.dumps(tc["function"]["arguments"]) in body
                if m.get("content"):
                    assert body.startswith(m["content"])
                else:
                    assert body.startswith("<tool_call>")  # the call itself, not the assistant header
            else:
                assert piece[: -len(eot)].strip() == m["content"].strip()
        # nothing a user, system or tool message wrote is a target
        for m in messages:
            if m["role"] != "assistant" and not any(m["content"].strip() in (a.get("content") or "")
                                                    for a in assistants):
                assert all(m["content"].strip() not in p for p in pieces)


def test_loss_on_last_and_all(family_dirs):
    tok = Tokenizer.from_dir(family_dirs["llama3_instruct"])
    messages, _ = parse_record("x.jsonl", 1, CONVERSATIONS["llama3_instruct"][1])
    assistant = ChatEncoder(tok, loss_on="assistant").encode(messages)
    last = ChatEncoder(tok, loss_on="last").encode(messages)
    every = ChatEncoder(tok, loss_on="all").encode(messages)
    assert assistant.input_ids == last.input_ids == every.input_ids
    assert target_pieces(assistant, tok) == ["Hello! How can I help?<|eot_id|>", "One, two, three.<|eot_id|>"]
    assert target_pieces(last, tok) == ["One, two, three.<|eot_id|>"]
    assert every.loss_mask == [0] + [1] * (len(every) - 1)
    with pytest.raises(ValueError, match="loss_on"):
        ChatEncoder(tok, loss_on="everything")


def test_template_that_cannot_mark_assistant_turns_fails_loudly(family_dirs, tmp_path):
    tok = Tokenizer.from_dir(family_dirs["mistral_instruct"])
    upper = "{% for m in messages %}{{ m.role }}: {{ m.content | upper }}{{ eos_token }}\n{% endfor %}"
    messages, _ = parse_record("x.jsonl", 1, {"messages": [U("hi"), A("hello")]})
    with pytest.raises(TemplateMarkError, match="cannot mark where assistant content starts and ends"):
        ChatEncoder(tok, chat_template=upper).encode(messages)
    # through the file API: a DataError naming file and line
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [U("hi"), A("hello")]}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: the chat template cannot mark"):
        tokenize_messages(path, tok, 512, chat_template=upper)
    # loss_on: all is the explicit opt-in to train on every token
    samples, _ = tokenize_messages(path, tok, 512, chat_template=upper, loss_on="all")
    assert samples[0].num_targets == len(samples[0]) - 1
    # a template that drops the assistant turn cannot mark it either
    drop = "{% for m in messages if m.role != 'assistant' %}{{ m.content }}{% endfor %}{{ eos_token }}"
    with pytest.raises(TemplateMarkError, match="does not appear"):
        ChatEncoder(tok, chat_template=drop).encode(messages)


def test_template_errors_name_file_and_line(family_dirs, tmp_path):
    tok = Tokenizer.from_dir(family_dirs["gemma_it"])  # gemma's template raises on a system message
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"messages": [U("a"), A("b")]}) + "\n"
                    + json.dumps({"messages": [S("sys"), U("a"), A("b")]}) + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl:2: chat template error: System role not supported"):
        tokenize_messages(path, tok, 512)


def test_missing_chat_template_is_an_error(tiny_tokenizer_dir):
    with pytest.raises(DataError, match="no chat_template"):
        ChatEncoder(Tokenizer.from_dir(tiny_tokenizer_dir))


# --- truncation ------------------------------------------------------------------------------------------


def test_truncation_drops_earliest_exchanges_and_counts(family_dirs, tmp_path):
    tok = Tokenizer.from_dir(family_dirs["llama3_instruct"])
    enc = ChatEncoder(tok)
    turns = [S("Be brief.")]
    for k in range(4):
        turns += [U(f"Question number {k}?"), A(f"Answer number {k}.")]
    full = enc.encode(turns)
    last_two = enc.encode(turns[:1] + turns[5:])
    last_one = enc.encode(turns[:1] + turns[7:])
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({"messages": turns}) for _ in range(3)) + "\n")

    samples, report = tokenize_messages(path, tok, len(full))  # fits: untouched
    assert samples[0] == full and report.truncated == 0

    samples, report = tokenize_messages(path, tok, len(last_two))  # two earliest exchanges dropped
    assert samples[0] == last_two
    assert report.truncated == 3 and report.prompt_tokens_cut == 3 * (len(full) - len(last_two))
    text = tok.decode(samples[0].input_ids, skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert "number 1" not in text and "Question number 2?" in text
    assert target_pieces(samples[0], tok) == ["Answer number 2.<|eot_id|>", "Answer number 3.<|eot_id|>"]

    samples, report = tokenize_messages(path, tok, len(last_one) - 1)  # even the last exchange is too long
    assert samples == [] and report.dropped == {"too_long": 3} and report.read == 3
    with pytest.raises(DataError, match="all 3 samples dropped"):
        prepare([path], tok, len(last_one) - 1, data_format="messages")


def test_truncation_keeps_tool_results_with_their_calls(family_dirs):
    tok = Tokenizer.from_dir(family_dirs["qwen2_5_tools"])
    enc = ChatEncoder(tok)
    rec = records(CHAT / "tools.jsonl")[0]
    messages, tools = parse_record("x", 1, rec)
    messages = messages[:1] + [U("Warm-up question?"), A("Warm-up answer.")] + messages[1:]
    full = enc.encode(messages, tools)
    sample, reason, cut = enc.build(messages, tools, len(full) - 1)
    assert reason is None and cut > 0
    assert sample == enc.encode(messages[:1] + messages[3:], tools)  # only the warm-up exchange went


# --- files, reports and errors ---------------------------------------------------------------------------


def test_prepare_messages_format(family_dirs):
    tok = Tokenizer.from_dir(family_dirs["qwen2_5_tools"])
    (basic, tools), (r1, r2) = prepare([CHAT / "basic.jsonl", CHAT / "tools.jsonl"], tok, 1024,
                                       data_format="messages")
    assert (r1.read, r1.kept, r2.read, r2.kept) == (3, 3, 2, 2)
    assert r1.target_tokens == sum(s.num_targets for s in basic) > 0
    (last,), _ = prepare([CHAT / "basic.jsonl"], tok, 1024, data_format="messages", loss_on="last")
    assert sum(s.num_targets for s in last) < r1.target_tokens
    with pytest.raises(ValueError, match="data.loss_on"):
        prepare([CHAT / "basic.jsonl"], tok, 1024, data_format="messages", loss_on="bogus")


def test_empty_reply_is_a_counted_skip(family_dirs):
    tok = Tokenizer.from_dir(family_dirs["llama3_instruct"])
    samples, report = tokenize_messages(CHAT / "empty_reply.jsonl", tok, 1024)
    assert len(samples) == 1 and report.dropped == {"no_targets": 1} and report.dropped_lines == {"no_targets": [2]}


@pytest.mark.parametrize("name, line, message", [
    ("bad_json.jsonl", 2, "invalid JSON"),
    ("bad_role.jsonl", 3, 'messages[1].role: expected one of system, user, assistant, tool, got "bot"'),
    ("bad_content.jsonl", 1, "messages[1].content: expected a string, got list"),
    ("bad_tool_id.jsonl", 2, 'messages[2].tool_call_id: "call_2" matches no earlier unanswered tool call'),
    ("unanswered_tool_call.jsonl", 1, 'messages[1].tool_calls[0].id: tool call "call_1" has no tool message'),
    ("no_assistant.jsonl", 2, "no assistant message"),
])
def test_bad_input_names_file_and_line(name, line, message, family_dirs):
    tok = Tokenizer.from_dir(family_dirs["qwen2_5_tools"])
    with pytest.raises(DataError) as err:
        tokenize_messages(CHAT / name, tok, 1024)
    assert err.value.path.endswith(name) and err.value.line == line
    assert message in err.value.message, err.value.message
    assert str(err.value).startswith(f"{CHAT / name}:{line}: ")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x"}, 'missing key "messages"'),
    ({"messages": "hi"}, '"messages": expected a list of messages, got string'),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"content": "x"}]}, "messages[0].role: expected one of system, user, assistant, tool, got nothing"),
    ({"messages": [U("a"), {"role": "assistant"}]}, "messages[1].content: missing"),
    ({"messages": [U(3)]}, "messages[0].content: expected a string, got int"),
    ({"messages": [U("a"), {"role": "user", "content": "b", "tool_calls": []}]}, "only assistant messages"),
    ({"messages": [U("a"), {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
      "arguments": "{oops"}}]}]}, "messages[1].tool_calls[0].function.arguments: invalid JSON"),
    ({"messages": [U("a"), {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]},
     "messages[1].tool_calls[0].id: expected a non-empty string"),
    ({"messages": [U("a"), {"role": "tool", "content": "r"}]}, "messages[1].tool_call_id: expected the id"),
    ({"messages": [U("a"), A("b")], "tools": {"name": "f"}}, '"tools": expected a list, got object'),
])
def test_record_validation_messages(record, message):
    with pytest.raises(DataError) as err:
        parse_record("d.jsonl", 7, record)
    assert str(err.value).startswith("d.jsonl:7: ") and message in err.value.message, err.value.message


def test_bundled_chat_example_prepares(family_dirs):
    root = Path(__file__).resolve().parents[2]
    tok = Tokenizer.from_dir(family_dirs["qwen2_5_tools"])
    (samples,), (report,) = prepare([root / "data" / "chat" / "val.jsonl"], tok, 512, data_format="messages")
    assert report.read == report.kept == len(samples) > 100
    assert all(0 < s.num_targets < len(s) for s in samples)
