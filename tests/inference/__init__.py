"""Tests of framework/inference: generation and evaluation against transformers and HF PEFT."""
