"""Tests of framework/checkpoint: adapters, archives, streaming conversion, HF PEFT adapters both ways."""
