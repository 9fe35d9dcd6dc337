"""P-tuning (Liu et al. 2021): the n virtual-token embeddings are the output of a small prompt encoder.

    P = mlp_head(E)                       encoder_reparameterization_type = MLP
    P = mlp_head(BiLSTM(E))               encoder_reparameterization_type = LSTM

with E [n, h] a learned embedding. The encoder is Hugging Face PEFT's ``PromptEncoder``, same modules and
parameter names (``embedding``, ``lstm_head``, ``mlp_head``): MLP = Linear(h, e), ReLU, Linear(e, e),
ReLU, Linear(e, h) (HF ignores ``encoder_num_layers`` for MLP; so do we); LSTM = a bidirectional
``encoder_num_layers``-layer LSTM of width e with ``encoder_dropout`` between layers, then
Linear(2e, 2e), ReLU, Linear(2e, h). ``e = encoder_hidden_size`` (default h). Everything else (batches,
positions, SP, PP, packing) is framework/peft/virtual_tokens.py; P enters on the first pipeline stage.

Export. The saved ``adapter.safetensors`` holds the encoder's *output* P (eval mode) as a plain
``prompt_embeddings`` table, so inference needs no encoder: the directory loads into a prompt-tuning model
(``peft.method=prompt_tuning``) and gives the same logits. ``prompt_encoder.safetensors`` keeps the
encoder's own weights, so a P-tuning model can load the directory and continue training; that load checks
that the encoder still produces the saved table.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from framework.peft.virtual_tokens import VirtualTokenError, VirtualTokenSource
from framework.peft.virtual_tokens import config_problems as shared
from framework.peft.virtual_tokens import install, plain_config, prompt_source, read_prompt_adapter, save_prompt_adapter

ENCODERS = ("MLP", "LSTM")
ENCODER_FILE = "prompt_encoder.safetensors"


class PromptEncoder(VirtualTokenSource):
    def __init__(self, n: int, hidden: int, encoder_type: str = "MLP", encoder_hidden_size: int | None = None,
                 num_layers: int = 2, dropout: float = 0.0, device=None):
        super().__init__()
        if encoder_type not in ENCODERS:
            raise VirtualTokenError(f"encoder_reparameterization_type={encoder_type!r} is not one of {ENCODERS}")
        e = int(encoder_hidden_size or hidden)
        self.encoder_type = encoder_type
        self.embedding = nn.Embedding(n, hidden, device=device)
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=hidden, hidden_size=e, num_layers=int(num_layers),
                                     dropout=float(dropout), bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * e, 2 * e, device=device), nn.ReLU(),
                                          nn.Linear(2 * e, hidden, device=device))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden, e, device=device), nn.ReLU(),
                                          nn.Linear(e, e, device=device), nn.ReLU(),
                                          nn.Linear(e, hidden, device=device))

    def prompt(self) -> torch.Tensor:
        x = self.embedding.weight  # = embedding(arange(n))
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x.unsqueeze(0))[0][0]
        return self.mlp_head(x)


def apply_p_tuning(model, num_virtual_tokens: int, encoder_type: str = "MLP",
                   encoder_hidden_size: int | None = None, encoder_num_layers: int = 2,
                   encoder_dropout: float = 0.0, seed: int | None = None) -> PromptEncoder | None:
    """Freeze the model and add n encoder-produced virtual tokens (call on every stage). The encoder starts
    as torch's default initialisation drawn from ``seed`` (default: the run's seed): the same everywhere."""
    def make(gpt, device):
        return PromptEncoder(int(num_virtual_tokens), gpt.config.hidden_size, encoder_type, encoder_hidden_size,
                             encoder_num_layers, encoder_dropout, device=device)

    return install(model, int(num_virtual_tokens), make, seed)


@torch.no_grad()
def prompt_table(encoder: PromptEncoder) -> torch.Tensor:
    """The encoder's output in eval mode (no dropout): what inference uses."""
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder.prompt().detach().clone()
    finally:
        encoder.train(was_training)


# -- registry interface ------------------------------------------------------------------------------
def apply_from_config(model, peft_cfg, model_cfg) -> None:
    apply_p_tuning(model, int(peft_cfg.num_virtual_tokens), str(peft_cfg.encoder_reparameterization_type),
                   peft_cfg.get("encoder_hidden_size"), int(peft_cfg.get("encoder_num_layers", 2)),
                   float(peft_cfg.get("encoder_dropout", 0.0)), seed=peft_cfg.get("seed"))


def save(model, directory, peft_cfg, model_cfg, base=None):
    enc = prompt_source(model)
    meta = {**plain_config(peft_cfg), "method": "ptuning", "base": dict(base or {})}
    table = extra = None
    if enc is not None:
        table = prompt_table(enc)
        extra = {ENCODER_FILE: dict(enc.state_dict())}
    return save_prompt_adapter(model, directory, meta, model_cfg, table, extra)


def load(model, directory, model_cfg) -> dict:
    """Load a P-tuning directory into a P-tuning model (encoder weights), checking it reproduces the table."""

    meta, table = read_prompt_adapter(directory, model, ("ptuning",))
    enc = prompt_source(model)
    if enc is None:
        return meta
    if not isinstance(enc, PromptEncoder):
        raise VirtualTokenError(f"{directory}: P-tuning weights load into a P-tuning model, this model has a "
                                f"{type(enc).__name__}")
    path = Path(directory) / ENCODER_FILE
    if not path.is_file():
        raise VirtualTokenError(f"{path} not found: this directory holds only the exported prompt table; load it "
                                f"with peft.method=prompt_tuning (inference), or train from a full P-tuning save")
    state = load_file(str(path))
    try:
        enc.load_state_dict({k: v.to(enc.embedding.weight) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise VirtualTokenError(f"{path} does not fit this prompt encoder "
                                f"({meta.get('encoder_reparameterization_type')} in the file): {e}") from None
    got = prompt_table(enc).float().cpu()
    if not torch.allclose(got, table.float(), atol=1e-5, rtol=1e-4):
        raise VirtualTokenError(f"{path}: the encoder does not reproduce the saved prompt table "
                                f"(max diff {(got - table).abs().max().item():.3g}); the files do not belong together")
    return meta


def config_problems(cfg, model_cfg) -> list[str]:
    """Positions that fit the model and an encoder this module builds (the keys' values are checked by
    framework/config/peft.py's section)."""
    problems = shared(cfg, model_cfg)
    kind = cfg.peft.get("encoder_reparameterization_type")
    if kind not in ENCODERS:
        problems.append(f"peft.encoder_reparameterization_type={kind!r} is not one of {list(ENCODERS)}")
    return problems
