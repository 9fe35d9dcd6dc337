"""Generation with an encoder-decoder model (T5): the encoder once per batch, then the decoder re-run over
the whole prefix at every step (no KV cache).

A batch of b encoder inputs (prompt tokens + EOS, as framework/data/seq2seq.py builds them for training)::

    encoder   ids [b, se], right-padded to the longest (rounded up to the TP size under sequence
              parallelism), mask 1 = token, 0 = padding
              -> final states H [se(/tp), b, h], once (framework/models/t5.py ``t5_encode``)
    step k    the unfinished rows R: decoder ids [start, y_1, ..., y_k] of each, right-padded to the
              longest; logits [|R|, k+1, V] from H[:, R] (``t5_logits``; the encoder's padding hidden from
              the cross-attention); each row's next token from its last real position
              (framework/inference/sampling.py: argmax, or a draw with the row's own seeded generator)

``start`` is the decoder start id (T5's pad token, as in training). The decoder's right padding lies after
every position read (causal self-attention), and T5's relative position bias depends only on the distance
between positions, so a row gets the logits it gets alone. A row stops at a stop id (not kept in its
completion) or after ``max_new_tokens``; finished rows leave the batch.

Why no KV cache. megatron-core 0.16.1's inference context does not serve T5: the static cache is keyed by
``layer_number``, which the encoder's layers, the decoder's layers and each decoder layer's self- and
cross-attention share (they would overwrite each other's keys); the relative position bias is computed for
``inference_context.max_sequence_length`` queries and keys (``RelativePositionEmbedding.get_relative_seq_len``)
rather than the new query against the cached keys; and the cross-attention would append the encoder's keys
at the decoder's offset. So each of the n steps costs one decoder forward over k + 1 positions (O(n^2)
decoder positions in all instead of O(n)); the encoder, usually the longer side, runs once.

Agreement between ranks as in framework/inference/generate.py: TP rank 0 decides, its tokens are broadcast
over TP, so every rank holds the same tokens (sampling included) and leaves the loop together. Pipeline
parallelism is refused for T5 (framework/models/t5.py).
"""

from __future__ import annotations

import math

import torch

from framework.models.t5 import t5_encode, t5_logits
from framework.models.unwrap import unwrap_model


def is_encoder_decoder(model) -> bool:
    """Whether ``model`` (possibly wrapped) is an encoder-decoder model (it has an encoder stack)."""
    return getattr(unwrap_model(model), "encoder", None) is not None


def padded_batch(rows: list[list[int]], fill: int, multiple: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, s], mask [b, s]: 1 = token) of ``rows`` right-padded with ``fill`` to the longest, rounded up
    to ``multiple``."""
    s = math.ceil(max(len(r) for r in rows) / multiple) * multiple
    ids = torch.full((len(rows), s), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), s), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def decode(model, prompts: list[list[int]], rows, decoder_start_id: int, pad_id: int) -> None:
    """Fill ``rows`` (framework/inference/generate.py ``Rows``) with the completions of the encoder inputs
    ``prompts`` (see the module docstring). Every rank of the TP group calls it with the same prompts."""
    t5 = unwrap_model(model)
    multiple = t5.config.tensor_model_parallel_size if t5.config.sequence_parallel else 1
    device = next(t5.parameters()).device
    encoder, encoder_mask = padded_batch(prompts, pad_id, multiple, device)
    hidden = t5_encode(model, encoder, encoder_mask)  # [se(/tp), b, h]
    decoded = [[decoder_start_id] for _ in prompts]
    while not all(rows.done):
        active = [r for r in range(len(prompts)) if not rows.done[r]]
        index = torch.tensor(active, device=device)
        decoder, _ = padded_batch([decoded[r] for r in active], decoder_start_id, multiple, device)
        logits = t5_logits(model, encoder[index], decoder, encoder_mask[index], hidden.index_select(1, index))
        last = logits[torch.arange(len(active), device=device), torch.tensor([len(decoded[r]) - 1 for r in active],
                                                                             device=device)]
        new = rows.decide(last, active, device)
        for r, t in zip(active, new.tolist()):
            rows.accept(r, t)
            decoded[r].append(t)
