"""Megatron-native fine-tuning: PEFT and SFT on megatron-core, parallel from a laptop to a cluster."""

__version__ = "0.1.0"
