"""A tiny, real, deterministic tokenizer for tests: byte-level BPE trained on the bundled HumanEval text.

``make_tiny_tokenizer(out_dir, vocab_size=512)`` writes ``tokenizer.json`` and ``tokenizer_config.json``
(loadable by ``framework.data.tokenizer.Tokenizer.from_dir`` and by transformers' ``AutoTokenizer``).
Special tokens: ``<s>`` = 0 (bos), ``</s>`` = 1 (eos), ``<pad>`` = 2 (pad). Byte-level, so any text
encodes (no unknown tokens) and decodes back exactly.
``Tokenizer.vocab_size`` is exactly ``vocab_size`` (specials included): the trainer fills it with merges
and, should the corpus run out of merges, reserved ``<extra_i>`` tokens make up the difference.
Training takes well under a second on one core.

``make_family_tokenizer(base_dir, out_dir, family)`` copies it with a model family's special tokens added and
that family's chat template (tests/fixtures/chat_templates/) in its config, for the chat-format tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS_FILES = (ROOT / "data" / "humaneval" / "train.jsonl", ROOT / "data" / "humaneval" / "val.jsonl")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte + the specials
FIXTURES = ROOT / "tests" / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"

# per template: (special tokens, non-special added tokens, bos, eos) as in the real tokenizers
CHAT_FAMILIES = {
    "llama3_instruct": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [],
                        "<|begin_of_text|>", "<|eot_id|>"),
    "mistral_instruct": ([], [], "<s>", "</s>"),
    "gemma_it": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<bos>", "<eos>"),
    "qwen2_5_tools": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>"],
                      None, "<|im_end|>"),
}


def corpus() -> list[str]:
    """Prompts and completions of the bundled HumanEval files, in file order."""
    texts = []
    for path in CORPUS_FILES:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    texts += [rec["prompt"], rec["completion"]]
    return texts


def make_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"make_tiny_tokenizer: vocab_size must be >= {MIN_VOCAB} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<extra_{i}>" for i in range(missing)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False, "model_max_length": 1024}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def make_family_tokenizer(base_dir: Path, out_dir: Path, family: str) -> Path:
    """A copy of the tiny tokenizer with the family's special tokens added and its template in the config."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    specials, plain, bos, eos = CHAT_FAMILIES[family]
    tok = Backend.from_file(str(base_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out_dir
