"""The tokenise-once data cache: the same samples and report as tokenising, built once across runs and
processes, invalidated by every input that changes the tokens, robust to crashed builders."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import shutil
from pathlib import Path

import pytest

from framework.runtime.errors import ConfigError
from framework.data import cache as data_cache
from framework.data.cache import CachedSamples, read_manifest
from framework.runtime.errors import DataError
from framework.data.prepare import cache_dir, prepare, prepare_one
from framework.data.tokenizer import Tokenizer
from tests.tokenizer_fixture import make_family_tokenizer

ROOT = Path(__file__).resolve().parents[2]
HUMANEVAL = ROOT / "data/humaneval/train.jsonl"
CHAT = ROOT / "tests/fixtures/chat"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def chat_tok_dir(tiny_tokenizer_dir, tmp_path_factory):
    return make_family_tokenizer(Path(tiny_tokenizer_dir), tmp_path_factory.mktemp("chat_tok") / "t",
                                 "qwen2_5_tools")


def entries(root: Path) -> list[Path]:
    """Complete cache entries under ``root``."""
    return sorted(p for p in root.iterdir() if p.is_dir() and read_manifest(p) is not None)


def count_tokenising(monkeypatch) -> list[int]:
    """Count every call into the tokenizer (plain and offset-returning encodes) from now on."""
    calls = [0]
    for name in ("encode", "encode_with_offsets"):
        original = getattr(Tokenizer, name)

        def counted(self, text, _original=original):
            calls[0] += 1
            return _original(self, text)

        monkeypatch.setattr(Tokenizer, name, counted)
    return calls


def test_cached_samples_identical_to_uncached(tiny_tokenizer_dir, chat_tok_dir, tmp_path):
    """Prompt/completion (with truncation and drops) and messages: the same samples in the same order and
    the same report, on the build and on the hit; pickled as a location, not a copy."""
    tok, chat_tok = Tokenizer.from_dir(tiny_tokenizer_dir), Tokenizer.from_dir(chat_tok_dir)
    cases = [(HUMANEVAL, tok, 160, {}), (CHAT / "basic.jsonl", chat_tok, 1024, {"data_format": "messages"}),
             (CHAT / "tools.jsonl", chat_tok, 1024, {"data_format": "messages", "loss_on": "last"})]
    for path, t, max_length, kw in cases:
        (plain,), (plain_report,) = prepare([path], t, max_length, **kw)
        for _ in ("build", "hit"):
            (cached,), (report,) = prepare([path], t, max_length, cache_dir=tmp_path, **kw)
            assert isinstance(cached, CachedSamples)
            assert len(cached) == len(plain) and list(cached) == plain
            assert cached[-1] == plain[-1] and cached[3:5] == plain[3:5]
            assert report == plain_report
        assert list(pickle.loads(pickle.dumps(cached))) == plain and len(pickle.dumps(cached)) < 1000
    (_, short), (_, short_report) = prepare([HUMANEVAL, HUMANEVAL], tok, 60, cache_dir=tmp_path)
    assert short_report.truncated and short_report.dropped_total  # the counts survive the cache
    assert short_report == prepare([HUMANEVAL], tok, 60)[1][0]
    assert len(entries(tmp_path)) == 4
    with pytest.raises(IndexError):
        cached[len(cached)]


def test_second_run_does_not_tokenise(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """A second run (here a fresh tokenizer and a copy of the file at another path) maps the entry without
    one call into the tokenizer, and reports under the path it was given."""
    calls = count_tokenising(monkeypatch)
    first, report = prepare_one(HUMANEVAL, Tokenizer.from_dir(tiny_tokenizer_dir), 160, cache_dir=tmp_path)
    assert calls[0] >= 2 * len(first)  # prompt and completion of every sample
    copy = Path(shutil.copy(HUMANEVAL, tmp_path / "copy.jsonl"))
    calls[0] = 0
    second, again = prepare_one(copy, Tokenizer.from_dir(tiny_tokenizer_dir), 160, cache_dir=tmp_path)
    assert calls[0] == 0
    assert list(second) == list(first) and again.path == str(copy) and again.kept == report.kept


def _variants(tmp_path, tiny_tokenizer_dir, chat_tok_dir):
    """(name, prepare_one kwargs) pairs; each differs from "base" in one input that changes the tokens."""
    data = Path(shutil.copy(CHAT / "basic.jsonl", tmp_path / "basic.jsonl"))
    edited = tmp_path / "edited.jsonl"
    edited.write_text(data.read_text().replace("Paris", "Lyon"))
    other_tok = Path(shutil.copytree(chat_tok_dir, tmp_path / "other_tok"))
    (other_tok / "tokenizer_config.json").write_text(
        (other_tok / "tokenizer_config.json").read_text().replace('"bos_token": null', '"bos_token": "<|endoftext|>"'))
    template = json.loads((chat_tok_dir / "tokenizer_config.json").read_text())["chat_template"]
    other_template_dir = Path(shutil.copytree(chat_tok_dir, tmp_path / "other_template"))
    config = json.loads((other_template_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template.replace("<|im_start|>system\\n", "<|im_start|>system\\n\\n")
    (other_template_dir / "tokenizer_config.json").write_text(json.dumps(config))
    base = {"path": data, "tok": chat_tok_dir, "max_length": 1024, "truncation_side": "left",
            "data_format": "messages", "loss_on": "assistant", "chat_template": None}
    pc = {**base, "path": HUMANEVAL, "tok": tiny_tokenizer_dir, "max_length": 160, "data_format": "prompt_completion"}
    return base, pc, [
        ("data bytes", base | {"path": edited}),
        ("tokenizer files", base | {"tok": other_tok}),
        ("template in the tokenizer", base | {"tok": other_template_dir}),
        ("template override", base | {"chat_template": template.replace("<|im_end|>\\n'", "<|im_end|>\\n\\n'")}),
        ("max_length", base | {"max_length": 900}),
        ("loss_on", base | {"loss_on": "last"}),
        ("truncation_side", pc | {"truncation_side": "right"}),
        ("prompt/completion max_length", pc | {"max_length": 100}),
    ]


def test_each_key_part_invalidates(tiny_tokenizer_dir, chat_tok_dir, tmp_path, monkeypatch):
    """Every input that changes the tokens gives a new entry, whose samples are those of tokenising with
    the changed input; the unchanged inputs hit the old entry."""
    base, pc, variants = _variants(tmp_path, tiny_tokenizer_dir, chat_tok_dir)
    root = tmp_path / "cache"

    def run(kw, cache=root):
        kw = dict(kw)
        path, tok = kw.pop("path"), Tokenizer.from_dir(kw.pop("tok"))
        samples, _ = prepare_one(path, tok, **kw, cache_dir=cache)
        return list(samples)

    run(base), run(pc)
    assert len(entries(root)) == 2
    for n, (name, kw) in enumerate(variants, start=3):
        samples = run(kw)
        assert len(entries(root)) == n, f"{name} did not change the cache key"
        assert samples == run(kw, cache=None), name
    assert len(entries(root)) == len(variants) + 2
    run(base), run(pc)  # still hits
    assert len(entries(root)) == len(variants) + 2
    key = lambda **o: data_cache.cache_key(HUMANEVAL, Tokenizer.from_dir(tiny_tokenizer_dir), o)[0]  # noqa: E731
    assert key(format="prompt_completion") != key(format="messages")
    before = key(format="prompt_completion")
    monkeypatch.setattr(data_cache, "FORMAT_VERSION", data_cache.FORMAT_VERSION + 1)
    assert key(format="prompt_completion") != before  # a new layout never reads old entries


def _build_in_child(tok_dir, cache, barrier, crash_after=None):
    """One process's prepare_one of the bundled file; returns (calls into the tokenizer, samples).
    ``crash_after``: die (os._exit) after writing that many samples, as a killed builder would."""
    calls = [0]
    original = Tokenizer.encode

    def counted(self, text):
        calls[0] += 1
        return original(self, text)

    Tokenizer.encode = counted
    if crash_after is not None:
        append = data_cache._Writer.append

        def crashing(self, sample):
            append(self, sample)
            if self.num_samples == crash_after:
                self.flush()
                os._exit(3)

        data_cache._Writer.append = crashing
    tok = Tokenizer.from_dir(tok_dir)
    if barrier is not None:
        barrier.wait(timeout=60)
    samples, report = prepare_one(HUMANEVAL, tok, 160, cache_dir=cache)
    return calls[0], [(s.input_ids, s.loss_mask) for s in samples], report.to_dict()


def _child(q, *args):
    try:
        q.put(_build_in_child(*args))
    except BaseException:
        import traceback

        q.put(traceback.format_exc())


def test_concurrent_processes_build_once(tiny_tokenizer_dir, tmp_path):
    """Three processes released together: exactly one tokenises, all three get identical samples."""
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(q, tiny_tokenizer_dir, tmp_path, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=100) for _ in procs]
    assert not [r for r in results if isinstance(r, str)], [r for r in results if isinstance(r, str)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    calls = sorted(c for c, _, _ in results)
    assert calls[0] == calls[1] == 0 and calls[2] > 0, calls
    assert results[0][1:] == results[1][1:] == results[2][1:]
    assert len(entries(tmp_path)) == 1
    expected, _ = prepare_one(HUMANEVAL, Tokenizer.from_dir(tiny_tokenizer_dir), 160)
    assert results[0][1] == [(s.input_ids, s.loss_mask) for s in expected]


def test_crashed_builder_and_damaged_entry_are_ignored(tiny_tokenizer_dir, tmp_path):
    """A builder killed mid-write leaves only a hidden temp dir (never read, removed by the next builder);
    an entry whose array was cut short, or whose manifest is missing, is rebuilt."""
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_build_in_child, args=(tiny_tokenizer_dir, tmp_path, None, 5))
    p.start()
    p.join(timeout=100)
    assert p.exitcode == 3
    leftovers = [x for x in tmp_path.iterdir() if ".tmp-" in x.name]
    assert len(leftovers) == 1 and (leftovers[0] / "tokens.bin").stat().st_size > 0
    assert entries(tmp_path) == []

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    expected, expected_report = prepare_one(HUMANEVAL, tok, 160)
    samples, report = prepare_one(HUMANEVAL, tok, 160, cache_dir=tmp_path)
    assert list(samples) == expected and report == expected_report
    assert not [x for x in tmp_path.iterdir() if ".tmp-" in x.name]
    (entry,) = entries(tmp_path)

    for damage in ("truncate tokens", "no manifest"):
        if damage == "truncate tokens":
            with open(entry / "tokens.bin", "r+b") as f:
                f.truncate(f.seek(0, 2) - 2)
        else:
            (entry / "manifest.json").unlink()
        assert read_manifest(entry) is None
        samples, _ = prepare_one(HUMANEVAL, tok, 160, cache_dir=tmp_path)
        assert list(samples) == expected and entries(tmp_path) == [entry]


def test_invalid_file_leaves_no_entry(tiny_tokenizer_dir, tmp_path):
    """A bad record stops the build with file:line and publishes nothing; every run reports it again."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(HUMANEVAL.read_text() + '{"prompt": "p", "completion": 5}\n')
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    for _ in range(2):
        with pytest.raises(DataError, match=rf"bad\.jsonl:{148}: expected a string"):
            prepare_one(bad, tok, 160, cache_dir=tmp_path / "cache")
    assert entries(tmp_path / "cache") == []
    assert not [x for x in (tmp_path / "cache").iterdir() if x.is_dir()]
    with pytest.raises(DataError, match="file not found"):
        prepare_one(tmp_path / "missing.jsonl", tok, 160, cache_dir=tmp_path / "cache")


def test_cache_dir_setting(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path / "root"))
    assert cache_dir({"train": "x"}) == tmp_path / "root" / "data"  # key absent: the default
    assert cache_dir({"cache_dir": None}) is None
    assert cache_dir({"cache_dir": "~/c"}) == Path.home() / "c"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"data\.cache_dir=.*file/sub: cannot create"):
        prepare_one(HUMANEVAL, Tokenizer.from_dir(tiny_tokenizer_dir), 160, cache_dir=blocker / "sub")
    from tests.sft_jobs import compose

    cfg = compose(["model=tiny_llama"])  # the shipped default follows $FRAMEWORK_CACHE
    assert cache_dir(cfg.data) == tmp_path / "root" / "data"
