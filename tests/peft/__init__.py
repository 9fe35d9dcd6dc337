"""Tests of framework/peft: every method against HF PEFT, the LoRA layer, QLoRA, merging, parameter counts."""
