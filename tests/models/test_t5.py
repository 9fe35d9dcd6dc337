"""T5 (encoder-decoder, relative position bias): logits equal transformers' at TP=1, TP=2 and TP=2+SP;
HF -> ours -> HF bitwise (also exported at TP=2); configs that do not fit are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.family_cases import TOL, randomized, read_tensors

ENC, DEC = 24, 16  # encoder positions beyond relative_attention_max_distance=20 land in the last bucket


def _t5(seed: int, untie: bool = False, **shape):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=256, d_model=64, d_ff=96, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, tie_word_embeddings=not untie, **shape)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    if untie:  # transformers 5 ties lm_head to shared whatever the config says; v1.1 checkpoints have their own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * 0.05)
    return randomized(model, seed)


def _inputs(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, ENC, dtype=torch.long)
    mask[1, ENC - 7:] = 0  # a padded encoder row: hidden from encoder self- and decoder cross-attention
    return {"input_ids": torch.randint(0, vocab, (2, ENC), generator=g), "attention_mask": mask,
            "decoder_input_ids": torch.randint(0, vocab, (2, DEC), generator=g)}


@torch.no_grad()
def _hf_logits(model, inputs):
    return model(**inputs).logits.float()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    models = {
        # t5 v1.0: ReLU MLP, tied embeddings with the decoder output scaled by d_model ** -0.5
        "v1_0_tied_relu": _t5(0, num_layers=3, num_decoder_layers=2, num_heads=4, d_kv=16,
                              feed_forward_proj="relu"),
        # t5 v1.1 / flan-t5: gated GELU (tanh), separate lm_head; d_kv * heads = 96 != d_model = 64
        "v1_1_untied_gated": _t5(1, untie=True, num_layers=2, num_decoder_layers=3, num_heads=4, d_kv=24,
                                 feed_forward_proj="gated-gelu"),
    }
    out = []
    for k, (name, model) in enumerate(models.items()):
        model.save_pretrained(root / name, max_shard_size="40KB" if k == 0 else "2GB")
        inputs = _inputs(model.config.vocab_size, k)
        out.append((name, str(root / name), inputs, _hf_logits(model, inputs)))
    assert (root / "v1_0_tied_relu" / "model.safetensors.index.json").is_file()
    return out


def _parity_worker(tp: int, sp: bool, cases):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf
    from framework.models.t5 import t5_logits
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, sp=sp)
    diffs = {}
    for name, hf_dir, inputs, expected in cases:
        cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
        model = build_model(cfg, tp=tp, sp=sp)
        load_hf_into_gpt(model, hf_dir, cfg)
        model.eval()
        with torch.no_grad():
            logits = t5_logits(model, inputs["input_ids"], inputs["decoder_input_ids"], inputs["attention_mask"])
        assert logits.shape == expected.shape, (name, tuple(logits.shape), tuple(expected.shape))
        diffs[name] = (logits - expected).abs().max().item()
    return diffs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_t5_logits_match_transformers(cases, tp, sp):
    from launch.spawn import run_distributed

    results = run_distributed(_parity_worker, tp, tp, sp, cases, timeout=250)
    for rank, diffs in enumerate(results):
        for name, diff in diffs.items():
            assert diff < TOL, f"TP={tp} SP={sp} rank {rank}, {name}: max |logit diff| {diff:.3g} >= {TOL}"


def _export_worker(jobs):
    from framework.checkpoint.ckpt_format import load_checkpoint_into, model_config_of
    from framework.checkpoint.hf_export import export_hf
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    initialize(tp=2, pp=1)
    for ckpt_dir, out_dir in jobs:
        cfg = model_config_of(ckpt_dir)
        model = build_model(cfg, tp=2)
        load_checkpoint_into(model, ckpt_dir, cfg)
        export_hf(model, out_dir, cfg)
    return True


@pytest.mark.timeout(400)
def test_t5_roundtrip_is_bitwise(cases, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from launch.spawn import run_distributed
    from tests.family_cases import check_roundtrip

    check_roundtrip(cases, tmp_path, auto_class=AutoModelForSeq2SeqLM, logits=_hf_logits)
    # Our checkpoint (written at TP=1) loaded at TP=2 and exported: the inverse transforms over two shards.
    jobs = [(str(tmp_path / f"{name}-ckpt"), str(tmp_path / f"{name}-tp2")) for name, *_ in cases]
    run_distributed(_export_worker, 2, jobs, timeout=250)
    for (name, hf_dir, *_), (_, back) in zip(cases, jobs):
        a, b = read_tensors(hf_dir), read_tensors(back)
        assert sorted(a) == sorted(b), (name, sorted(set(a) ^ set(b)))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_t5_bad_configs_are_refused(cases, tmp_path):
    from converters import hf_to_ckpt
    from framework.checkpoint.hf_import import HFImportError
    from framework.runtime.errors import ConfigError
    from framework.models.registry import build_model, config_from_hf

    v10, v11 = Path(cases[0][1]), Path(cases[1][1])
    hf = json.loads((v11 / "config.json").read_text())
    cfg = config_from_hf(hf)
    assert (cfg.family, cfg.num_layers, cfg.num_decoder_layers, cfg.kv_channels) == ("t5", 2, 3, 24)
    assert (cfg.activation, cfg.gated_linear_unit, cfg.tie_word_embeddings) == ("gelu_tanh", True, False)

    with pytest.raises(ConfigError, match=r"parallel.pipeline=2.*not supported for the encoder-decoder"):
        build_model(cfg, tp=1, pp=2)  # refused before any process group is needed
    with pytest.raises(ValueError, match="feed_forward_proj='gated-swish-x'"):
        config_from_hf({**hf, "feed_forward_proj": "gated-swish-x"})
    with pytest.raises(ValueError, match="activation 'tanh' is not implemented"):
        config_from_hf({**hf, "feed_forward_proj": "tanh"})

    # config.json and weights disagree: a layer fewer than the file holds, in the deeper and the other stack
    shallow = _edit_config(v11, tmp_path / "shallow", num_decoder_layers=2)
    with pytest.raises(HFImportError, match=r"'decoder\.block\.2\..*' belongs to layer 2, but the model has 2"):
        hf_to_ckpt.convert(shallow, tmp_path / "out1", progress=False)
    shallow = _edit_config(v11, tmp_path / "shallow_encoder", num_layers=1)
    with pytest.raises(HFImportError, match=r"'encoder\.block\.1\..*' .* not expected by config.json"):
        hf_to_ckpt.convert(shallow, tmp_path / "out1", progress=False)
    # a plain MLP in the config, gated weights in the file
    plain = _edit_config(v11, tmp_path / "plain", feed_forward_proj="gelu_new")
    with pytest.raises(HFImportError, match=r"wi_0.weight' in .* is not a t5 weight"):
        hf_to_ckpt.convert(plain, tmp_path / "out2", progress=False)
    # transformers 5's tied-but-unscaled T5 (no released model is): read as untied, its lm_head is missing
    unscaled = _edit_config(v10, tmp_path / "unscaled", scale_decoder_outputs=False)
    with pytest.raises(HFImportError, match=r"\['lm_head.weight'\] missing"):
        hf_to_ckpt.convert(unscaled, tmp_path / "out3", progress=False)
    assert not any((tmp_path / f"out{k}").exists() for k in (1, 2, 3))
