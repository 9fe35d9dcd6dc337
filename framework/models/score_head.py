"""A scalar score head in place of the language-model head: a reward model (HF's ``...ForSequenceClassification``
with ``num_labels=1``: a ``score`` linear hidden -> 1 without bias, read at the last token of a sequence).

The head replaces megatron's ``output_layer`` on the last pipeline stage (the vocabulary projection is dropped,
as HF's sequence-classification models have no ``lm_head``), so GPTModel's forward without labels returns
per-position scores [b, s, 1] instead of logits; a reward model's loss reads each sequence's last position.
Word-embedding tying is switched off on every stage: there is no output weight to keep in step with the
embedding any more (megatron would otherwise all-reduce the embedding's gradient with the head's).

Tensor parallelism: the head is replicated (1 x h on every TP rank). Without sequence parallelism its input
is the full hidden state on every rank, so every rank computes the same scores and the same gradients (no
communication). Under sequence parallelism each rank scores its own slice of positions and the scores (one
number per position, not h) are all-gathered over TP; backward, each rank keeps its slice of the score
gradient, so the head's weight gradient is a partial sum over the rank's positions, summed over TP by
megatron's gradient finalisation (the weight carries the ``sequence_parallel`` attribute, as norms do).
"""

from __future__ import annotations

import torch

HEAD_ATTR = "output_layer"  # the GPTModel attribute the head takes over
HEAD_PARAM = "output_layer.weight"  # its parameter's name in the model (HF: ``score.weight``), where megatron's
#                                     checkpointing expects the output layer's weight


class ScoreHead(torch.nn.Module):
    """``score(hidden)``: [s, b, h] -> ([s, b, num_labels], None), the signature of megatron's output layer."""

    def __init__(self, hidden_size: int, num_labels: int = 1, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_labels, hidden_size, dtype=dtype))  # HF's score.weight
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:  # partial per TP rank: megatron all-reduces it over TP when finalising grads
            self.weight.sequence_parallel = True

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        # weight: megatron passes the tied embedding here for an LM head; a score head has its own
        scores = torch.nn.functional.linear(hidden, self.weight)
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            # every TP rank computes the loss from all positions: backward keeps this rank's slice
            scores = gather_from_sequence_parallel_region(scores, tensor_parallel_output_grad=False)
        return scores, None


def install_score_head(gpt, std: float, num_labels: int = 1, seed: int = 0) -> ScoreHead | None:
    """Replace ``gpt``'s output layer by a :class:`ScoreHead` (on the last stage; None elsewhere), its weight
    drawn from N(0, std) (HF's ``initializer_range``) with ``seed``, the same on every rank."""
    gpt.share_embeddings_and_output_weights = False
    if not gpt.post_process:
        return None
    config = gpt.config
    head = ScoreHead(config.hidden_size, num_labels, config.sequence_parallel, config.params_dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
    device = next(gpt.parameters()).device
    head.to(device)
    setattr(gpt, HEAD_ATTR, head)
    return head


def score_head_of(gpt) -> ScoreHead | None:
    """The model stage's score head (None: not the last stage, or an LM head)."""
    head = getattr(gpt, HEAD_ATTR, None) if getattr(gpt, "post_process", False) else None
    return head if isinstance(head, ScoreHead) else None


def last_positions(scores: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[rows] score at each row's last token: ``scores`` [rows, s, 1], ``last`` [rows] its index."""
    return scores[torch.arange(scores.shape[0], device=scores.device), last.to(scores.device), 0]
