"""framework/data: tokenizer, prompt/completion validation, truncation, loss mask, batching, bundled data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.data.batching import BatchOrder, collate, micro_batches
from framework.runtime.errors import DataError, TokenizerError
from framework.data.prepare import prepare
from framework.data.prompt_completion import build_sample, tokenize_prompt_completion
from framework.data.report import format_reports
from framework.data.sample import Sample
from framework.data.tokenizer import Tokenizer
from tests.tokenizer_fixture import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jl(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


class IdTokenizer:
    """Each character is one token id (ord), for exact truncation arithmetic."""

    def __init__(self, bos_id=1000, eos_id=1001):
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, eos_id

    def encode(self, text):
        return [ord(c) for c in text]


# --- tokenizer ------------------------------------------------------------------------------------------


def test_tiny_tokenizer_sizes_and_specials(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "def f(x):\n    return x * 2  # é 日本\n"
    ids = tok.encode(text)
    assert 0 not in ids and 1 not in ids  # no special tokens added by encode
    assert tok.decode(ids) == text
    assert tok.decode([0] + ids + [1]) == text  # specials skipped by default
    assert "</s>" in tok.decode(ids + [1], skip_special_tokens=False)


def test_tiny_tokenizer_exact_size_and_deterministic(tmp_path):
    a = make_tiny_tokenizer(tmp_path / "a", vocab_size=300)
    b = make_tiny_tokenizer(tmp_path / "b", vocab_size=300)
    assert Tokenizer.from_dir(a).vocab_size == 300
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tokenizer_config_dict_tokens_template_and_pad_fallback(tiny_tokenizer_dir, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((Path(tiny_tokenizer_dir) / "tokenizer.json").read_bytes())
    write(d / "tokenizer_config.json", json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": {"content": "</s>"},
        "pad_token": None, "chat_template": "{{ messages }}"}))
    t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 1)
    assert t.chat_template == "{{ messages }}"

    out = t.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_dir(out)
    assert again.encode("hello world") == t.encode("hello world") and again.chat_template == t.chat_template


def test_tokenizer_chat_template_file(tiny_tokenizer_dir, tmp_path):
    d = Tokenizer.from_dir(tiny_tokenizer_dir).save(tmp_path / "t")
    write(d / "chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}")
    t = Tokenizer.from_dir(d)
    assert t.chat_template.startswith("{% for m")
    assert (t.save(tmp_path / "copy") / "chat_template.jinja").is_file()


def test_tokenizer_without_bos_is_fine(tiny_tokenizer_dir, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((Path(tiny_tokenizer_dir) / "tokenizer.json").read_bytes())
    write(d / "tokenizer_config.json", json.dumps({"eos_token": "</s>"}))
    t = Tokenizer.from_dir(d)
    assert t.bos_id is None and t.eos_id == 1


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "tokenizer directory not found"),
    ("no_json", "no tokenizer.json"),
    ("corrupt_json", "cannot load tokenizer"),
    ("no_eos", "no eos_token"),
    ("eos_not_in_vocab", 'eos_token "<|end|>" is not in the vocabulary'),
    ("bad_config_json", "invalid JSON"),
])
def test_tokenizer_errors_name_the_path(case, expected, tiny_tokenizer_dir, tmp_path):
    d = tmp_path / "tok"
    good = (Path(tiny_tokenizer_dir) / "tokenizer.json").read_bytes()
    if case != "missing_dir":
        d.mkdir()
    if case in ("no_eos", "eos_not_in_vocab", "bad_config_json"):
        (d / "tokenizer.json").write_bytes(good)
    if case == "corrupt_json":
        write(d / "tokenizer.json", '{"model": ')
    if case == "no_eos":
        write(d / "tokenizer_config.json", json.dumps({"bos_token": "<s>"}))
    if case == "eos_not_in_vocab":
        write(d / "tokenizer_config.json", json.dumps({"eos_token": "<|end|>"}))
    if case == "bad_config_json":
        write(d / "tokenizer_config.json", '{\n  "eos_token": "</s>",\n}')
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(d)
    assert str(d) in str(e.value) and expected in str(e.value)
    assert isinstance(e.value, DataError)  # launchers turn it into one line
    if case == "bad_config_json":
        assert str(e.value).startswith(f"{d / 'tokenizer_config.json'}:3:")


# --- bad input: every error names file and line ---------------------------------------------------------

GOOD = {"prompt": "p", "completion": "c"}


@pytest.mark.parametrize("content, line, message", [
    (jl(GOOD) + '{"prompt": "p", "completion": \n', 2, "invalid JSON"),
    (jl(GOOD, GOOD) + '["p", "c"]\n', 3, "expected a JSON object, got list"),
    (jl(GOOD) + '"just a string"\n', 2, "expected a JSON object, got string"),
    (jl(GOOD, {"completion": "c"}), 2, 'missing key "prompt"'),
    (jl({"prompt": "p", "answer": "c"}), 1, 'missing key "completion" (keys present: "prompt", "answer")'),
    (jl(GOOD, {"prompt": "p", "completion": 3}), 2, 'expected a string under "completion", got int'),
    (jl({"prompt": None, "completion": "c"}), 1, 'expected a string under "prompt", got null'),
    (jl({"prompt": ["a"], "completion": "c"}), 1, 'expected a string under "prompt", got list'),
    (jl(GOOD, GOOD, {"prompt": "p", "completion": ""}), 3, 'empty "completion"'),
    (jl(GOOD) + "\n   \n" + jl({"prompt": 1, "completion": "c"}), 4, 'under "prompt", got int'),  # blanks counted
])
def test_bad_records_name_file_and_line(content, line, message, tok, tmp_path):
    path = write(tmp_path / "x.jsonl", content)
    with pytest.raises(DataError) as e:
        prepare([path], tok, 64)
    assert (e.value.path, e.value.line) == (str(path), line)
    assert str(e.value).startswith(f"{path}:{line}: ") and message in str(e.value)


def test_not_utf8_names_line(tok, tmp_path):
    path = write(tmp_path / "x.jsonl", jl(GOOD, GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "c"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: not UTF-8: byte 0xe9"):
        prepare([path], tok, 64)


def test_utf8_bom_and_crlf_accepted(tok, tmp_path):
    path = write(tmp_path / "x.jsonl", b"\xef\xbb\xbf" + jl(GOOD, GOOD).replace("\n", "\r\n").encode())
    (samples,), (report,) = prepare([path], tok, 64)
    assert report.read == report.kept == 2


@pytest.mark.parametrize("content, message", [("", "no samples"), ("\n  \n\n", "no samples")])
def test_empty_file(content, message, tok, tmp_path):
    path = write(tmp_path / "x.jsonl", content)
    with pytest.raises(DataError, match=rf"^{path}: no samples"):
        prepare([path], tok, 64)


def test_missing_file_and_directory(tok, tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nope.jsonl'}: file not found$"):
        prepare([tmp_path / "nope.jsonl"], tok, 64)
    with pytest.raises(DataError, match="is a directory"):
        prepare([tmp_path], tok, 64)


def test_bad_options_name_the_key(tok, tmp_path):
    path = write(tmp_path / "x.jsonl", jl(GOOD))
    with pytest.raises(ValueError, match="data.truncation_side"):
        prepare([path], tok, 64, "middle")
    with pytest.raises(ValueError, match="data.max_length"):
        prepare([path], tok, 1)


def test_extra_keys_ignored(tok, tmp_path):
    path = write(tmp_path / "x.jsonl", jl({"prompt": "a", "completion": "b", "task_id": 7, "meta": {"x": 1}}))
    (samples,), _ = prepare([path], tok, 64)
    assert len(samples) == 1


# --- sample building, loss mask, truncation ---------------------------------------------------------------


def test_loss_mask_covers_exactly_completion_and_eos(tok):
    prompt, completion = "def add(a, b):\n", "    return a + b\n"
    sample, cut = build_sample(tok.encode(prompt), tok.encode(completion), tok.bos_id, tok.eos_id, 256)
    p, c = tok.encode(prompt), tok.encode(completion)
    assert cut == 0
    assert sample.input_ids == [tok.bos_id] + p + c + [tok.eos_id]
    assert sample.loss_mask == [0] * (1 + len(p)) + [1] * (len(c) + 1)
    targets = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
    assert targets[-1] == tok.eos_id and tok.decode(targets) == completion


def test_truncation_left_keeps_prompt_end_right_keeps_start():
    t = IdTokenizer()
    p, c = t.encode("abcdefgh"), t.encode("XY")
    left, cut = build_sample(p, c, t.bos_id, t.eos_id, 8, "left")  # room: 8 - (1 + 2 + 1) = 4 prompt tokens
    assert cut == 4 and left.input_ids == [1000] + t.encode("efgh") + c + [1001]
    right, cut = build_sample(p, c, t.bos_id, t.eos_id, 8, "right")
    assert cut == 4 and right.input_ids == [1000] + t.encode("abcd") + c + [1001]
    for s in (left, right):
        assert len(s) == 8 and s.loss_mask == [0] * 5 + [1] * 3


def test_truncation_boundaries_and_drop():
    t = IdTokenizer()
    p, c = t.encode("abcd"), t.encode("XYZ")
    fits, cut = build_sample(p, c, t.bos_id, t.eos_id, 9)  # exactly 1 + 4 + 3 + 1
    assert cut == 0 and len(fits) == 9
    whole_prompt_cut, cut = build_sample(p, c, t.bos_id, t.eos_id, 5)  # bos + completion + eos only
    assert cut == 4 and whole_prompt_cut.input_ids == [1000] + c + [1001]
    assert build_sample(p, c, t.bos_id, t.eos_id, 4) == (None, 0)  # completion_too_long
    no_bos, cut = build_sample(p, c, None, t.eos_id, 5, "right")  # no bos: one more prompt token fits
    assert cut == 3 and no_bos.input_ids == t.encode("a") + c + [1001]


def test_truncation_and_drops_are_counted(tmp_path):
    t = IdTokenizer()
    path = write(tmp_path / "x.jsonl", jl(
        {"prompt": "ab", "completion": "c"},            # 5 tokens: kept
        {"prompt": "abcdefghij", "completion": "c"},    # 13: truncated (7 prompt tokens cut)
        {"prompt": "a", "completion": "cccccccc"},      # bos + 8 + eos = 10 > 6: dropped
        {"prompt": "", "completion": "cccccccccc"},     # dropped
    ))
    samples, report = tokenize_prompt_completion(path, t, 6)
    assert [len(s) for s in samples] == [5, 6]
    assert (report.read, report.kept, report.truncated, report.prompt_tokens_cut) == (4, 2, 1, 7)
    assert report.dropped == {"completion_too_long": 2} and report.dropped_lines == {"completion_too_long": [3, 4]}
    assert report.truncated_lines == [2]
    assert report.tokens == 11 and report.target_tokens == 4
    assert report.read == report.kept + report.dropped_total
    table = report.format()
    assert str(path) in table and "completion_too_long (lines 3, 4)" in table and "7 prompt tokens cut" in table


def test_all_samples_dropped_is_an_error(tmp_path):
    path = write(tmp_path / "x.jsonl", jl({"prompt": "a", "completion": "cccccccc"}))
    with pytest.raises(DataError, match=rf"^{path}: all 1 samples dropped \(1 completion_too_long\)"):
        prepare([path], IdTokenizer(), 6)


# --- batching -----------------------------------------------------------------------------------------------


def test_collate_shift_and_padding():
    a = Sample([10, 11, 12, 13, 14], [0, 0, 1, 1, 1])
    b = Sample([20, 21, 22], [0, 1, 1])
    batch = collate([a, b], pad_id=99)
    assert batch["tokens"].tolist() == [[10, 11, 12, 13], [20, 21, 99, 99]]
    assert batch["labels"].tolist() == [[11, 12, 13, 14], [21, 22, 99, 99]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert batch["loss_mask"].dtype == torch.float32 and batch["tokens"].dtype == torch.long
    # every masked-in label is a target token of the sample, in order
    assert batch["labels"][0][batch["loss_mask"][0].bool()].tolist() == [12, 13, 14]

    assert collate([a, b], 99, pad_to_multiple_of=3)["tokens"].shape == (2, 6)
    fixed = collate([b], 99, pad_to_multiple_of=2, seq_length=8)
    assert fixed["tokens"].shape == (1, 8) and fixed["loss_mask"].sum() == 2
    with pytest.raises(ValueError, match="seq_length=3"):
        collate([a], 99, seq_length=3)
    with pytest.raises(ValueError, match="not a multiple"):
        collate([a], 99, pad_to_multiple_of=4, seq_length=6)


def test_global_batch_pads_each_micro_batch_to_its_own_longest_without_a_pipeline():
    """collate_global_batch: same_length (pipeline parallelism) pads every micro-batch to the global batch's
    longest, otherwise each to its own longest; the real positions are the same either way (so is the loss:
    padding carries none), rounded up to the multiple SP needs. Both model kinds."""
    from framework.data.batching import collate_global_batch

    samples = [Sample(list(range(10, 10 + n)), [0, 0] + [1] * (n - 2)) for n in (9, 4, 3, 5)]
    mbs = [[0, 1], [2, 3]]
    one = collate_global_batch("decoder_only", mbs, [0, 1, 2, 3], samples, 99)
    own = collate_global_batch("decoder_only", mbs, [0, 1, 2, 3], samples, 99, same_length=False)
    assert [b["tokens"].shape for b in one] == [(2, 8), (2, 8)]
    assert [b["tokens"].shape for b in own] == [(2, 8), (2, 4)]
    for a, b in zip(one, own):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[key][:, :b[key].shape[1]], b[key])
        assert a["loss_mask"].sum() == b["loss_mask"].sum()
    rounded = collate_global_batch("decoder_only", mbs, [0, 1, 2, 3], samples, 99, multiple=3, same_length=False)
    assert [b["tokens"].shape for b in rounded] == [(2, 9), (2, 6)]

    enc = collate_global_batch("encoder_decoder", mbs, [0, 1, 2, 3], samples, 0)
    enc_own = collate_global_batch("encoder_decoder", mbs, [0, 1, 2, 3], samples, 0, same_length=False)
    assert [(b["encoder_tokens"].shape, b["tokens"].shape) for b in enc] == [((2, 2), (2, 7))] * 2
    assert [(b["encoder_tokens"].shape, b["tokens"].shape) for b in enc_own] == [((2, 2), (2, 7)), ((2, 2), (2, 3))]


def test_collate_real_samples_roundtrip(tok, tmp_path):
    path = write(tmp_path / "x.jsonl", jl({"prompt": "def f():\n", "completion": "    return 1\n"},
                                          {"prompt": "x = ", "completion": "2"}))
    (samples,), _ = prepare([path], tok, 64)
    batch = collate(samples, tok.pad_id, pad_to_multiple_of=4)
    assert batch["tokens"].shape[1] % 4 == 0
    for row, completion in enumerate(["    return 1\n", "2"]):
        targets = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        assert targets[-1] == tok.eos_id and tok.decode(targets) == completion


def test_batch_order_deterministic_epochs_and_resume():
    n, gbs = 10, 4
    a, b = BatchOrder(n, gbs, seed=7), BatchOrder(n, gbs, seed=7)
    batches = [next(a) for _ in range(10)]  # 40 indices = 4 epochs
    assert batches == [next(b) for _ in range(10)]
    flat = [i for batch in batches for i in batch]
    epochs = [flat[k * n:(k + 1) * n] for k in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch: every sample exactly once
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled per epoch
    assert batches[2] == epochs[0][8:] + epochs[1][:2]  # a batch continues into the next epoch
    assert a.state_dict()["epoch"] == 4 and a.position == 0
    assert [next(BatchOrder(n, gbs, seed=8)) for _ in range(3)] != batches[:3]

    c = BatchOrder(n, gbs, seed=7)
    for _ in range(3):
        next(c)
    state = c.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    d = BatchOrder(n, gbs, seed=7)
    d.load_state_dict(state)
    assert [next(d) for _ in range(7)] == batches[3:]
    with pytest.raises(ValueError, match="num_samples"):
        BatchOrder(11, gbs, seed=7).load_state_dict(state)


def test_micro_batches_split_over_data_parallel_ranks():
    indices = list(range(100, 112))
    ranks = [micro_batches(indices, r, 3, 2) for r in range(3)]
    assert ranks[0] == [[100, 101], [102, 103]]
    assert ranks[2] == [[108, 109], [110, 111]]
    assert sorted(i for mbs in ranks for mb in mbs for i in mb) == indices
    assert micro_batches(indices, 0, 1, 12) == [indices]
    expected = r"trainer\.global_batch_size \(12\).*trainer\.micro_batch_size.*\(5 x 2 = 10\)"
    with pytest.raises(ValueError, match=expected):
        micro_batches(indices, 0, 2, 5)


# --- bundled data and the launcher -----------------------------------------------------------------------


def test_bundled_humaneval_is_valid_and_reproducible(tok, tmp_path):
    train, val = ROOT / "data/humaneval/train.jsonl", ROOT / "data/humaneval/val.jsonl"
    (tr, va), reports = prepare([train, val], tok, 4096)
    assert (len(tr), len(va)) == (147, 17)
    assert all(r.truncated == 0 and r.dropped_total == 0 for r in reports)
    assert "data/humaneval/train.jsonl" in format_reports(reports)

    subprocess.run([sys.executable, str(ROOT / "data/build_humaneval.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data/humaneval" / name).read_bytes()


def _prepare_data(*overrides):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "launch/prepare_data.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_prepare_data_script(tiny_tokenizer_dir, tmp_path):
    bad = write(tmp_path / "bad.jsonl", jl(GOOD) + "\n" + jl({"prompt": "p", "completion": 5}))
    model = ["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}"]
    r = _prepare_data(*model, f"data.train={bad}", "data.validation=null")
    assert r.returncode != 0
    assert r.stderr.strip() == f'error: {bad}:3: expected a string under "completion", got int', r.stderr
    assert "Traceback" not in r.stdout + r.stderr

    ok = _prepare_data(*model, "data.max_length=4096")
    assert ok.returncode == 0, ok.stderr
    assert "data/humaneval/train.jsonl" in ok.stdout and "data/humaneval/val.jsonl" in ok.stdout


# --- validation split, test file, the data keys --------------------------------------------------------------


def test_holdout_split_is_seeded_disjoint_and_complete():
    import numpy as np

    from framework.data.views import holdout_split

    for n, fraction in [(2, 0.05), (3, 0.9), (147, 0.05), (1000, 0.1)]:
        train, val = holdout_split(n, fraction, seed=3)
        assert sorted(train.tolist() + val.tolist()) == list(range(n))
        assert len(val) == min(max(1, round(fraction * n)), n - 1) and len(train) >= 1
        assert val.tolist() == sorted(np.random.default_rng(3).permutation(n)[:len(val)].tolist())
        assert holdout_split(n, fraction, seed=3)[1].tolist() == val.tolist()  # deterministic
    assert holdout_split(1000, 0.1, 3)[1].tolist() != holdout_split(1000, 0.1, 4)[1].tolist()


def _data_node(**kw):
    from omegaconf import OmegaConf

    base = {"train": str(ROOT / "data/humaneval/train.jsonl"), "validation": None, "validation_split": 0.05,
            "test": str(ROOT / "data/humaneval/val.jsonl"), "max_length": 4096, "truncation_side": "left",
            "cache_dir": None}
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_validation_split_and_test_file(tok, tmp_path, cached):
    """5% of the training file's samples go to validation, chosen by the seed, none lost or duplicated and
    counted in the report; the test file is prepared and reported after them."""
    import numpy as np

    from framework.data.prepare import prepare_config

    data = _data_node(cache_dir=str(tmp_path) if cached else None)
    (everything, test), (train_report, test_report) = prepare([data.train, data.test], tok, 4096)
    d = prepare_config(data, tok, seed=11)
    held = sorted(np.random.default_rng(11).permutation(147)[:7].tolist())
    assert (len(d.train), len(d.validation)) == (140, 7)
    assert list(d.validation) == [everything[i] for i in held]
    assert list(d.train) == [s for i, s in enumerate(everything) if i not in held]
    assert list(d.test) == test
    train_r, split_r, test_r = d.reports
    assert (train_r.kept, train_r.held_out) == (147, 7)
    assert (split_r.read, split_r.kept) == (7, 7) and split_r.tokens == sum(len(s) for s in d.validation)
    assert split_r.target_tokens == sum(s.num_targets for s in d.validation)
    assert test_r == test_report
    table = format_reports(d.reports)
    assert "7 of the 147 kept samples held out of training for validation (data.validation_split=0.05, seed=11)" in table
    assert f"{data.train} [validation_split=0.05]" in table and str(data.test) in table
    assert list(prepare_config(data, tok, seed=12).validation) != list(d.validation)
    assert len(prepare_config(_data_node(validation_split=0.5, test=None), tok, seed=11).reports) == 2


def test_validation_split_needs_two_samples(tok, tmp_path):
    from framework.data.prepare import prepare_config

    one = write(tmp_path / "one.jsonl", jl(GOOD))
    with pytest.raises(DataError, match=r"one\.jsonl: data\.validation_split=0\.05: only 1 sample kept"):
        prepare_config(_data_node(train=str(one)), tok)


@pytest.mark.parametrize("overrides, message", [
    (["data.validation_split=0.05"], "data.validation='data/humaneval/val.jsonl' and data.validation_split=0.05 "
                                     "are both set: give exactly one"),
    (["data.validation=null"], "data.validation and data.validation_split are both unset: give exactly one"),
    (["data.validation=null", "data.validation_split=0"], "data.validation_split=0.0: expected a fraction"),
    (["data.validation=null", "data.validation_split=1.5"], "data.validation_split=1.5: expected a fraction"),
    (["data.validation=null", "data.validation_split=true"], "data.validation_split=True: expected a number"),
    (["data.test=[a,b]"], "data.test=['a', 'b']: expected a string or null"),
    (["data.max_lenght=64"], None),  # an unknown key: Hydra refuses it as it composes (typo protection)
])
def test_validation_keys_are_checked_before_the_job(overrides, message):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate
    from tests.sft_jobs import compose

    if message is None:
        from hydra.errors import ConfigCompositionException

        with pytest.raises(ConfigCompositionException, match="max_lenght"):
            compose(["model=tiny_llama", *overrides])
        return
    with pytest.raises(ConfigError) as e:
        validate(compose(["model=tiny_llama", *overrides]), 1)
    assert message in str(e.value)
    validate(compose(["model=tiny_llama", "data.validation=null", "data.validation_split=0.05",
                      "data.test=data/humaneval/val.jsonl"]), 1)  # the fixed configuration passes


def test_prepare_data_script_split_test_and_cache(tiny_tokenizer_dir, tmp_path):
    """The new keys through the launcher: the split and the test file in the table, the files written to
    the cache (and mapped, with the same table, on a second run); both validation keys is a one-line error."""
    model = ["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", "data.max_length=4096"]
    keys = ["data.validation=null", "data.validation_split=0.1", "data.test=data/humaneval/val.jsonl",
            f"data.cache_dir={tmp_path}"]
    first, second = _prepare_data(*model, *keys), _prepare_data(*model, *keys)
    assert first.returncode == 0, first.stderr
    assert "15 of the 147 kept samples held out of training for validation" in first.stdout
    assert "data/humaneval/train.jsonl [validation_split=0.1]" in first.stdout
    assert "data/humaneval/val.jsonl" in first.stdout and f"data cache: {tmp_path}" in first.stdout
    assert second.stdout == first.stdout
    assert len([p for p in tmp_path.iterdir() if (p / "manifest.json").is_file()]) == 2  # train, test
    both = _prepare_data(*model, "data.validation_split=0.1")
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "Traceback" not in both.stderr
    assert "data.validation='data/humaneval/val.jsonl' and data.validation_split=0.1 are both set" in both.stderr
