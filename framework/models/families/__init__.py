"""One module per model family: its HF config mapping, its weight table and the HF shapes it implies.

Each module exposes ``HF_MODEL_TYPES``, ``config_from_hf(dict) -> ModelConfig``,
``hf_config(ModelConfig, dtype) -> dict`` (config.json for the export), ``hf_shapes(ModelConfig)`` (every
HF tensor name with its shape, in HF order), ``WEIGHTS`` (framework/models/weight_table.py rules) and
``IGNORED`` ((HF name pattern, None | 'tied' | 'untied') of tensors that carry no weights of ours), and
optionally ``weights_for(ModelConfig)`` when the table depends on the config (T5's plain vs gated MLP).
framework/models/registry.py lists them.
"""
