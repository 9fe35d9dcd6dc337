"""The fine-tuning job as the tests run it: its Hydra config composed from conf/, a tiny job on the tiny
random Llama, the job run in a (spawned) process, and what a run directory holds afterwards.

Two kinds of tiny job: ``tiny_job`` fine-tunes an HF checkpoint (tests/hf_models.save_tiny_job_llama) and
``job_cfg`` a random model that validates and checkpoints every two steps (the resume tests). Both use the
512-token test tokenizer (tests/tokenizer_fixture.py). ``ROOT`` is the repository: conf/ and the data paths
in it are relative to it.
"""

import os
from pathlib import Path

from launch.spawn import run_distributed
from tests.job_process import capture_messages

ROOT = str(Path(__file__).resolve().parent.parent)

# The resume tests' job length; LoRA dropout makes the losses depend on the RNG streams, so restoring them is
# part of what a resume proves.
STEPS = 6
DROPOUT = "peft.dropout=0.1"


def compose(overrides):
    """The fine-tuning job's config (conf/finetune.yaml) with ``overrides``, as the command line composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return hydra_compose(config_name="finetune", overrides=overrides)


def tiny_job(tiny_hf, tiny_tokenizer_dir, out, *extra):
    """Three LoRA steps on the HF checkpoint ``tiny_hf``, five validation samples, no completions."""
    return compose(["model=tiny_llama", "model.source=hf", f"model.path={tiny_hf}",
                    f"model.tokenizer={tiny_tokenizer_dir}", "data.max_length=64", "trainer.max_steps=3",
                    "trainer.global_batch_size=4", "trainer.micro_batch_size=1", "trainer.eval_samples=5",
                    "trainer.eval_interval=100", "trainer.lr=5e-3", "generate.max_new_tokens=0",
                    f"output_dir={out}", *extra])


def run_sft(cfg):
    """Run the job in this (spawned) process: (train losses, validation loss before, after, adapter dir)."""
    os.chdir(ROOT)  # data paths in conf/ are relative to the repository root
    from framework.runtime.logs import setup_logging
    from framework.training.finetune import run

    setup_logging("WARNING")
    r = run(cfg)
    return r.train_losses, r.val_loss_before, r.val_loss_after, r.adapter_dir


def evaluate_adapter(cfg, adapter_dir):
    """The validation loss of ``cfg``'s model with the saved adapter ``adapter_dir`` loaded, in this process."""
    os.chdir(ROOT)
    from framework.training.sft import evaluate_adapter as evaluate

    return evaluate(cfg, adapter_dir)


def job_cfg(tokenizer_dir, out, *extra):
    """STEPS steps on a random tiny Llama, validating and checkpointing every two steps, keeping two."""
    return compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tokenizer_dir}",
                    "data.max_length=64", f"trainer.max_steps={STEPS}", "trainer.global_batch_size=4",
                    "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=2",
                    "trainer.save_interval=2", "trainer.keep_last=2", "trainer.lr=5e-3", "trainer.warmup_steps=1",
                    "generate.max_new_tokens=0", f"output_dir={out}", *extra])


def job_in_process(cfg, scripted_validation=None):
    """Run the job in this (spawned) process; returns (RunResult, warning-and-above messages of the job).
    ``scripted_validation``: the losses successive validations return instead of measuring."""
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training import finetune, sft

    setup_logging("WARNING")
    messages = capture_messages("framework.finetune")
    if scripted_validation is not None:
        def scripted_validator(*_args, **_kwargs):  # each validation returns the next scripted loss
            losses = iter(scripted_validation)
            return lambda: next(losses)

        sft._validator = scripted_validator
    return finetune.run(cfg), messages


def run_job(cfg, world=1, **kwargs):
    """``job_in_process`` in ``world`` spawned ranks; rank 0's (RunResult, messages)."""
    return run_distributed(job_in_process, world, cfg, timeout=200, **kwargs)[0]


def adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapters" / "default" / "adapter.safetensors"))


def assert_same_adapter(a_dir, b_dir, atol):
    a, b = adapter_tensors(a_dir), adapter_tensors(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= atol, k


def checkpoint_steps(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in (Path(run_dir) / "checkpoints").glob("step-*"))


def pointer(run_dir, name):
    return (Path(run_dir) / "checkpoints" / name).read_text().strip()


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
