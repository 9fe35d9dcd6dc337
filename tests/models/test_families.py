"""Every decoder-only family against transformers, from one table (issue 3).

Each row of ``FAMILIES`` names a family's tiny random HF models (tests/family_models.py: norms and biases
randomised) in the shapes that matter to it, and every family gives the same proof
(tests/family_cases.py): our model loaded from each HF checkpoint gives the HF model's logits within
``TOL`` at TP=1, TP=2 with sequence parallelism and PP=2 (odd layer counts: uneven stages; Llama also at
TP=2 without SP and with one micro-batch per sample); HF -> our checkpoint -> HF is bitwise and
transformers loads the result; config values we do not implement are refused naming the key. Further
columns: the config.json an export must write, LoRA against HF PEFT forward and backward at TP=2+SP
(families whose HF modules are not Llama's: GPT-2's Conv1D, Falcon's fused query_key_value), and the
fine-tuning job training a family. Checks that only one family has (Gemma's scaled embeddings and
(1 + w) norm, Mistral's sliding window, GPTBigCode's multi-query layouts, Falcon's parallel block in a
job, Llama's two RoPE config formats and the real SmolLM2-135M) follow the table. T5, an encoder-decoder
whose logits need encoder and decoder inputs, is proved in tests/models/test_t5.py.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from framework.runtime.errors import ConfigError
from launch.spawn import run_distributed
from tests.family_cases import SEQ, TOL, check_parity, check_roundtrip, logits_of, save_cases, tokens_for
from tests.family_models import TINY, TINY_JOB_SHAPE, hf_config, hf_model, job_learns
from tests.real_model import require_smollm2
from tests.sft_jobs import compose, run_sft

WINDOW = 5  # Mistral's sliding window in the tiny models, < SEQ, so the window changes the logits
DROP = object()  # a refusal's change that removes the key


@dataclass(frozen=True)
class Refusal:
    """``change`` applied to the family's HF config must raise ``error`` matching ``match``, through the
    family's own ``config_from_hf`` (``via="family"``) or the registry's, which dispatches on model_type."""
    change: dict
    match: str
    via: str = "registry"
    error: type = ValueError


@dataclass(frozen=True)
class LoraCheck:
    """LoRA on ``case`` against HF PEFT at TP=2+SP: HF PEFT's target_modules, the HF layer prefix, and our
    module -> (HF module, transform of LoRA A, of LoRA B); Conv1D or not, PEFT's A is [r, in], B [out, r]."""
    case: str
    targets: list
    hf_layer: str
    layout: dict
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class Family:
    cases: dict                  # case name -> (seed, HF config values over the tiny shape)
    shard_one: str               # the case saved in several files with an index
    layouts: tuple = ("tp1", "tp2-sp", "pp2")
    refusal_base: dict | None = None  # the HF config the refusals change (None: the tiny shape's own)
    refusals: tuple = ()
    exported: dict = field(default_factory=dict)  # case -> values the exported config.json must hold
    lora: LoraCheck | None = None


# name -> (TP, PP, SP, micro-batch size: None = the whole batch)
LAYOUTS = {"tp1": (1, 1, False, None), "tp2": (2, 1, False, None), "tp2-sp": (2, 1, True, None),
           "pp2": (1, 2, False, None),
           # sequence parallel and one micro-batch per sample: the other p2p/gather paths of forward_logits
           "tp2-sp-mbs1": (2, 1, True, 1)}

LLAMA_HF = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 256}
MIXTRAL_HF = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 256, "num_local_experts": 4}
GEMMA_HF = {"model_type": "gemma", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}
MISTRAL_HF = {"model_type": "mistral", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4}

FAMILIES = {
    "llama": Family(
        # GQA ratios 1, 3 and 4; heads * head_dim != hidden in the last one. (transformers requires
        # hidden % heads == 0, so the 3:1 model is 96 wide.)
        cases={"mha_4x4": (0, dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)),
               "gqa_6x2_sharded": (1, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                           num_hidden_layers=2, rope_theta=500000.0, rms_norm_eps=1e-5)),
               "gqa_8x2_tied": (2, dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                                        tie_word_embeddings=True))},
        shard_one="gqa_6x2_sharded", layouts=("tp1", "tp2", "pp2", "tp2-sp-mbs1"), refusal_base=LLAMA_HF,
        refusals=(Refusal({"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rope_scaling", "family"),
                  # llama3 scaling without its keys
                  Refusal({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor", "family"),
                  Refusal({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
                          "rope_parameters", "family"),
                  Refusal({"attention_bias": True}, "attention_bias", "family"),
                  Refusal({"mlp_bias": True}, "mlp_bias", "family"),
                  Refusal({"hidden_act": "gelu"}, "hidden_act", "family"),
                  Refusal({"model_type": "gpt2"}, "model_type", "family"))),
    "qwen2": Family(  # q/k/v biases
        cases={"gqa_4x2": (0, dict(num_attention_heads=4, num_key_value_heads=2)),  # 2 query heads per KV head
               "gqa_8x2_tied": (1, dict(num_attention_heads=8, num_key_value_heads=2,  # 4 per KV head, tied
                                        tie_word_embeddings=True, rope_theta=1e6))},
        shard_one="gqa_4x2"),
    "mistral": Family(  # a Llama with sliding-window attention
        cases={"gqa_4x2_w5": (0, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW)),
               "gqa_8x2_w3_tied": (1, dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=3,
                                           tie_word_embeddings=True, rope_theta=1e6)),
               "mqa_4x1_no_window": (2, dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None))},
        shard_one="gqa_4x2_w5", refusal_base=MISTRAL_HF,
        refusals=(Refusal({"sliding_window": 0}, "sliding_window=0"),
                  Refusal({"sliding_window": "4096"}, "sliding_window='4096'"),
                  Refusal({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                  Refusal({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
                  Refusal({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type='yarn'")),
        exported={"gqa_4x2_w5": {"model_type": "mistral", "sliding_window": WINDOW}}),
    "gemma": Family(  # scaled embeddings, GeGLU, (1+w) RMSNorm in fp32, tied embeddings, head_dim != hidden/heads
        cases={"mqa_4x1_tied": (0, dict(num_attention_heads=4, num_key_value_heads=1,  # gemma-2b-like: MQA, tied,
                                        num_hidden_layers=3)),                      # 3 layers (uneven PP=2)
               "mha_4x4": (1, dict(num_attention_heads=4, num_key_value_heads=4,  # gemma-7b-like: multi-head
                                   num_hidden_layers=2, rope_theta=1e4)),
               "gqa_4x2_untied": (2, dict(num_attention_heads=4, num_key_value_heads=2,  # untied, GQA 2 per KV
                                          num_hidden_layers=2, tie_word_embeddings=False))},
        shard_one="mqa_4x1_tied", refusal_base=GEMMA_HF,
        refusals=(Refusal({"hidden_act": "silu"}, "hidden_act='silu'", "family"),
                  Refusal({"hidden_activation": "gelu_new"}, "hidden_activation='gelu_new'", "family"),
                  Refusal({"attention_bias": True}, "attention_bias", "family"),
                  Refusal({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
                          r"rope_parameters.rope_type='dynamic'", "family"),
                  Refusal({"model_type": "gemma2"}, "model_type='gemma2'", "family"),
                  # and the registry does not take gemma2 for gemma
                  Refusal({"model_type": "gemma2"}, "model_type='gemma2' is not supported", "registry", ConfigError)),
        exported={"mqa_4x1_tied": {"model_type": "gemma", "head_dim": 32, "tie_word_embeddings": True}}),
    "mixtral": Family(  # megatron-core MoE layers: router + SwiGLU experts, top-2 of 4
        cases={"gqa_4x2_3layers": (0, dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)),
               "mha_4x4_tied": (1, dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                        tie_word_embeddings=True, rope_theta=1e6))},
        shard_one="gqa_4x2_3layers", refusal_base=MIXTRAL_HF,
        refusals=(Refusal({"output_router_logits": True}, "output_router_logits", "family"),
                  Refusal({"output_router_logits": True, "num_local_experts": DROP}, "num_local_experts", "family"))),
    "gpt2": Family(  # learned positions, LayerNorm, GELU, Conv1D weights, packed c_attn, tied lm_head
        cases={"tied_gelu_new": (0, {}),  # GPT-2 as released
               "untied_gelu_inner96": (1, dict(tie_word_embeddings=False, activation_function="gelu", n_inner=96))},
        shard_one="tied_gelu_new",
        refusals=(Refusal({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
                  Refusal({"add_cross_attention": True}, "add_cross_attention"),
                  Refusal({"scale_attn_weights": False}, "scale_attn_weights"),
                  Refusal({"activation_function": "quick_gelu"}, "activation_function")),
        lora=LoraCheck("untied_gelu_inner96", ["c_attn", "c_proj", "c_fc"], "transformer.h.{i}.",
                       {"self_attention.linear_qkv": ("attn.c_attn", "replicate", "qkv_packed"),
                        "self_attention.linear_proj": ("attn.c_proj", "row", "replicate"),
                        "mlp.linear_fc1": ("mlp.c_fc", "replicate", "column"),
                        "mlp.linear_fc2": ("mlp.c_proj", "row", "replicate")}, fan_in_fan_out=True)),
    "gpt_bigcode": Family(  # StarCoder: GPT-2 with multi-query attention and nn.Linear weights
        # multi-query at TP=2: the KV head replicated on both ranks (framework/models/kv_replication.py)
        cases={"mqa_tied": (0, {}),  # StarCoder: 4 query heads, 1 KV head
               "mha_untied": (1, dict(multi_query=False, tie_word_embeddings=False, n_inner=96))},
        shard_one="mqa_tied",
        refusals=(Refusal({"add_cross_attention": True}, "add_cross_attention"),
                  Refusal({"scale_attn_weights": False}, "scale_attn_weights"),
                  Refusal({"activation_function": "silu"}, "activation_function"))),
    "starcoder2": Family(  # GQA + RoPE, LayerNorm with bias, non-gated GELU MLP, use_bias, sliding window
        cases={"gqa_4x2_bias_tied": (0, {}),  # 2 query heads per KV head
               "gqa_8x2_window8_untied": (1, dict(num_attention_heads=8, use_bias=False,  # 4 per KV head;
                                                  tie_word_embeddings=False, sliding_window=8)),  # 16 > window
               "mha_4x4": (2, dict(num_key_value_heads=4, num_hidden_layers=2,  # 1 per KV head
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e5}))},
        shard_one="gqa_4x2_bias_tied",
        refusals=(Refusal({"hidden_act": "silu"}, "hidden_act"), Refusal({"sliding_window": 0}, "sliding_window"),
                  Refusal({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
                          "rope_parameters"))),
    "nemotron": Family(  # LayerNorm1p, squared-ReLU MLP, partial RoPE, GQA
        cases={"gqa_4x2_half_rotary": (0, {}),  # as released: partial_rotary 0.5
               "gqa_8x2_quarter_rotary_bias_tied": (1, dict(num_attention_heads=8, partial_rotary_factor=0.25,
                                                            attention_bias=True, mlp_bias=True,
                                                            tie_word_embeddings=True)),  # 4 query heads per KV head
               "mha_4x4_full_rotary": (2, dict(num_key_value_heads=4, num_hidden_layers=2, partial_rotary_factor=1.0))},
        shard_one="gqa_4x2_half_rotary",
        # attention_bias without mlp_bias: megatron has one switch for all biases
        refusals=(Refusal({"attention_bias": True}, "attention_bias"), Refusal({"hidden_act": "silu"}, "hidden_act"),
                  Refusal({"partial_rotary_factor": 0.0, "rope_parameters": None}, "partial_rotary_factor"))),
    "falcon": Family(  # parallel attention/MLP block, multi-query or grouped attention, RoPE, LayerNorm, GELU
        # every layer shape: Falcon-7B (one shared norm, MQA; at TP=2 the KV head replicated), the new
        # architecture (ln_attn/ln_mlp or one norm, GQA), sequential
        cases={"mqa_7b_style": (0, {}),  # parallel block, one norm, 1 KV head, tied
               "gqa_8x2_two_norms_bias": (1, dict(new_decoder_architecture=True, num_attention_heads=8,  # Falcon-40B
                                                  num_kv_heads=2, bias=True, tie_word_embeddings=False)),  # style
               "gqa_4x2_one_norm": (2, dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                                            num_hidden_layers=2, ffn_hidden_size=96,
                                            activation="gelu_pytorch_tanh")),
               "mha_sequential_bias": (3, dict(multi_query=False, parallel_attn=False, bias=True,
                                               num_hidden_layers=2))},
        shard_one="gqa_8x2_two_norms_bias",
        refusals=(Refusal({"alibi": True}, "alibi"),
                  Refusal({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
                  Refusal({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
                  Refusal({"activation": "silu"}, "activation")),
        # query_key_value is megatron's fused layout
        lora=LoraCheck("gqa_8x2_two_norms_bias", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                       "transformer.h.{i}.",
                       {"self_attention.linear_qkv": ("self_attention.query_key_value", "replicate", "column"),
                        "self_attention.linear_proj": ("self_attention.dense", "row", "replicate"),
                        "mlp.linear_fc1": ("mlp.dense_h_to_4h", "replicate", "column"),
                        "mlp.linear_fc2": ("mlp.dense_4h_to_h", "row", "replicate")})),
}


def _params(rows):
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


PARITY = _params([(f"{name}-{layout}", name, *LAYOUTS[layout]) for name, f in FAMILIES.items() for layout in f.layouts])
REFUSALS = _params([(f"{name}-{next(iter(r.change))}-{i}", name, r) for name, f in FAMILIES.items()
                    for i, r in enumerate(f.refusals)])
LORA = [name for name, f in FAMILIES.items() if f.lora]


@pytest.fixture(scope="module")
def family_models():
    """family -> {case: the HF model}, built once per family on first use."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = {case: hf_model(name, seed, **shape) for case, (seed, shape) in FAMILIES[name].cases.items()}
        return built[name]

    return get


@pytest.fixture(scope="module")
def family_cases(family_models, tmp_path_factory):
    """family -> the saved cases [(name, hf_dir, tokens, HF logits)] (tests/family_cases.save_cases)."""
    saved = {}

    def get(name):
        if name not in saved:
            saved[name] = save_cases(tmp_path_factory.mktemp(name), family_models(name),
                                     shard_one=FAMILIES[name].shard_one)
        return saved[name]

    return get


def _hf_dir(cases, name):
    return next(hf_dir for case, hf_dir, *_ in cases if case == name)


# ---- the table ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,tp,pp,sp,micro_batch_size", PARITY)
def test_logits_match_transformers(family_cases, family, tp, pp, sp, micro_batch_size):
    check_parity(family_cases(family), tp, pp, sp, micro_batch_size=micro_batch_size)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_roundtrip_is_bitwise(family_cases, family, tmp_path):
    check_roundtrip(family_cases(family), tmp_path)
    for case, want in FAMILIES[family].exported.items():
        back = json.loads((tmp_path / f"{case}-back" / "config.json").read_text())
        assert {k: back.get(k) for k in want} == want, case
        assert all(type(back[k]) is type(v) for k, v in want.items()), case


@pytest.mark.parametrize("family,refusal", REFUSALS)
def test_unsupported_config_is_refused_by_key(family, refusal):
    from framework.models import registry

    base = FAMILIES[family].refusal_base or hf_config(family).to_dict()
    hf = {k: v for k, v in {**base, **refusal.change}.items() if v is not DROP}
    module = importlib.import_module(f"framework.models.families.{family}") if refusal.via == "family" else registry
    with pytest.raises(refusal.error, match=refusal.match):
        module.config_from_hf(hf)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", LORA)
def test_lora_matches_hf_peft_at_tp2_sp(family_cases, family):
    from tests.family_lora import check_lora_against_peft

    lora = FAMILIES[family].lora
    check_lora_against_peft(_hf_dir(family_cases(family), lora.case), lora.targets, lora.hf_layer, lora.layout,
                            tp=2, sp=True, fan_in_fan_out=lora.fan_in_fan_out)


# family -> (HF config values over TINY_JOB_SHAPE, the job's overrides: the arch fields that differ from
# tiny_llama's). Mistral's window (5) is shorter than its packed rows.
JOBS = {
    "gemma": (dict(tie_word_embeddings=True),
              ["model.arch.family=gemma", "model.arch.tie_word_embeddings=true", "+model.arch.activation=gelu_tanh",
               "+model.arch.zero_centered_gamma=true", "+model.arch.embedding_multiplier=8.0"]),
    "mistral": (dict(sliding_window=WINDOW),
                ["model.arch.family=mistral", f"+model.arch.sliding_window={WINDOW}", "data.packing=true",
                 "data.max_length=128", "trainer.global_batch_size=2"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", list(JOBS))
def test_job_trains_family(family, tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """The job loads the family's checkpoint (arch declared in the job config) and trains LoRA on it."""
    import transformers

    shape, overrides = JOBS[family]
    config_class, model_class, _tiny_shape = TINY[family]
    config = getattr(transformers, config_class)(**TINY_JOB_SHAPE, **shape)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    job_learns(model, tmp_path_factory.mktemp(f"tiny_{family}"), tmp_path, tiny_tokenizer_dir, *overrides)


# ---- Llama ---------------------------------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_llama_config_mapping_both_rope_formats():
    from framework.models.families import llama

    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 512}
    new = llama.config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    old = llama.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert new == old
    assert (new.ffn_hidden_size, new.num_layers, new.num_query_groups, new.kv_channels) == (96, 3, 2, 16)
    assert (new.rotary_base, new.norm_eps, new.tie_word_embeddings, new.vocab_size) == (5e5, 1e-5, True, 300)
    assert new.max_position_embeddings == 512


@pytest.fixture(scope="module")
def smollm2_case():
    """The real SmolLM2-135M-Instruct on two natural texts of SEQ tokens, with transformers' logits."""
    require_smollm2()
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from framework.checkpoint import hub

    hf_dir = hub.smollm2_dir()
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    texts = ["The capital of France is Paris, and the capital of Italy is Rome. Both cities are old.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints five, of course"]
    tokens = torch.tensor([tok.encode(t).ids[:SEQ] for t in texts])
    assert tokens.shape == (2, SEQ)
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    expected = logits_of(model, tokens)
    del model
    return [("smollm2_135m", str(hf_dir), tokens, expected)]


@pytest.mark.real_model
@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp,pp", [pytest.param(1, 1, id="tp1"), pytest.param(3, 1, id="tp3"),
                                   pytest.param(1, 2, id="pp2")])
def test_smollm2_logits_match_transformers(smollm2_case, tp, pp):
    check_parity(smollm2_case, tp, pp, timeout=200)


# ---- Mistral: the sliding window -----------------------------------------------------------------------------

def test_mistral_window_matters(family_models):
    """Non-vacuity: the same weights without the window give clearly different logits at SEQ tokens, and the
    first WINDOW positions (which see the whole prefix either way) stay the same."""
    model = family_models("mistral")["gqa_4x2_w5"]
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    windowed = logits_of(model, tokens)
    model.config.sliding_window = None
    try:
        full = logits_of(model, tokens)
    finally:
        model.config.sliding_window = WINDOW
    assert (windowed - full)[:, WINDOW:].abs().max() > 1e-2
    assert (windowed - full)[:, :WINDOW].abs().max() < 1e-5


def test_mistral_window_mask_is_transformers():
    """Our band (attention.window_allowed with Mistral's (w - 1, 0)) is transformers' sliding-window causal
    mask function, including the off-by-one (the query counts in the window), also with a KV-cache offset."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from framework.models.attention import window_allowed

    fn = sliding_window_causal_mask_function(WINDOW)
    for sq, sk in ((SEQ, SEQ), (3, SEQ), (1, SEQ)):
        ours = window_allowed(sq, sk, WINDOW - 1, 0)
        zero = torch.tensor(0)
        ref = fn(zero, zero, torch.arange(sq)[:, None] + (sk - sq), torch.arange(sk)[None, :])
        assert torch.equal(ours, ref), (sq, sk)


def _packed_worker(tp, sp, hf_dir, row):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf
    from framework.models.vocab_parallel import gather_vocab_parallel
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, sp=sp)
    cfg = config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
    model = build_model(cfg, tp=tp, pp=1, sp=sp)
    load_hf_into_gpt(model, hf_dir, cfg)
    model.eval()
    with torch.no_grad():
        return gather_vocab_parallel(model(row["tokens"], row["position_ids"], row["attention_mask"])).float()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_mistral_window_applies_per_sample_in_packed_rows(family_models, family_cases, tp, sp):
    """Two samples (7 and 9 positions, both longer than the window) packed into one row of SEQ with the
    block-diagonal mask of framework/data/packing.py: each sample's logits equal transformers' on that
    sample alone."""
    from framework.data.packing import collate_packed
    from framework.data.sample import Sample

    name = "gqa_4x2_w5"
    hf_dir = _hf_dir(family_cases("mistral"), name)
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randint(3, 256, (n,), generator=g).tolist() for n in (8, 10))
    row = collate_packed([[Sample(a, [1] * len(a)), Sample(b, [1] * len(b))]], pad_id=0, seq_length=SEQ)
    results = run_distributed(_packed_worker, tp, tp, sp, hf_dir, row, timeout=200)
    model = family_models("mistral")[name]
    ref_a = logits_of(model, torch.tensor([a[:-1]]))[0]
    ref_b = logits_of(model, torch.tensor([b[:-1]]))[0]
    for logits in results:
        assert (logits[0, :7] - ref_a).abs().max() < TOL
        assert (logits[0, 7:16] - ref_b).abs().max() < TOL


def test_mistral_config_maps_window_and_back():
    from framework.models.families import mistral
    from framework.models.registry import config_from_hf

    cfg = config_from_hf(MISTRAL_HF)
    assert cfg.family == "mistral" and cfg.sliding_window == 4 and cfg.num_query_groups == 2
    assert config_from_hf(mistral.hf_config(cfg)) == cfg
    assert config_from_hf({**MISTRAL_HF, "sliding_window": None}).sliding_window is None


# ---- Gemma: scaled embeddings, GeGLU, the (1 + w) norm ----------------------------------------------------

def test_gemma_config():
    """What the HF config implies: sqrt(hidden) embedding scale, GeGLU, zero-centred norm, head_dim, ties."""
    from framework.models.families import gemma
    from framework.models.registry import config_from_hf

    hf = hf_model("gemma", 0, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=1).config.to_dict()
    cfg = config_from_hf(hf)
    assert (cfg.family, cfg.kv_channels, cfg.num_query_groups, cfg.activation) == ("gemma", 32, 1, "gelu_tanh")
    assert cfg.embedding_multiplier == 8.0 and cfg.zero_centered_gamma and cfg.tie_word_embeddings
    assert cfg.gated_linear_unit and cfg.norm_eps == 1e-6
    assert config_from_hf(gemma.hf_config(cfg)) == cfg
    # The released config.json files say hidden_act "gelu": transformers runs the tanh approximation.
    assert config_from_hf({**hf, "hidden_act": "gelu"}).activation == "gelu_tanh"


def test_gemma_norm_and_embedding_scale_are_transformers():
    """Our RMSNorm with zero_centered_gamma is HF's GemmaRMSNorm bitwise (fp32 and bf16 input), and the
    embedding multiplier is HF's scale in the hidden dtype (bf16: sqrt(3072) -> 55.5)."""
    import types

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm, GemmaTextScaledWordEmbedding

    from framework.models.gpt import scale_embeddings
    from framework.models.norms import RMSNorm

    ref = GemmaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(-0.3, 0.3)
    ours = RMSNorm(types.SimpleNamespace(layernorm_zero_centered_gamma=True, params_dtype=torch.float32,
                                         sequence_parallel=False), 64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ours(x.to(dtype)), ref(x.to(dtype))), dtype
    for hidden, dtype in ((3072, torch.bfloat16), (64, torch.float32), (2048, torch.float32)):
        emb = GemmaTextScaledWordEmbedding(10, hidden, 0, embed_scale=hidden ** 0.5).to(dtype)
        plain = torch.nn.Embedding(10, hidden).to(dtype)
        plain.weight.data.copy_(emb.weight.data)
        scale_embeddings(plain, float(hidden) ** 0.5)
        ids = torch.arange(10)[None]
        assert torch.equal(plain(ids), emb(ids)), (hidden, dtype)


def test_gemma_embedding_scale_matters(family_models):
    """Non-vacuity: without the embedding scale HF's logits move far beyond the tolerance, so the parity test
    checks it (the (1 + w) norm is checked the same way by the randomised norm weights around 0)."""
    model = family_models("gemma")["mqa_4x1_tied"]
    tokens = tokens_for(256)
    ref = logits_of(model, tokens)
    embed = model.model.embed_tokens
    scale = embed.embed_scale.clone()
    embed.embed_scale.fill_(1.0)
    try:
        no_scale = logits_of(model, tokens)
    finally:
        embed.embed_scale.copy_(scale)
    assert (no_scale - ref).abs().max() > 1e-2


def test_gemma_geglu_activation_is_transformers():
    """With tiny random weights the gate values are small, where tanh-GELU and erf-GELU agree to ~1e-7, so
    logit parity cannot tell them apart; the activation itself is checked here: bitwise HF's
    gelu_pytorch_tanh, and measurably not the exact GELU."""
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    from framework.models.gpt import activation

    x = torch.linspace(-6, 6, 2001)
    assert torch.equal(activation("gelu_tanh")(x), ACT2FN["gelu_pytorch_tanh"](x))
    assert (activation("gelu_tanh")(x) - F.gelu(x)).abs().max() > 1e-4


# ---- GPTBigCode: multi-query layouts -------------------------------------------------------------------------

def test_gpt_bigcode_multi_query_takes_tp2_and_refuses_tp3_by_key():
    from framework.models.layout import LayoutError, check_layout
    from framework.models.registry import config_from_hf

    cfg = config_from_hf(hf_config("gpt_bigcode").to_dict())
    assert cfg.num_query_groups == 1
    check_layout(cfg, tp=2, pp=1)
    check_layout(cfg, tp=4, pp=1)
    with pytest.raises(LayoutError, match=r"parallel\.tensor=3 does not divide the model's 4 query heads"):
        check_layout(cfg, tp=3, pp=1)


# ---- Falcon: the parallel block in the job ----------------------------------------------------------------

def _falcon_job(hf_dir, tokenizer_dir, out, *overrides):
    """The fine-tuning job (LoRA on qkv/proj/fc1/fc2) on the tiny Falcon in ``hf_dir``; model.arch is the
    checkpoint's own (the job checks it against config.json)."""
    from omegaconf import OmegaConf

    from framework.models.registry import config_from_hf

    cfg = compose(["model=tiny_llama", "model.source=hf", f"model.path={hf_dir}", f"model.tokenizer={tokenizer_dir}",
                   "data.max_length=64", "trainer.max_steps=2", "trainer.global_batch_size=4",
                   "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                   "trainer.lr=5e-3", "generate.max_new_tokens=0", f"output_dir={out}", *overrides])
    arch = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text())).to_dict()
    OmegaConf.set_struct(cfg, False)
    cfg.model.arch = OmegaConf.create(arch)
    return cfg


@pytest.mark.timeout(400)
def test_falcon_job_tp2_sp_matches_single_process(tiny_tokenizer_dir, tmp_path):
    """The training job on a Falcon-40B style model (parallel block, ln_attn/ln_mlp, GQA, biases): TP=2 with
    sequence parallelism gives the single process's losses."""
    hf_dir = tmp_path / "hf"
    hf_model("falcon", 4, vocab_size=512, max_position_embeddings=1024, new_decoder_architecture=True,
             num_attention_heads=8, num_kv_heads=2, bias=True).save_pretrained(hf_dir)
    single = run_distributed(run_sft, 1, _falcon_job(hf_dir, tiny_tokenizer_dir, tmp_path / "single"), timeout=300)[0]
    tp2 = run_distributed(run_sft, 2, _falcon_job(hf_dir, tiny_tokenizer_dir, tmp_path / "tp2", "parallel.tensor=2",
                                                  "parallel.sequence=true"), timeout=300)[0]
    (losses, before, after, _), (ref_losses, ref_before, ref_after, _) = tp2, single
    assert before == pytest.approx(ref_before, rel=1e-5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert after == pytest.approx(ref_after, rel=1e-5)
    assert after < before
