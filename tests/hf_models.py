"""Tiny random Hugging Face Llama models: the reference every parity and conversion test compares with."""

import torch


def tiny_llama(seed: int, **shape):
    """A seeded LlamaForCausalLM (hidden 64 unless given, head_dim 16, vocab 256) in fp32 eval mode, with
    its norm weights randomised too (they are ones at init, which would hide a misplaced norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 64, **shape}
    cfg = LlamaConfig(intermediate_size=128, head_dim=16, vocab_size=256, max_position_embeddings=128, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def hf_logits(model, tokens):
    return model(input_ids=tokens).logits.float()
