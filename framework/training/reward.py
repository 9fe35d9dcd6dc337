"""Reward-model training: the Bradley-Terry loss on preference pairs and one step over megatron-core's schedule.

Notation, per pair i of a global batch of n pairs: ``rc`` / ``rr`` the score of the chosen / rejected sequence
(the score head's output at the sequence's last token, framework/models/score_head.py), ``m`` the pair's margin
(the record's optional ``"margin"``, 0 without), ``c`` = reward.center_rewards_coefficient (null: no term),
``ls`` = log sigmoid::

    loss      = (1/n) sum_i [ -ls(rc_i - rr_i - m_i) + c (rc_i + rr_i)^2 ]
    accuracy  = (1/n) sum_i [rc_i > rr_i]          margin = (1/n) sum_i (rc_i - rr_i)

Bradley-Terry (Ouyang et al. 2022) with Llama 2's margin (Touvron et al. 2023) and the centring term of
Eisenstein et al. 2023, exactly TRL's ``RewardTrainer.compute_loss`` (a mean over pairs, the centring term
a mean over pairs as well); a batch without margins is TRL's margin-free loss. Scores are also reported as
the mean of chosen and rejected and the mean and standard deviation of all 2n scores.

Sequences (framework/data/preference.py's pairs): every token of a row is input, unshifted, so the last
token (the eos, or the chat template's end-of-turn) is scored; rows are right-padded and the score is read
at each row's last real token by its length, not by searching for a padding id (transformers' sequence
classifiers search for the last token that is not ``pad_token_id``: the same token whenever the padding id
does not end a sequence). Gradients are normalised by the global number of pairs through megatron's
per-token loss normalisation (the loss function returns the sum over its pairs and their number).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from framework.models.score_head import last_positions
from framework.training.step import _autocast


@dataclasses.dataclass(frozen=True)
class RewardOptions:
    center_rewards_coefficient: float | None = None

    @classmethod
    def from_config(cls, node) -> "RewardOptions":
        c = None if node is None else node.get("center_rewards_coefficient")
        return cls(None if c is None else float(c))


def options_problems(node) -> list[str]:
    """Problems with the ``reward`` node (before any process group)."""
    if node is None:
        return []
    unknown = sorted(set(node) - {f.name for f in dataclasses.fields(RewardOptions)})
    problems = [f"reward.{k}: not a key of reward (center_rewards_coefficient)" for k in unknown]
    c = node.get("center_rewards_coefficient")
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 or math.isinf(c)):
        problems.append(f"reward.center_rewards_coefficient={c!r}: expected null or a number >= 0 (e.g. 0.01)")
    return problems


def collate_scored_pairs(pairs, pad_id: int, pad_to_multiple_of: int = 1, seq_length: int | None = None) -> dict:
    """One micro-batch of ``m`` pairs as ``2m`` unshifted rows, the chosen first, then the rejected in the same
    order: ``tokens``, ``position_ids`` (int64 [2m, s], right-padded with ``pad_id``), ``last`` (int64 [2m]:
    each row's last token) and ``margin`` (float32 [m]). ``s`` is the longest row rounded up to
    ``pad_to_multiple_of`` (sequence parallelism splits it over TP), or ``seq_length``."""
    rows = [p.chosen.input_ids for p in pairs] + [p.rejected.input_ids for p in pairs]
    longest = max(len(r) for r in rows)
    seq = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of if seq_length is None else seq_length
    if longest > seq or seq % pad_to_multiple_of:
        raise ValueError(f"collate_scored_pairs: rows of up to {longest} tokens do not fit seq_length={seq} "
                         f"(a multiple of {pad_to_multiple_of})")
    tokens = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return {"tokens": tokens,
            "position_ids": torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(len(rows), seq).contiguous(),
            "last": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
            "margin": torch.tensor([float(p.margin or 0.0) for p in pairs], dtype=torch.float32)}


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                center: float | None) -> torch.Tensor:
    """[m] per-pair losses (see the module docstring)."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center is not None:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


# Per micro-batch, summed over pairs; all-reduced into RewardMetrics.
_STATS = ("loss", "pairs", "correct", "chosen", "rejected", "squares")


@dataclasses.dataclass
class RewardMetrics:
    """Means over the pairs of a global batch or a validation pass."""
    loss: float
    accuracy: float           # fraction of pairs with chosen scored above rejected
    margin: float             # mean of chosen - rejected scores
    chosen: float             # mean score of the chosen sequences
    rejected: float
    mean: float               # mean and standard deviation of all scores (chosen and rejected)
    std: float
    pairs: int

    def scalars(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/accuracy": self.accuracy, f"{prefix}/margin": self.margin,
                f"{prefix}/rewards/chosen": self.chosen, f"{prefix}/rewards/rejected": self.rejected,
                f"{prefix}/rewards/mean": self.mean, f"{prefix}/rewards/std": self.std}

    def format(self) -> str:
        return (f"loss {self.loss:.4f} acc {self.accuracy:.3f} margin {self.margin:.4f} "
                f"chosen {self.chosen:.4f} rejected {self.rejected:.4f} std {self.std:.4f}")


def reduce_metrics(reduced: list[dict], device) -> RewardMetrics:
    """Sum the micro-batches' statistics here and over all ranks (only last pipeline stages hold any; TP
    copies cancel in every ratio)."""
    from megatron.core import parallel_state as ps

    t = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
    for r in reduced:
        t += r["reward"].to(t)
    dist.all_reduce(t)
    s = dict(zip(_STATS, t.tolist()))
    n = s["pairs"]
    if not n:
        nan = float("nan")
        return RewardMetrics(nan, nan, nan, nan, nan, nan, nan, 0)
    mean = (s["chosen"] + s["rejected"]) / (2 * n)
    var = max(s["squares"] / (2 * n) - mean * mean, 0.0)
    return RewardMetrics(loss=s["loss"] / n, accuracy=s["correct"] / n, margin=(s["chosen"] - s["rejected"]) / n,
                         chosen=s["chosen"] / n, rejected=s["rejected"] / n, mean=mean, std=math.sqrt(var),
                         pairs=round(n / ps.get_tensor_model_parallel_world_size()))


def reward_forward_step(opts: RewardOptions, precision: str, device):
    """The schedule's forward step: the Bradley-Terry loss of a micro-batch of pairs."""
    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        with _autocast(precision, device):
            out = model(batch["tokens"], batch["position_ids"], None)  # last stage: scores [rows, s, 1]

        def loss_func(output_tensor):
            m = batch["margin"].shape[0]
            r = last_positions(output_tensor.float(), batch["last"])
            chosen, rejected = r[:m], r[m:]
            losses = pair_losses(chosen, rejected, batch["margin"].float(), opts.center_rewards_coefficient)
            c, j = chosen.detach().double(), rejected.detach().double()
            stats = torch.stack([losses.detach().sum().double(), torch.tensor(float(m), dtype=torch.float64,
                                 device=device), (c > j).sum().double(), c.sum(), j.sum(),
                                 (c * c).sum() + (j * j).sum()])
            return losses.sum(), torch.tensor(m, dtype=torch.int, device=device), {"reward": stats}

        return out, loss_func

    return forward_step


def _schedule(model, micro_batches: list[dict], step_fn, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = micro_batches[0]["tokens"]
    return get_forward_backward_func()(forward_step_func=step_fn, data_iterator=iter(micro_batches), model=[model],
                                       num_microbatches=len(micro_batches), seq_length=tokens.shape[1],
                                       micro_batch_size=tokens.shape[0], forward_only=forward_only)


def reward_forward_backward(model, micro_batches: list[dict], opts: RewardOptions,
                            precision: str = "fp32") -> RewardMetrics:
    """Accumulate the loss's gradients of this rank's micro-batches into ``main_grad``, finalised (reduced over
    DP / SP, divided by the global pair count), as a training step does before the optimizer."""
    device = next(model.parameters()).device
    model.zero_grad_buffer()
    reduced = _schedule(model, micro_batches, reward_forward_step(opts, precision, device), forward_only=False)
    return reduce_metrics(reduced, device)


@torch.no_grad()
def reward_evaluate(model, micro_batches: list[dict], opts: RewardOptions, precision: str = "fp32") -> RewardMetrics:
    """The metrics of the given micro-batches (this rank's share), all ranks agreeing; one schedule call per
    micro-batch (they may differ in length)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    reduced = []
    for mb in micro_batches:
        reduced += _schedule(model, [mb], reward_forward_step(opts, precision, device), forward_only=True)
    model.train(was_training)
    return reduce_metrics(reduced, device)
