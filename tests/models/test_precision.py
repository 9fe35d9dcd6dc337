"""Precision and recompute settings (issue 6): fp8 is refused with the reason on a machine without TE on a
Hopper-class GPU; activation recomputation (selective, full) reaches megatron and leaves loss and gradients
unchanged."""

from __future__ import annotations

import pytest
import torch

from launch.spawn import run_distributed
from tests.sft_jobs import compose


def test_fp8_is_refused_without_te_and_hopper(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    if torch.cuda.is_available():
        pytest.skip("this check is about machines without an fp8-capable GPU")  # the GPU path is benchmarked
    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", "precision=fp8"])
    with pytest.raises(ConfigError, match="precision=fp8 needs Transformer Engine on a Hopper-class GPU, but "
                                          "this machine has no CUDA GPU; use precision=bf16"):
        validate(cfg, 1)
    bad = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", "trainer.recompute=some"])
    with pytest.raises(ConfigError, match="trainer.recompute='some'"):
        validate(bad, 1)


def test_fp8_settings_reach_the_transformer_config():
    from framework.models.precision import transformer_settings

    cfg = compose(["precision=fp8", "fp8.recipe=current", "trainer.recompute=full"])
    assert transformer_settings(cfg.precision, cfg.fp8, cfg.trainer, cfg.parallel) == dict(
        fp8="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _loss_and_grads(recompute: str, tp: int, method: str = "none"):
    from framework.models.precision import transformer_settings
    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    initialize(tp=tp, pp=1, seed=3)
    settings = transformer_settings(trainer=compose([f"trainer.recompute={recompute}"]).trainer)
    model = build_gpt(ModelConfig(num_layers=3, num_query_groups=2), tp=tp, **settings)
    if recompute != "none":
        assert model.config.recompute_granularity == recompute
    if method != "none":  # a frozen base: the adapters' gradients must flow through recomputed layers
        from framework.peft.registry import apply_peft
        from tests.hf_models import fill_trainable

        cfg = compose([f"peft={method}"])
        apply_peft(model, cfg.peft, ModelConfig(num_layers=3, num_query_groups=2))
        fill_trainable(model)
    ddp = wrap_ddp(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, 16)}
    loss, _ = forward_backward(ddp, [batch])
    grads = {n: p.main_grad.numpy().copy() for n, p in ddp.module.named_parameters() if p.requires_grad}
    return loss, grads


@pytest.mark.timeout(200)
@pytest.mark.parametrize("recompute,method", [("selective", "none"), ("full", "none"), ("full", "lora")])
def test_recompute_keeps_loss_and_gradients(recompute, method):
    ref = run_distributed(_loss_and_grads, 2, "none", 2, method, timeout=150)
    got = run_distributed(_loss_and_grads, 2, recompute, 2, method, timeout=150)
    for (l0, g0), (l1, g1) in zip(ref, got):
        assert l1 == pytest.approx(l0, rel=1e-6)
        assert all(abs(g).max() > 0 for g in g0.values())
        for n in g0:
            torch.testing.assert_close(torch.from_numpy(g1[n]), torch.from_numpy(g0[n]), rtol=1e-5, atol=1e-6, msg=n)
