"""Converters (issue 3, Llama): HF -> ours -> HF bitwise, resharding on load (TP=1 -> TP=2 / PP=2,
TP=2xPP=2 -> TP=1), LoRA at TP=2 -> HF PEFT with logits equal to peft's, and clear errors (API and CLIs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import hf_logits, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
SEQ = 12

TINY = {
    # sharded HF files (index.json); MHA; untied
    "mha_sharded": dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2),
    # GQA 8:2, tied embeddings, 4 layers (PP=2 puts 2 on each stage; the last holds the embedding copy)
    "gqa_tied": dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4, tie_word_embeddings=True),
    # GQA 4:2 untied, rope_theta and eps not the defaults
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, rope_theta=500000.0,
                       rms_norm_eps=1e-5),
}


def _tiny_hf(name: str, seed: int):
    return tiny_llama(seed, **TINY[name])


_logits = hf_logits


def _read_all(hf_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _cli(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "converters" / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT),
                          env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


# -- fixtures: tiny HF models, converted once (in one spawned process) --------------------------------------

def _convert_worker(jobs):
    """HF -> ours (-> HF) for each job, through the CLI modules' convert() (single process, TP=1)."""
    from converters import ckpt_to_hf, hf_to_ckpt

    out = {}
    for name, hf_dir, ckpt_dir, back_dir, shard_size in jobs:
        r1 = hf_to_ckpt.convert(hf_dir, ckpt_dir, progress=False)
        r2 = ckpt_to_hf.convert(ckpt_dir, back_dir, max_shard_size=shard_size, progress=False)
        out[name] = (r1, r2)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("conv")
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out, jobs = {}, []
    for seed, name in enumerate(TINY):
        model = _tiny_hf(name, seed)
        hf = root / name / "hf"
        model.save_pretrained(hf, max_shard_size="40KB" if "sharded" in name else "1GB")
        for f in Path(tiny_tokenizer_dir).iterdir():  # an HF dir carries its tokenizer
            shutil.copy2(f, hf / f.name)
        ckpt, back = root / name / "ckpt", root / name / "back"
        jobs.append((name, str(hf), str(ckpt), str(back), "60KB" if name == "gqa_untied" else "5GB"))
        out[name] = dict(hf=str(hf), ckpt=str(ckpt), back=str(back), tokens=tokens, logits=_logits(model, tokens))
    assert (root / "mha_sharded" / "hf" / "model.safetensors.index.json").is_file()
    reports = run_distributed(_convert_worker, 1, jobs, timeout=150)[0]
    for name in out:
        out[name]["reports"] = reports[name]
    return out


# -- 1. round trip -----------------------------------------------------------------------------------------

@pytest.mark.timeout(200)
def test_roundtrip_hf_ours_hf_is_bitwise(cases):
    from transformers import AutoModelForCausalLM

    from framework.checkpoint import ckpt_format
    from framework.data.tokenizer import Tokenizer

    for name, c in cases.items():
        a, b = _read_all(c["hf"]), _read_all(c["back"])
        assert sorted(a) == sorted(b), (name, sorted(set(a) ^ set(b)))
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (name, k)
            assert torch.equal(a[k], b[k]), (name, k)
        (r1, r2) = c["reports"]
        assert r1["tensors"] == len(a) and r2["tensors"] == len(b), (name, r1, r2)
        assert r2["bytes"] == sum(t.numel() * t.element_size() for t in b.values())
        # the sharded export wrote an index; the tokenizer travelled HF -> ours -> HF and loads offline
        if name == "gqa_untied":
            assert (Path(c["back"]) / "model.safetensors.index.json").is_file()
            assert len(r2["files"]) > 1
        tok_dir = ckpt_format.tokenizer_dir(c["ckpt"])
        assert tok_dir is not None and (tok_dir / "tokenizer.json").is_file()
        Tokenizer.from_dir(tok_dir)
        assert (Path(c["back"]) / "tokenizer.json").read_bytes() == (Path(c["hf"]) / "tokenizer.json").read_bytes()
        meta = ckpt_format.read_config(c["ckpt"])
        assert meta["family"] == "llama" and meta["hf_dtype"] == "float32"
    # transformers loads the exported directory and gives the original logits
    c = cases["gqa_tied"]
    model = AutoModelForCausalLM.from_pretrained(c["back"], dtype=torch.float32).eval()
    assert torch.equal(_logits(model, c["tokens"]), c["logits"])


# -- 2. resharding on load -----------------------------------------------------------------------------------

def _load_logits_worker(tp, pp, items, export_root=None):
    from framework.checkpoint.ckpt_format import load_checkpoint_into, model_config_of
    from framework.checkpoint.hf_export import export_hf
    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=pp)
    diffs = {}
    for name, ckpt, tokens, expected in items:
        cfg = model_config_of(ckpt)
        gpt = build_gpt(cfg, tp=tp, pp=pp)
        load_checkpoint_into(gpt, ckpt, cfg)
        gpt.eval()
        diffs[name] = (forward_logits(gpt, tokens) - expected).abs().max().item()
        if export_root is not None:  # gather TP shards / PP stages back into HF tensors
            export_hf(gpt, f"{export_root}/{name}", cfg, max_shard_bytes=50_000)
    return diffs


def _items(cases, names, key="ckpt"):
    return [(n, cases[n][key], cases[n]["tokens"], cases[n]["logits"]) for n in names]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp,pp", [pytest.param(2, 1, id="tp2"), pytest.param(1, 2, id="pp2")])
def test_tp1_checkpoint_loads_at_other_layouts(cases, tp, pp, tmp_path):
    results = run_distributed(_load_logits_worker, tp * pp, tp, pp, _items(cases, TINY), str(tmp_path),
                              timeout=140)
    for rank, diffs in enumerate(results):
        for name, d in diffs.items():
            assert d < TOL, f"rank {rank} {name}: max |logit diff| {d:.3g}"
    for name, c in cases.items():  # and the HF export from this layout is bitwise the original
        a, b = _read_all(c["hf"]), _read_all(tmp_path / name)
        assert sorted(a) == sorted(b), (name, sorted(set(a) ^ set(b)))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.timeout(200)
def test_tp2_pp2_checkpoint_loads_at_tp1(cases, tmp_path):
    from converters import hf_to_ckpt

    c = cases["gqa_tied"]
    ckpt = tmp_path / "tp2pp2"
    hf_to_ckpt.convert(c["hf"], ckpt, tp=2, pp=2, progress=False)  # 4 spawned ranks write the shards
    diffs = run_distributed(_load_logits_worker, 1, 1, 1,
                            [("tp2pp2", str(ckpt), c["tokens"], c["logits"])], timeout=100)[0]
    assert diffs["tp2pp2"] < TOL, diffs


@pytest.mark.timeout(150)
def test_tp1_checkpoint_loads_at_tp4(cases):
    results = run_distributed(_load_logits_worker, 4, 4, 1, _items(cases, ["mha_sharded"]), timeout=140)
    for rank, diffs in enumerate(results):
        assert diffs["mha_sharded"] < TOL, (rank, diffs)


def _bf16_roundtrip_worker(hf_dir, ckpt_dir, back_dir):
    from converters import ckpt_to_hf, hf_to_ckpt

    hf_to_ckpt.convert(hf_dir, ckpt_dir, progress=False)
    return ckpt_to_hf.convert(ckpt_dir, back_dir, progress=False)


@pytest.mark.timeout(120)
def test_bf16_roundtrip_keeps_dtype(tmp_path):
    model = _tiny_hf("gqa_untied", 7).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    run_distributed(_bf16_roundtrip_worker, 1, str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "back"),
                    timeout=100)
    a, b = _read_all(tmp_path / "hf"), _read_all(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# -- 3. LoRA at TP=2 -> HF PEFT -------------------------------------------------------------------------------

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": True, "targets": ["qkv", "proj", "fc1", "fc2"]}


def _lora_worker(ckpt, tokens, adapter_dir):
    from megatron.core import parallel_state as ps

    from framework.checkpoint.adapter import save_adapter
    from framework.checkpoint.ckpt_format import load_checkpoint_into, model_config_of
    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.peft.lora import TARGETS, apply_lora, lora_modules
    from framework.runtime.distributed import initialize

    initialize(tp=2, pp=1)
    cfg = model_config_of(ckpt)
    gpt = build_gpt(cfg, tp=2)
    apply_lora(gpt, targets=LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"], rslora=LORA["rslora"], seed=3)
    load_checkpoint_into(gpt, ckpt, cfg)  # base weights into a LoRA-wrapped model
    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():  # a trained-looking B: sharded (column) factors differ per rank, replicated ones not
        for layer, target, mod in lora_modules(gpt):
            sharded = mod.parallel_mode == "column"
            seed = 1000 * layer + list(TARGETS).index(target) + (7919 * tp_rank if sharded else 0)
            g = torch.Generator().manual_seed(seed)
            mod.lora_B.weight.copy_(0.05 * torch.randn(mod.lora_B.weight.shape, generator=g))
    gpt.eval()
    logits = forward_logits(gpt, tokens)
    save_adapter(gpt, adapter_dir, dict(LORA), cfg, base={"name": "tiny-gqa-untied"})
    return logits


@pytest.mark.timeout(200)
def test_lora_tp2_exports_to_peft(cases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from converters import adapter_to_hf

    c = cases["gqa_untied"]
    adapter, peft_dir = tmp_path / "adapter", tmp_path / "peft"
    ours = run_distributed(_lora_worker, 2, c["ckpt"], c["tokens"], str(adapter), timeout=150)
    assert torch.equal(ours[0], ours[1])
    adapter_to_hf.main([str(adapter), str(peft_dir), "--base-model", c["hf"], "--no-progress"])
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is True
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(c["hf"], dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    theirs = _logits(model, c["tokens"])
    diff = (theirs - ours[0]).abs().max().item()
    assert diff < TOL, diff
    assert (theirs - c["logits"]).abs().max().item() > 1e-2  # the adapter does change the logits


# -- 4. errors -----------------------------------------------------------------------------------------------

def _errors_worker(variants, good_ckpt):
    from megatron.core import dist_checkpointing

    from framework.checkpoint import ckpt_format
    from framework.checkpoint.ckpt_format import CheckpointError, load_checkpoint_into, model_config_of
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize

    initialize()
    cfg = model_config_of(good_ckpt)
    # a checkpoint whose weights lack one tensor (written through dist_checkpointing, config.yaml consistent)
    missing = variants["missing_tensor"]
    gpt = build_gpt(cfg)
    sd = ckpt_format.base_sharded_state_dict(gpt)
    for i in range(cfg.num_layers):  # megatron stacks a weight of all layers into one tensor
        sd.pop(f"decoder.layers.{i}.mlp.linear_fc2.weight")
    shutil.rmtree(Path(missing) / "weights")
    (Path(missing) / "weights").mkdir()
    dist_checkpointing.save(sd, str(Path(missing) / "weights"))
    import yaml

    meta = yaml.safe_load((Path(missing) / "config.yaml").read_text())
    meta["weights_files"] = ckpt_format._file_sizes(Path(missing) / "weights")
    meta["weights_sha256"] = {n: ckpt_format._sha256(Path(missing) / "weights" / n) for n in meta["weights_files"]}
    (Path(missing) / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))

    errors = {}
    for name, d in variants.items():
        try:
            load_checkpoint_into(build_gpt(cfg), d, cfg)
            errors[name] = None
        except CheckpointError as e:
            errors[name] = str(e)
    return errors


@pytest.mark.timeout(150)
def test_bad_checkpoints_give_clear_errors(cases, tmp_path):
    import yaml

    good = Path(cases["gqa_untied"]["ckpt"])

    def variant(name, edit=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit:
            edit(d)
        return str(d)

    def truncate(d):
        f = d / "weights" / "__0_0.distcp"
        f.write_bytes(f.read_bytes()[:1000])

    def corrupt(d):
        f = d / "weights" / "__0_1.distcp"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))

    def mismatch(d):
        meta = yaml.safe_load((d / "config.yaml").read_text())
        meta["model"]["num_layers"] = 3
        meta["model"]["ffn_hidden_size"] = 96
        (d / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))

    variants = {
        "truncated": variant("truncated", truncate),
        "corrupted": variant("corrupted", corrupt),
        "deleted": variant("deleted", lambda d: (d / "weights" / "__0_1.distcp").unlink()),
        "no_weights": variant("no_weights", lambda d: shutil.rmtree(d / "weights")),
        "mismatch": variant("mismatch", mismatch),
        "missing_tensor": variant("missing_tensor"),
    }
    errors = run_distributed(_errors_worker, 1, variants, str(good), timeout=140)[0]
    assert "__0_0.distcp" in errors["truncated"] and "truncated" in errors["truncated"], errors["truncated"]
    assert "__0_1.distcp" in errors["corrupted"] and "corrupted" in errors["corrupted"], errors["corrupted"]
    assert "__0_1.distcp" in errors["deleted"] and "missing" in errors["deleted"], errors["deleted"]
    assert "weights" in errors["no_weights"] and "missing" in errors["no_weights"], errors["no_weights"]
    assert "num_layers" in errors["mismatch"] and "ffn_hidden_size" in errors["mismatch"], errors["mismatch"]
    msg = errors["missing_tensor"]
    assert "decoder.layers.mlp.linear_fc2.weight" in msg and "decoder.layers.0.mlp.linear_fc2.weight" in msg, msg
    assert "missing" in msg, msg


@pytest.mark.timeout(150)
def test_cli_help_and_errors(cases, tmp_path):
    from safetensors.torch import load_file, save_file

    for script, option in (("hf_to_ckpt.py", "--tp"), ("ckpt_to_hf.py", "--max-shard-size"),
                           ("adapter_to_hf.py", "--base-model")):
        r = _cli(script, "--help")
        assert r.returncode == 0 and option in r.stdout and "--force" in r.stdout, (script, r.stdout, r.stderr)

    def one_error_line(r):
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, r.stderr
        return lines[0]

    # HF dir missing a tensor
    c = cases["gqa_untied"]
    bad_hf = tmp_path / "bad_hf"
    shutil.copytree(c["hf"], bad_hf)
    state = load_file(str(bad_hf / "model.safetensors"))
    state.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(state, str(bad_hf / "model.safetensors"), metadata={"format": "pt"})
    line = one_error_line(_cli("hf_to_ckpt.py", str(bad_hf), str(tmp_path / "out1"), "--no-progress"))
    assert "model.layers.1.self_attn.k_proj.weight" in line and "missing" in line, line
    assert not (tmp_path / "out1").exists()

    # truncated checkpoint
    bad_ckpt = tmp_path / "bad_ckpt"
    shutil.copytree(c["ckpt"], bad_ckpt)
    f = bad_ckpt / "weights" / "__0_1.distcp"
    f.write_bytes(f.read_bytes()[:-10])
    line = one_error_line(_cli("ckpt_to_hf.py", str(bad_ckpt), str(tmp_path / "out2"), "--no-progress"))
    assert "__0_1.distcp" in line and "truncated" in line, line
    assert not (tmp_path / "out2").exists()

    # adapter lacking one tensor (made from a valid adapter.yaml; B zero is fine for this)
    from framework.checkpoint.adapter import expected_shapes
    from framework.checkpoint.ckpt_format import model_config_of

    cfg = model_config_of(c["ckpt"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shapes = expected_shapes(cfg, ["qkv", "fc2"], 2)
    tensors = {k: torch.zeros(s) for k, s in shapes.items() if k != "model.layers.0.mlp.down_proj.lora_B.weight"}
    save_file(tensors, str(adapter / "adapter.safetensors"))
    import yaml

    (adapter / "adapter.yaml").write_text(yaml.safe_dump({
        "format_version": 1, "method": "lora", "rank": 2, "alpha": 4.0, "dropout": 0.0, "rslora": False,
        "targets": ["qkv", "fc2"], "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"], "base": {},
        "model": cfg.to_dict()}))
    line = one_error_line(_cli("adapter_to_hf.py", str(adapter), str(tmp_path / "out3"), "--no-progress"))
    assert "model.layers.0.mlp.down_proj.lora_B.weight" in line, line
    assert not (tmp_path / "out3").exists()
