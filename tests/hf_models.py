"""Tiny random Hugging Face Llama models: the reference every parity and conversion test compares with; and
seeded non-zero values for the trainable (adapter) tensors of a model, ours or HF PEFT's."""

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


def save_tiny_job_llama(path):
    """The tiny random Llama the job tests fine-tune: vocabulary 512 to fit the tiny test tokenizer, 4 layers,
    GQA 4:2, saved in Hugging Face format at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return path


@torch.no_grad()
def fill_trainable(model, seed: int = 2, scale: float = 0.05):
    """Give every trainable parameter (the LoRA factors) seeded non-zero values, so that B != 0 and the
    gradients of A are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def fill_adapter(model, seed: int, share=lambda name: name) -> None:
    """Seeded non-zero values for the trainable adapter tensors: IA3 vectors around 1, DoRA magnitudes
    perturbed around their initial norms, everything else 0.1 N(0, 1). Names that ``share`` maps to one key
    get one draw (HF's q/k/v A factors standing for our fused one). The same draw on every TP rank keeps
    replicated tensors equal."""
    g = torch.Generator().manual_seed(seed)
    shared = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=g)
        if "ia3_" in name:
            p.copy_(1 + 0.3 * noise)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * noise)
        else:
            p.copy_(shared.setdefault(share(name), 0.1 * noise))
