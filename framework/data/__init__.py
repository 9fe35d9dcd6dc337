"""SFT data: files -> validated records -> token ids + loss mask -> batches.

- ``errors``: ``DataError`` (file:line: message), ``TokenizerError``
- ``tokenizer``: ``Tokenizer.from_dir`` over the ``tokenizers`` library
- ``jsonl``: line-by-line JSONL reading with exact error locations
- ``prompt_completion``: the prompt/completion format, sample building and the truncation rule
- ``chat``: the OpenAI ``messages`` format (tools, tool calls): checks, rendering with the model's chat
  template, loss masks on assistant turns, dropping of earliest exchanges to fit
- ``chat_template``: Jinja rendering identical to transformers' ``apply_chat_template``
- ``sample``: ``Sample(input_ids, loss_mask)``
- ``report``: ``FileReport`` counts (kept / truncated / dropped by reason, tokens) and its table
- ``prepare``: ``prepare(paths, tokenizer, max_length, truncation_side, data_format, loss_on)`` and
  ``prepare_config(data_cfg, tokenizer, seed)`` (train, validation file or split, test), shared by training
  and ``launch/prepare_data.py``
- ``cache``: the tokenise-once cache, memory-mapped ``CachedSamples`` keyed by data, tokenizer and options
- ``views``: ``Subset`` / ``Padded`` sequences over samples and the seeded validation ``holdout_split``
- ``batching``: ``collate``, ``BatchOrder``, ``micro_batches``
"""
