"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on megatron's tensor-parallel linear layers, as HF PEFT's
``use_dora`` computes it (peft/tuners/lora/dora.py, ``DoraLinearLayer``):

    V = W + s B A                        s = alpha / r (or alpha / sqrt(r) with rslora)
    n = ||V||_row                        L2 norm of every output row over the full input dimension,
                                         computed from W and a *detached* B A, and itself detached
                                         (paper section 4.3): no gradient flows through n
    y = W x + (m / n - 1) * W x_d + (m / n) * s B A x_d          x_d = dropout(x); without dropout
      = (m / n) * (W x + s B A x)                                (x_d = x) this is m * V x / ||V||

m (the magnitude, one entry per output feature, HF's ``lora_magnitude_vector``) starts at n, so a fresh
DoRA layer computes exactly its base. A bias of the base is left unscaled, as in HF PEFT.

Under tensor parallelism (on top of LoRA's wiring, framework/peft/lora.py):

* column-parallel base (qkv, fc1, output): every rank holds whole output rows (W's shard [out/TP, in],
  A whole), so n is local; m is sharded like the output (partition dim 0; fc1's rows are megatron's
  per-rank cat(gate_r, up_r), as for B). Its gradient is complete on each rank (it sees the full sequence).
* row-parallel base (proj, fc2): each rank holds a slice of every row's input dimension (W [out, in/TP],
  A [r, in/TP]), so the squared partial row norms are all-reduced over TP before the square root: an
  out-wide vector once per forward, independent of the number of tokens. m is replicated; under sequence
  parallelism each rank scales only its sequence slice, so m's gradient is partial and m carries
  ``sequence_parallel`` (all-reduced over TP by finalize_model_grads).

With dropout the term W x_d needs a second base forward on the dropped input (as in HF PEFT), which repeats
the base's own communication; without dropout the base output is reused.

Merging folds the whole update into this rank's shard, W <- (m / n) * (W + s B A), with n from the
unmerged weight (all-reduced for row-parallel bases) kept for unmerging: W <- W / (m / n) - s B A.
Embedding DoRA is not supported (use LoRA there), nor a tied output layer (it owns no weight).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from framework.peft.lora import TARGETS, LoRALinear, apply_lora, check_targets, targets_problems
from framework.peft.wrapping import Piece, mark, param_like

#: DoRA targets: LoRA's linear ones (embedding excluded)
DORA_TARGETS = {t: v for t, v in TARGETS.items() if t != "embedding"}


class DoRALinear(LoRALinear):
    """LoRALinear with HF PEFT's DoRA magnitude/direction decomposition (see the module docstring)."""

    method = "dora"
    TARGET_ORDER = tuple(DORA_TARGETS)

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init_seed: int | None = None):
        super().__init__(base, rank, alpha, dropout=dropout, rslora=rslora, init_seed=init_seed)
        if base.weight is None:
            raise ValueError("DoRA needs a base layer that owns its weight; a tied output layer shares the "
                             "embedding's (use LoRA on the output layer, or untie the embeddings)")
        if getattr(base, "gather_output", False):
            raise ValueError("DoRA on a ColumnParallelLinear with gather_output=True is not supported")
        out_local = base.weight.shape[0]
        self.lora_magnitude_vector = param_like(base, (out_local,))
        if self.parallel_mode == "column":
            mark(self.lora_magnitude_vector, 0, partial_grad=False)
        else:
            mark(self.lora_magnitude_vector, None, partial_grad=self.sequence_parallel)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())
        self._merged_norm: torch.Tensor | None = None

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row of this rank, over the full input dimension (detached)."""
        w = self.base_layer.weight
        v = w + self.delta_weight().to(w.dtype)
        sq = v.float().pow(2).sum(dim=1)
        if self.parallel_mode == "row" and self.tp_size > 1:
            dist.all_reduce(sq, group=self.tp_group)  # each rank held a slice of every row
        return sq.sqrt().to(w.dtype)

    def _bias_inside(self) -> torch.Tensor | None:
        """The base bias when the base adds it to its output (HF PEFT leaves it unscaled)."""
        b = getattr(self.base_layer, "bias", None)
        return None if b is None or self.base_layer.skip_bias_add else b

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(input_, *args, **kwargs)
        if self.merged:
            return output, bias
        inner = self._bias_inside()
        x_d = self._dropped(input_)
        if x_d is input_:
            base_d = output if inner is None else output - inner
        else:
            base_d, _ = self.base_layer(x_d, *args, **kwargs)
            base_d = base_d if inner is None else base_d - inner
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(output.dtype)  # [out (local)]
        lora = self.lora_branch(x_d).to(output.dtype)
        return output + (scale - 1) * base_d + scale * lora, bias

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable(True)
        w = self.base_layer.weight
        n = self.weight_norm()
        factor = (self.lora_magnitude_vector / n).unsqueeze(1)
        w.copy_(factor * (w + self.delta_weight().to(w.dtype)))
        self._merged_norm = n
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_mergeable(False)
        w = self.base_layer.weight
        factor = (self.lora_magnitude_vector / self._merged_norm).unsqueeze(1)
        w.copy_(w / factor - self.delta_weight().to(w.dtype))
        self._merged_norm = None
        self.merged = False

    def pieces(self) -> list[Piece]:
        return super().pieces() + [Piece("lora_magnitude_vector", "lora_magnitude_vector", "out", 0)]


def apply_dora(model: nn.Module, targets=("qkv", "proj", "fc1", "fc2"), rank: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, seed: int | None = None) -> list[str]:
    """Freeze this stage and wrap the chosen linear layers with DoRA (same seeds as apply_lora)."""
    if "embedding" in (targets if not isinstance(targets, str) else (targets,)):
        raise ValueError("DoRA on the embedding is not supported; valid DoRA targets are "
                         f"{list(DORA_TARGETS)} (LoRA supports 'embedding')")
    check_targets(targets, DORA_TARGETS, "DoRA")
    return apply_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, seed=seed,
                      linear_cls=DoRALinear)


def config_problems(cfg, model_cfg) -> list[str]:
    """Checks of ``cfg.peft`` for DoRA (LoRA's keys; no embedding target; an output layer of its own)."""
    problems = targets_problems(cfg.peft, DORA_TARGETS, "DoRA")
    targets = cfg.peft.get("targets") or []
    if "output" in targets and getattr(model_cfg, "tie_word_embeddings", False):
        problems.append("peft.targets has 'output' but the model ties its output layer to the embedding "
                        "(tie_word_embeddings): DoRA needs the layer's own weight; use LoRA on 'output'")
    return problems


def apply_from_config(model, peft_cfg, model_cfg) -> list[str]:
    return apply_dora(model, targets=tuple(peft_cfg.targets), rank=int(peft_cfg.rank), alpha=float(peft_cfg.alpha),
                      dropout=float(peft_cfg.get("dropout", 0.0)), rslora=bool(peft_cfg.get("rslora", False)))
