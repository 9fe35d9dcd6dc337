"""Forward passes that extend megatron-core's KV cache, at any TP/PP, returning the last position's logits.

megatron's static-batching inference support does the caching: a ``StaticInferenceContext`` passed to
``GPTModel.forward`` makes every attention layer keep the keys and values of its heads (this TP rank's
query groups) in buffers [max_length, batch, groups/tp, head_dim]. A call with ``c`` tokens writes
cache slots ``offset .. offset + c - 1`` (``offset = sequence_len_offset``) and attends over slots
``0 .. offset + c - 1``. RoPE angles are those of the slot indices (``q`` at ``offset..offset+c-1``, the
cached keys re-rotated at ``0..offset+c-1``; our GPTModel keeps megatron's path when a context is given,
framework/models/gpt.py). That is each token's position when a row's tokens fill its slots from 0; when a
row starts later (left padding), all its real tokens are shifted by the same number of slots, and RoPE
scores depend only on the distance between query and key, so the attention is the same. With the context
megatron sends only the last position through the output layer (``materialize_only_last_token_logits``)
and gathers its vocabulary over TP.

Attention masks: the first call (offset 0) is causal by default; later calls are megatron's "no mask"
(their ``c`` tokens must then be 1, which is how generation calls them), unless ``attention_mask``
[b, 1, c, offset + c] (True = masked out) is given, which then says everything.

Pipeline: the pass goes through megatron's own schedule (``get_forward_backward_func``, forward only), as
training does, with ``seq_length = c``: the first stage embeds, activations travel stage to stage, the
last stage produces logits. Micro-batches of the batch fill the pipeline; each one's rows occupy cache
rows ``batch_size_offset ..`` of the same buffers. Only the last stage returns logits; the caller shares
what it decides from them (framework/inference/generate.py).
"""

from __future__ import annotations

import torch

from framework.models.unwrap import unwrap_model


def _keep(output_tensor: torch.Tensor):
    """Schedule loss function of the last stage: no loss, keep the [mb, V] logits of the last position."""
    zero = torch.zeros((), dtype=torch.float32, device=output_tensor.device)
    one = torch.ones((), dtype=torch.int, device=output_tensor.device)
    return zero, one, {"logits": output_tensor[:, -1].float()}


class CachedForward:
    """The KV cache of one batch of ``batch_size`` rows and up to ``max_length`` slots, and the forward
    pass that extends it. Every rank of the model-parallel group calls it with the same arguments."""

    def __init__(self, model, batch_size: int, max_length: int, micro_batch_size: int | None = None):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.gpt = unwrap_model(model)
        if self.gpt.config.sequence_parallel:
            raise ValueError("KV-cache generation cannot split one new token over TP ranks: build the model "
                             "without sequence parallelism (the weights are the same)")
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size or batch_size
        if batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} does not divide the batch of {batch_size}")
        self.context = StaticInferenceContext(batch_size, max_length)
        self.device = next(self.gpt.parameters()).device

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def _forward_step(self, data_iterator, model):
        tokens, positions, mask, start = next(data_iterator)
        ctx = self.context
        ctx.batch_size_offset = start
        out = model(tokens, positions, mask, inference_context=ctx, runtime_gather_output=True)
        return out, _keep

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write ``tokens`` [b, c] into the next ``c`` cache slots; return the float32 logits [b, V] of
        the last of them on the last pipeline stage (None on other stages). ``position_ids`` [b, c] feed
        learned absolute position embeddings (RoPE takes the slots' angles, see above)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, c = tokens.shape
        if b != self.batch_size:
            raise ValueError(f"CachedForward: batch of {b} rows, the cache holds {self.batch_size}")
        if self.offset + c > self.context.max_sequence_length:
            raise ValueError(f"CachedForward: {self.offset} + {c} slots exceed the cache's "
                             f"{self.context.max_sequence_length}")
        if self.offset and c != 1 and attention_mask is None:
            raise ValueError("CachedForward: after the first call, several tokens at once need an attention_mask")
        dev = self.device
        tokens, position_ids = tokens.to(dev), position_ids.to(dev)
        attention_mask = None if attention_mask is None else attention_mask.to(dev)
        mbs = self.micro_batch_size
        micro = [(tokens[i:i + mbs], position_ids[i:i + mbs],
                  None if attention_mask is None else attention_mask[i:i + mbs], i) for i in range(0, b, mbs)]
        was_training = self.model.training
        self.model.eval()  # megatron uses the context only in eval mode
        try:
            results = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iter(micro), model=[self.model],
                num_microbatches=len(micro), seq_length=c, micro_batch_size=mbs, forward_only=True)
        finally:
            self.model.train(was_training)
            self.context.batch_size_offset = 0
        self.context.sequence_len_offset += c
        self.context.enable_decode_mode()
        if not parallel_state.is_pipeline_last_stage():
            return None
        return torch.cat([r["logits"] for r in results], dim=0)
