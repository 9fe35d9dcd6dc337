"""The job engine runs a task it has never seen: a toy task defined here, not in the library.

The toy's "data" are rows of random tokens drawn from each item's index, its loss is the mean next-token
loss over every position (no masks, no data files), its validation a forward-only pass over four fixed
rows, and it keeps a file of its own in every checkpoint. Through the unchanged engine it trains with
checkpoints, pauses (trainer.steps_per_run) and resumes; the resumed run's per-step losses and the
validation and per-step records it kept must equal an uninterrupted run's bitwise (LoRA dropout on, so the
restored RNG matters), and a run that has finished returns its summary without training again.
"""

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.sft_jobs import DROPOUT, ROOT, adapter_tensors, job_cfg

ROW = 16  # positions of a toy row


@dataclasses.dataclass
class ToyResult:
    steps: int
    losses: list
    history: list
    val_before: dict
    val_after: dict | None
    status: str
    trained_dir: str | None
    resumed_from: str | None


class ToyTask:
    """Next-token loss over every position of random rows; the rows of item i come from seed i."""
    name, unit, result_type = "toy", "rows", ToyResult
    log = logging.getLogger("tests.toy_task")

    def prepare(self, cfg, world_size):
        from framework.training.job_config import validate

        self.cfg = cfg
        model_cfg = validate(cfg, world_size)
        self.vocab = min(model_cfg.vocab_size, 256)
        return model_cfg

    def setup(self, job):
        self.rt, self.model, self.device = job.rt, job.model, next(job.model.parameters()).device
        self.saves_seen = 0
        return 12  # items in the batch order: three global batches of 4 per epoch

    def _rows(self, items):
        rows = []
        for i in items:
            g = torch.Generator().manual_seed(1000 + i)
            rows.append(torch.randint(0, self.vocab, (ROW + 1,), generator=g))
        t = torch.stack(rows)
        return {"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": torch.arange(ROW).expand(len(items), ROW)}

    def batch(self, indices):
        from megatron.core import parallel_state as ps

        from framework.data.batching import micro_batches

        mine = micro_batches(indices, ps.get_data_parallel_rank(), self.rt.dp, int(self.cfg.trainer.micro_batch_size))
        return [self._rows(mb) for mb in mine]

    def forward_step(self, data_iterator, model):
        from framework.models.kinds import model_loss

        batch = {k: v.to(self.device) for k, v in next(data_iterator).items()}
        per_token = model_loss(model, batch)

        def loss_func(output):
            total = output.float().sum()
            n = torch.tensor(output.numel(), dtype=torch.int, device=output.device)
            return total, n, {"toy": torch.stack([total.detach().double(), n.double()])}

        return per_token, loss_func

    def _reduce(self, reduced):
        import torch.distributed as dist

        t = torch.zeros(2, dtype=torch.float64, device=self.device)
        for r in reduced:
            t += r["toy"].to(t)
        dist.all_reduce(t)
        return (t[0] / t[1]).item()

    def train_report(self, reduced):
        from framework.training.engine import Report

        loss = self._reduce(reduced)
        return Report(loss, f"loss {loss:.6f}", {"train/toy_loss": loss}, count=int(self.cfg.trainer.global_batch_size),
                      record={"toy_loss": loss})

    def validate(self):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from framework.training.engine import Report

        batch = self._rows([100, 101, 102, 103])
        was_training = self.model.training
        self.model.eval()
        reduced = get_forward_backward_func()(forward_step_func=self.forward_step, data_iterator=iter([batch]),
                                              model=[self.model], num_microbatches=1, seq_length=ROW,
                                              micro_batch_size=4, forward_only=True)
        self.model.train(was_training)
        loss = self._reduce(reduced)
        return Report(loss, f"loss {loss:.6f}", {"val/toy_loss": loss}, record={"toy_loss": loss})

    def save(self, directory):
        self.saves_seen += 1
        if torch.distributed.get_rank() == 0:
            (Path(directory) / "toy.json").write_text(json.dumps({"saves_seen": self.saves_seen}))

    def before_training(self, loop):
        loop.extra["toy_started"] = True

    def after_training(self, job):
        if job.rt.is_main:
            (job.output_dir / "toy_done").write_text("done")

    def result(self, o):
        loop = o.loop
        return ToyResult(steps=loop.step, losses=loop.losses, history=loop.extra["history"],
                         val_before=loop.extra["val_before"], val_after=loop.extra.get("val_after"),
                         status=o.status, trained_dir=o.trained_dir, resumed_from=o.resumed_from)

    def summary(self, result, rt):
        return f"toy: {result.steps} steps, {result.status}"


def _job(cfg):
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training import engine

    setup_logging("WARNING")
    return engine.run(cfg, ToyTask())


@pytest.mark.timeout(600)
def test_a_new_task_trains_pauses_and_resumes_exactly(tiny_tokenizer_dir, tmp_path):
    def cfg(out, *extra):  # 6 steps of 4 rows in micro-batches of 1, validation and a checkpoint every 2
        return job_cfg(tiny_tokenizer_dir, out, DROPOUT, *extra)

    whole = run_distributed(_job, 1, cfg(tmp_path / "whole"), timeout=250)[0]
    assert whole.status == "completed" and whole.steps == 6 and len(whole.losses) == 6
    assert [h["toy_loss"] for h in whole.history] == whole.losses
    assert whole.val_after is not None and whole.val_after != whole.val_before
    assert whole.losses[-1] < whole.losses[0]  # the toy loss is actually being optimised

    out = tmp_path / "paused"
    first = run_distributed(_job, 1, cfg(out, "trainer.steps_per_run=4"), timeout=250)[0]
    assert first.status == "paused" and first.steps == 4 and first.trained_dir is None
    assert not (out / "toy_done").exists() and not (out / "summary.json").exists()
    assert json.loads((out / "checkpoints" / "step-000004" / "toy.json").read_text()) == {"saves_seen": 2}
    rest = run_distributed(_job, 1, cfg(out, "trainer.steps_per_run=4"), timeout=250)[0]
    assert rest.status == "completed" and rest.resumed_from.endswith("step-000004")
    # bitwise: the same floats in the same order, the task's own records included
    assert rest.losses == whole.losses
    assert rest.history == whole.history
    assert rest.val_before == whole.val_before and rest.val_after == whole.val_after
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "toy_done").read_text() == "done"

    again = run_distributed(_job, 1, cfg(out), timeout=250)[0]  # finished: read back from summary.json
    assert isinstance(again, ToyResult) and again.losses == whole.losses and again.status == "completed"
