"""Parameter-efficient fine-tuning: one module per method, each wrapping megatron layers in place."""

from framework.peft.lora import TARGETS, LoRALinear, apply_lora, lora_modules, trainable_parameters

__all__ = ["TARGETS", "LoRALinear", "apply_lora", "lora_modules", "trainable_parameters"]
