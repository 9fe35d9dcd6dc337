"""ReLoRA (framework/peft/relora.py) against its paper's algorithm as written here: after every merge the
base is the first base plus the sum of the merged deltas; new factors are a fresh LoRA draw with B = 0; the
optimizer's moments are magnitude-pruned as the paper's code prunes them; the learning rate follows the
paper's jagged schedule over the run's cosine. Then: TP=2+SP trains the same run as TP=1, and a run paused
between restarts resumes to the uninterrupted run's losses bitwise.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import save_tiny_job_llama
from tests.sft_jobs import ROOT, tiny_job
from tests.tolerances import FORWARD_REL

MERGE_EVERY, WARMUP, RATIO = 2, 2, 0.5
RELORA = ["peft=relora", f"peft.merge_every={MERGE_EVERY}", f"peft.restart_warmup_steps={WARMUP}",
          "peft.reset=prune", f"peft.prune_ratio={RATIO}", "trainer.max_steps=6", "trainer.warmup_steps=1",
          "trainer.min_lr=1e-4", "trainer.save_interval=2"]


def relora_job(tiny_hf, tokenizer_dir, out, *extra):
    """Six ReLoRA steps (restarts after 2, 4 and 6) on the tiny HF Llama, a checkpoint every two."""
    return tiny_job(tiny_hf, tokenizer_dir, out, *RELORA, *extra)


def paper_magnitude_pruning_(tensor, prune_ratio):
    """The ReLoRA paper's code (relora/training_utils.py, ``magnitude_pruning_``)."""
    tensor_magnitude = torch.abs(tensor)
    threshold = torch.quantile(tensor_magnitude.flatten().to(dtype=torch.float32), prune_ratio).to(dtype=tensor.dtype)
    mask = tensor_magnitude > threshold
    tensor.mul_(mask.to(dtype=tensor.dtype))


def paper_lr(current_step, *, lr, min_lr, first_warmup_steps, num_training_steps, restart_every,
             restart_warmup_steps):
    """The paper's ``get_cosine_schedule_with_multiple_warmups`` (0-based ``current_step``), over the cosine
    our runs use (megatron's: linear warm-up from 0, cosine from lr to min_lr)."""
    def cosine(n):
        if n <= first_warmup_steps:
            return lr * n / first_warmup_steps
        progress = (n - first_warmup_steps) / (num_training_steps - first_warmup_steps)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    restart_step, restart_number = current_step % restart_every, current_step // restart_every
    if restart_step < restart_warmup_steps and current_step >= restart_every:
        end_of_warmup = restart_number * restart_every + restart_warmup_steps
        return restart_step / max(1, restart_warmup_steps) * cosine(end_of_warmup)
    return cosine(current_step)


def _recorded_run(cfg):
    """The job in this process with ReLoRA's restarts observed: the base before training, and per restart
    the deltas merged, the bases after, the new factors, the optimizer's moments before and after; the
    learning rate of every step."""
    os.chdir(ROOT)
    from framework.peft import relora
    from framework.runtime.logs import setup_logging
    from framework.training import finetune

    setup_logging("WARNING")
    record = {"restarts": [], "lrs": {}}
    key = lambda layer: (layer.layer_number, layer.target)  # noqa: E731
    init, restart, after_step = relora.Restarts.__init__, relora.Restarts.restart, relora.Restarts.after_step

    def moments(self):
        inners = [o.optimizer for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        return [{k: inner.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "step") if k in inner.state[p]}
                for inner in inners for g in inner.param_groups for p in g["params"]]

    def observed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        record["initial"] = {key(m): m.base_layer.weight.detach().clone() for m in self.layers}
        record["lrs"][1] = self.optimizer.param_groups[0]["lr"]

    def observed_restart(self, number):
        before = {"deltas": {key(m): m.delta_weight().detach().clone() for m in self.layers},
                  "A": {key(m): m.lora_A.weight.detach().clone() for m in self.layers}, "moments": moments(self)}
        restart(self, number)
        record["restarts"].append(before | {
            "number": number, "bases": {key(m): m.base_layer.weight.detach().clone() for m in self.layers},
            "new_A": {key(m): m.lora_A.weight.detach().clone() for m in self.layers},
            "new_B": {key(m): m.lora_B.weight.detach().clone() for m in self.layers},
            "moments_after": moments(self)})

    def observed_after_step(self, step):
        restarted = after_step(self, step)
        record["lrs"][step + 1] = self.optimizer.param_groups[0]["lr"]
        return restarted

    relora.Restarts.__init__, relora.Restarts.restart = observed_init, observed_restart
    relora.Restarts.after_step = observed_after_step
    result = finetune.run(cfg)
    return result.train_losses, _map_tensors(record, lambda t: t.numpy())  # arrays: no shared-memory handles


def _map_tensors(obj, fn):
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, (torch.Tensor, np.ndarray)) else obj


def _run(cfg):
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training import finetune

    setup_logging("WARNING")
    r = finetune.run(cfg)
    return r.train_losses, r.val_loss_after, r.status


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def single(tiny_hf, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("relora-tp1")
    cfg = relora_job(tiny_hf, tiny_tokenizer_dir, out)
    losses, record = run_distributed(_recorded_run, 1, cfg, timeout=200)[0]
    return cfg, out, losses, _map_tensors(record, torch.from_numpy)


@pytest.mark.timeout(300)
def test_restarts_follow_the_papers_algorithm(single):
    from framework.peft.relora import restart_seed
    from framework.peft.wrapping import seeded_generator

    cfg, out, losses, record = single
    steps = cfg.trainer.max_steps
    assert [r["number"] for r in record["restarts"]] == [1, 2, 3]  # after steps 2, 4, 6
    merged = {k: w.clone() for k, w in record["initial"].items()}
    for r in record["restarts"]:
        for k in merged:
            merged[k] += r["deltas"][k]
            assert r["deltas"][k].abs().max() > 0, k  # the cycle trained something to merge
            assert (r["bases"][k] - merged[k]).abs().max().item() <= 1e-6, (r["number"], k)
            # a fresh LoRA draw (kaiming-uniform, a=sqrt(5): bound 1/sqrt(fan_in)), B = 0
            new_a = r["new_A"][k]
            fresh = torch.empty_like(new_a)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5),
                                           generator=seeded_generator(restart_seed(cfg.seed, *k, r["number"])))
            assert torch.equal(new_a, fresh) and not torch.equal(new_a, r["A"][k]), k
            assert new_a.abs().max() <= 1 / math.sqrt(new_a.shape[1])
            assert torch.count_nonzero(r["new_B"][k]) == 0
        for old, new in zip(r["moments"], r["moments_after"]):
            for name in ("exp_avg", "exp_avg_sq"):
                expected = old[name].clone()
                paper_magnitude_pruning_(expected, RATIO)
                assert torch.equal(new[name], expected), name
                assert torch.count_nonzero(new[name]) <= math.ceil((1 - RATIO) * new[name].numel())
            assert torch.equal(new["step"], old["step"])  # Adam's step count kept, as the paper's code does
    expected_lrs = [paper_lr(s - 1, lr=cfg.trainer.lr, min_lr=cfg.trainer.min_lr, first_warmup_steps=1,
                             num_training_steps=steps, restart_every=MERGE_EVERY, restart_warmup_steps=WARMUP)
                    for s in range(1, steps + 1)]
    assert [record["lrs"][s] for s in range(1, steps + 1)] == pytest.approx(expected_lrs, rel=1e-12, abs=1e-15)
    assert record["lrs"][3] == 0.0 and record["lrs"][4] > 0  # the first step after a restart: lr 0, as the paper's
    assert (out / "weights" / "base").is_dir() and (out / "weights" / "adapter" / "adapter.yaml").is_file()


@pytest.mark.timeout(400)
def test_tp2_trains_the_run_of_tp1_and_a_paused_run_resumes_bitwise(single, tiny_hf, tiny_tokenizer_dir, tmp_path):
    cfg, _out, losses, _record = single
    tp2 = run_distributed(_run, 2, relora_job(tiny_hf, tiny_tokenizer_dir, tmp_path / "tp2", "parallel.tensor=2",
                                              "parallel.sequence=true"), timeout=300)[0]
    assert tp2[0] == pytest.approx(losses, rel=FORWARD_REL)

    # paused after step 3 (a restart at step 2, in its warm-up), then resumed: the merged base, the adapter,
    # the pruned moments and the jagged schedule come back from the checkpoint
    paused = relora_job(tiny_hf, tiny_tokenizer_dir, tmp_path / "resumed", "trainer.steps_per_run=3")
    first = run_distributed(_run, 1, paused, timeout=200)[0]
    assert first[2] == "paused" and first[0] == losses[:3]
    second = run_distributed(_run, 1, paused, timeout=200)[0]
    assert second[0] == losses and second[2] == "completed"
    assert second[1] == pytest.approx(tp2[1], rel=FORWARD_REL)  # the same trained model at TP=1 and TP=2+SP


def _merge(argv):
    os.chdir(ROOT)
    from launch.merge import main

    return main(argv)


@pytest.mark.timeout(300)
def test_merge_of_a_relora_run_starts_from_its_merged_base(single, tmp_path):
    """``mft merge RUN`` of a ReLoRA run merges its last adapter into the base its restarts merged into (the
    last restart was at the last step, so the adapter adds nothing: the HF weights are that base's)."""
    from safetensors.torch import load_file

    _cfg, out, _losses, record = single
    assert run_distributed(_merge, 1, [str(out), "--to", "hf", "--out", str(tmp_path / "hf"), "--dtype", "float32",
                                       "--no-progress"], timeout=200)[0] == 0
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    final, initial = record["restarts"][-1]["bases"], record["initial"]
    for (layer, target), weight in final.items():
        if target == "proj":  # o_proj: the same layout in both (no fused rows)
            hf = merged[f"model.layers.{layer - 1}.self_attn.o_proj.weight"]
            assert torch.equal(hf, weight) and not torch.equal(hf, initial[(layer, target)]), layer
