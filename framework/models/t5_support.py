"""What the jobs do for an encoder-decoder model (T5), and what they refuse, each refusal naming its key.

Supported: ``peft=lora`` (targets qkv, proj, fc1, fc2 on both stacks; cross_q, cross_kv, cross_proj on the
decoder's cross-attention) and full fine-tuning (``peft=none``), at any TP (with or without SP) and DP;
generation and evaluation with such an adapter or weights. Refused: pipeline parallelism
(framework/models/t5.py), other PEFT methods, LoRA on the embedding or output layer, chat data and packing
(framework/data/seq2seq.py), DPO, fp8 (T5 runs on the local layer spec, not Transformer Engine's).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from framework.models.t5 import check_t5
from framework.runtime.errors import ConfigError

#: PEFT methods the T5 jobs support (none: full fine-tuning)
T5_METHODS = ("lora", "none")
#: LoRA targets of a T5 (framework/peft/wrapping.py: layer targets on both stacks, cross-attention targets)
T5_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "cross_q", "cross_kv", "cross_proj")


def job_problems(cfg, model_cfg) -> list[str]:
    """What a fine-tuning config asks of an encoder-decoder model that the job does not do (each names its key)."""
    problems = []
    try:
        check_t5(model_cfg, int(cfg.parallel.pipeline))
    except ConfigError as e:
        problems += [line.strip()[2:] for line in str(e).splitlines()[1:]]
    method = cfg.peft.method
    if method not in T5_METHODS:
        problems.append(f"peft.method={method!r} is not supported for encoder-decoder models (T5) yet; use "
                        f"peft=lora or peft=none (full fine-tuning)")
    elif method == "lora":
        other = [t for t in (cfg.peft.get("targets") or []) if t not in T5_LORA_TARGETS]
        if other:
            problems.append(f"peft.targets: {other} are not supported for T5 (the shared embedding feeds both "
                            f"stacks); T5 LoRA targets: {list(T5_LORA_TARGETS)}")
    if "dpo" in cfg:
        problems.append("DPO (launch/dpo.py) is not supported for encoder-decoder models (T5)")
    if OmegaConf.select(cfg, "precision") == "fp8":
        problems.append("precision=fp8 is not supported for T5 (it runs on the local layer spec, not Transformer "
                        "Engine's); use precision=bf16")
    return problems
