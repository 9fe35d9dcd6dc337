"""Preference pairs (framework/data/preference.py): every kind of bad record is an error naming file:line or
a counted skip, malformed records are errors even when skipping, truncation keeps one prompt for both
rows, chat records render with the chat template, and the bundled arithmetic set is what its script
writes."""

from __future__ import annotations

import json
import os

import pytest

from tests.sft_jobs import ROOT


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from framework.data.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_tokenizer_dir)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
BAD = [  # (record, reason, message)
    ({"prompt": "What is 2 + 2?", "rejected": "5"}, "missing_chosen", 'missing "chosen" response'),
    ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": None}, "missing_rejected", 'missing "rejected" response'),
    ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"}, "identical_responses",
     "chosen and rejected are identical"),
    ({"prompt": "  ", "chosen": "4", "rejected": "5"}, "empty_prompt", "empty prompt"),
    ({"messages": [], "chosen": "4", "rejected": "5"}, "empty_prompt", "empty prompt"),
    ({"prompt": "What is 2 + 2?", "chosen": "", "rejected": "5"}, "empty_response", 'empty "chosen" response'),
]


@pytest.mark.parametrize("record,reason,message", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_record_is_an_error_naming_file_and_line(tok, tmp_path, record, reason, message):
    from framework.runtime.errors import DataError
    from framework.data.preference import tokenize_preferences

    path = _write(tmp_path / "p.jsonl", [GOOD, "", GOOD, record, GOOD])
    with pytest.raises(DataError) as e:
        tokenize_preferences(path, tok, 64)
    assert str(e.value).startswith(f"{path}:4: {message}")
    assert f"counted as {reason}" in str(e.value)


def test_bad_records_skipped_and_counted(tok, tmp_path):
    from framework.data.preference import tokenize_preferences

    path = _write(tmp_path / "p.jsonl", [GOOD] + [b[0] for b in BAD] + [GOOD])
    pairs, report = tokenize_preferences(path, tok, 64, bad_records="skip")
    assert len(pairs) == 2 and report.read == 2 + len(BAD) and report.kept == 2
    want = {}
    for _rec, reason, _msg in BAD:
        want[reason] = want.get(reason, 0) + 1
    assert dict(report.dropped) == want
    assert report.dropped_lines["empty_prompt"] == [5, 6]
    assert "identical_responses" in report.format()


@pytest.mark.parametrize("record,message", [
    ({"chosen": "4", "rejected": "5"}, 'missing "prompt" (text) or "messages" (chat)'),
    ({"prompt": "x", "chosen": 4, "rejected": "5"}, '"chosen": expected a string (the response to "prompt"), got int'),
    ({"prompt": 3, "chosen": "4", "rejected": "5"}, '"prompt": expected a string or a list of messages, got int'),
    ({"messages": [{"role": "user", "content": "x"}], "chosen": {"role": "user", "content": "4"}, "rejected": "5"},
     '"chosen": expected a string or an assistant message'),
    ({"messages": [{"role": "bot", "content": "x"}], "chosen": "4", "rejected": "5"}, "messages[0].role"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_records_are_errors_even_when_skipping(tok, tmp_path, record, message):
    from framework.runtime.errors import DataError
    from framework.data.preference import tokenize_preferences

    path = _write(tmp_path / "p.jsonl", [GOOD, record])
    with pytest.raises(DataError, match=f"^{path}:2: ") as e:
        tokenize_preferences(path, tok, 64, bad_records="skip")
    assert message in str(e.value)


def test_text_pairs_share_one_truncated_prompt(tok, tmp_path):
    """Both rows keep the same prompt tokens, cut (from the left by default) so the longer response fits;
    each row is exactly the SFT prompt/completion sample of that prompt; a response that cannot fit drops."""
    from framework.data.preference import tokenize_preferences
    from framework.data.prompt_completion import build_sample

    prompt, short, long = "def add(a, b):\n    " * 6, "return a + b", "return a + b  # the sum of a and b"
    n_long = len(tok.encode(long))
    max_length = n_long + 2 + 10  # bos + eos + 10 prompt tokens
    path = _write(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": short, "rejected": long},
                                         {"prompt": "x", "chosen": short, "rejected": long * 20}])
    for side in ("left", "right"):
        pairs, report = tokenize_preferences(path, tok, max_length, truncation_side=side)
        assert len(pairs) == 1 and dict(report.dropped) == {"completion_too_long": 1} and report.truncated == 1
        p = pairs[0]
        ids = tok.encode(prompt)
        kept = ids[-10:] if side == "left" else ids[:10]
        assert p.chosen == build_sample(kept, tok.encode(short), tok.bos_id, tok.eos_id, 10 ** 6)[0]
        assert p.rejected == build_sample(kept, tok.encode(long), tok.bos_id, tok.eos_id, 10 ** 6)[0]
        assert len(p.rejected) == max_length and report.prompt_tokens_cut == len(ids) - 10


def test_chat_pairs_render_with_the_template(tiny_tokenizer_dir, tmp_path):
    """Chat form: each row is the context plus that response rendered by the chat template, the mask on the
    last assistant turn (SFT's loss_on=last); TRL's list form is the same; long contexts lose their earliest
    exchanges, the same for both rows."""
    from framework.data.chat import ChatEncoder
    from framework.data.preference import tokenize_preferences
    from framework.data.tokenizer import Tokenizer
    from tests.tokenizer_fixture import make_family_tokenizer

    tok = Tokenizer.from_dir(make_family_tokenizer(tiny_tokenizer_dir, tmp_path / "tok", "llama3_instruct"))
    enc = ChatEncoder(tok, loss_on="last")
    sys_, u1, a1, u2 = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello, how can I help?"},
                        {"role": "user", "content": "What is 2 + 2?"})
    chosen, rejected = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5, I think"}
    context = [sys_, u1, a1, u2]
    path = _write(tmp_path / "c.jsonl", [{"messages": context, "chosen": "4", "rejected": "5, I think"},
                                         {"prompt": context, "chosen": [chosen], "rejected": [rejected]}])
    pairs, _ = tokenize_preferences(path, tok, 512)
    assert pairs[0] == pairs[1]
    assert pairs[0].chosen == enc.encode(context + [chosen])
    assert pairs[0].rejected == enc.encode(context + [rejected])
    assert 0 < pairs[0].chosen.num_targets < pairs[0].rejected.num_targets
    short = [sys_, u2]
    limit = max(len(enc.encode(short + [r])) for r in (chosen, rejected))
    pairs, report = tokenize_preferences(path, tok, limit)
    assert pairs[0].chosen == enc.encode(short + [chosen]) and pairs[0].rejected == enc.encode(short + [rejected])
    assert report.truncated == 2


def test_bundled_arithmetic_set(tok):
    """data/preference/arithmetic.jsonl is what make_arithmetic.py writes; every pair is kept, the chosen
    answer is the sum and the rejected one is not."""
    import importlib.util

    from framework.data.preference import tokenize_preferences

    path = os.path.join(ROOT, "data", "preference", "arithmetic.jsonl")
    spec = importlib.util.spec_from_file_location("make_arithmetic", os.path.join(ROOT, "data", "preference",
                                                                                   "make_arithmetic.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    records = make.records()
    assert open(path).read() == "".join(json.dumps(r) + "\n" for r in records)
    for r in records:
        a, b = (int(x) for x in r["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
        assert int(r["chosen"]) == a + b != int(r["rejected"])
    pairs, report = tokenize_preferences(path, tok, 64)
    assert len(pairs) == len(records) == 400 and not report.dropped_total
