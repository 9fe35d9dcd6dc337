"""Choosing the next token from the logits of the last position: greedy, or sampling.

Greedy: ``argmax`` over the vocabulary (the first index on ties, as ``torch.argmax`` and transformers).

Sampling applies, in this order (transformers' ``generate(do_sample=True)`` order and arithmetic:
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), then draws from the softmax:

    temperature T   z <- z / T
    top-k  (k > 0)  keep the tokens whose logit is >= the k-th largest (ties at the boundary kept)
    top-p  (p < 1)  sort ascending, c_i = cumulative softmax; drop tokens with c_i <= 1 - p, but always
                    keep the most likely token (the nucleus: the smallest set with probability >= p)

Dropped tokens get logit -inf. Each row draws with its own ``torch.Generator`` (seeded per prompt by
the caller), on the CPU, so a prompt's sample does not depend on the other prompts in its batch, on the
batch size or on the device, and every rank that draws from identical logits draws the same tokens.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Sampling:
    do_sample: bool = False     # False: greedy (temperature, top_k, top_p unused)
    temperature: float = 1.0    # > 0
    top_k: int = 0              # 0: off
    top_p: float = 1.0          # in (0, 1]; 1: off

    def problems(self, prefix: str = "") -> list[str]:
        """What is wrong with the settings, each naming ``prefix + key``."""
        out = []
        if not isinstance(self.do_sample, bool):
            out.append(f"{prefix}do_sample={self.do_sample!r}: expected true or false")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            out.append(f"{prefix}temperature={self.temperature!r}: expected a number > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            out.append(f"{prefix}top_k={self.top_k!r}: expected an integer >= 0 (0 = off)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            out.append(f"{prefix}top_p={self.top_p!r}: expected a number in (0, 1] (1 = off)")
        return out


def filtered_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """[b, V] float logits after temperature, top-k and top-p (see the module docstring)."""
    z = logits / float(s.temperature)
    if s.top_k > 0:
        k = min(int(s.top_k), z.shape[-1])
        z = z.masked_fill(z < torch.topk(z, k)[0][..., -1, None], float("-inf"))
    if s.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False)
        drop_sorted = sorted_z.softmax(dim=-1).cumsum(dim=-1) <= (1 - float(s.top_p))
        drop_sorted[..., -1:] = False
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return z


def next_tokens(logits: torch.Tensor, s: Sampling, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """[b] int64 next tokens (on the CPU) from [b, V] logits; ``generators`` (one per row) when sampling."""
    if not s.do_sample:
        return logits.argmax(dim=-1).cpu()
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError(f"sampling needs one generator per row: {logits.shape[0]} rows, "
                         f"{None if generators is None else len(generators)} generators")
    probs = filtered_logits(logits.float(), s).softmax(dim=-1).cpu()
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]
