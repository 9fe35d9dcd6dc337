"""Tests of framework/models: every family against transformers, layouts, KV replication, RoPE scaling, precision."""
