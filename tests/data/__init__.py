"""Tests of framework/data: records, tokenizer, chat templates, the tokenise-once cache, packing, preference pairs."""
