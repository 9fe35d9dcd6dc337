"""A job's model: this rank's stage built at the run's layout, its pretrained weights loaded, PEFT applied.

The weights come from ``model.source`` (framework/checkpoint/hub.py): our checkpoint format (``ckpt``,
resharded to this layout by megatron dist_checkpointing), a Hugging Face directory (``hf``, ``smollm2``),
or none (``random``: the family's initialisation). Training, DPO's frozen reference, generation and
evaluation all build their model here, so a model loads the same way in every job. A job with ``head: score``
(a reward model) gets a score head in place of the LM head (framework/models/score_head.py), read from an HF
sequence-classification checkpoint when it has one (framework/checkpoint/score_head.py), and always trained.
"""

from __future__ import annotations

import torch

from framework.checkpoint import hub
from framework.checkpoint.ckpt_format import load_checkpoint_into
from framework.checkpoint.hf_import import load_hf_into_gpt
from framework.checkpoint.score_head import load_hf_score_model
from framework.models.precision import transformer_settings
from framework.models.registry import get_family
from framework.models.score_head import install_score_head, score_head_of
from framework.peft.registry import apply_peft


def build_pretrained(cfg, model_cfg, rt):
    """This rank's stage of the model with pretrained weights (or random for source=random), PEFT applied
    (``cfg.peft``), on ``rt``'s layout; bf16 parameters on a GPU for precision bf16/fp8, else fp32."""
    on_gpu = rt.device.type == "cuda"
    dtype = torch.bfloat16 if cfg.precision in ("bf16", "fp8") and on_gpu else torch.float32
    model = get_family(model_cfg.family).build(model_cfg, rt.tp, rt.pp, rt.sp, params_dtype=dtype,
                                               **transformer_settings(cfg.precision, cfg.get("fp8"),
                                                                    cfg.get("trainer"), cfg.get("parallel")))
    score = cfg.get("head", "lm") == "score"
    if score and cfg.model.source != "ckpt":
        install_score_head(model, model_cfg.init_method_std, seed=cfg.get("seed", 0))
    if cfg.model.source == "ckpt":  # our format: dist_checkpointing reshards to this layout
        load_checkpoint_into(model, hub.model_dir(cfg.model), model_cfg)
        if score:  # our checkpoints are language models: the head starts fresh
            install_score_head(model, model_cfg.init_method_std, seed=cfg.get("seed", 0))
    elif cfg.model.source != "random":
        (load_hf_score_model if score else load_hf_into_gpt)(model, hub.model_dir(cfg.model), model_cfg)
    apply_peft(model, cfg.peft, model_cfg, encode_text=hub.text_encoder(cfg.peft))
    if score and score_head_of(model) is not None:  # PEFT froze the base; the head is trained with any method
        score_head_of(model).weight.requires_grad_(True)
    return model
