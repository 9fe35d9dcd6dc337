"""The train state of a checkpoint: everything besides the weights that an exact resume needs.

    train_state/optimizer/       the optimizer (Adam moments, step; fp32 main params under bf16) as megatron
                                 dist_checkpointing of ``optimizer.sharded_state_dict`` (all ranks write)
    train_state/rng/tpT-ppP-dpD.safetensors   python, numpy, torch (CPU and CUDA) and megatron's RNG-tracker
                                 states of each rank (framework/training/rng_state.py)
    train_state/state.json       step, LR scheduler, data position, early-stopping counters, losses and
                                 validations so far, the settings a resume must share, the optimizer's
                                 layout (written last)

Nothing here is a pickle of ours: tensors are safetensors, the rest JSON. The optimizer directory is
megatron's format, whose ``.metadata``, ``common.pt`` and non-tensor items torch unpickles; they are checked
first (framework/checkpoint/dcp_pickles.py) and a pickle that references anything beyond plain data and
torch's checkpoint metadata is refused unread. A train state written before this (``format_version`` 1, RNG
states as ``rng/*.pt`` pickles) is refused with what to do, never unpickled.

In a background save (``trainer.async_save``, framework/training/checkpointing.py) the optimizer's tensors
are written by megatron's async writer and state.json, its content taken at the save, is written by the
request's last finalize function, once every rank's writer has finished.

The optimizer's layout (``optimizer.distributed``: megatron's distributed optimizer or the plain one) is
recorded from the optimizer object itself. The two save different tensors (flat per-bucket shards of each
DP rank, ``dp_reshardable``, against one tensor per parameter), and megatron-core 0.16.1 loads neither from
the other (its layout-independent ``fully_sharded_model_space`` format is the one that does not work, see
below); so a resume that toggles ``trainer.distributed_optimizer`` is refused before megatron reads anything.

Optimizer state at another data-parallel size: each optimizer tensor is saved as a ShardedTensor shaped
like its model parameter (megatron maps optimizer state onto the model's sharded state dict), so
dist_checkpointing writes one copy of every global tensor (DP replicas deduplicated by replica id) and
reads back whatever slice a rank of the new layout owns. That holds for the plain optimizer (LoRA: DP ranks
hold replicas) and for megatron's distributed optimizer (``dp_reshardable``: each DP rank writes its bucket
shards, which megatron reassembles for another DP size on load; TP and PP must stay). The plain optimizer's
state also reshards across TP/PP as far as the model's sharded state dict does. RNG states are per rank: the same layout gets its own rank's back; at another DP size
every rank takes DP rank 0's of its (TP, PP) position (DP ranks draw from identical streams: they are
seeded alike and consume alike).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from framework.checkpoint.dcp_pickles import check_dcp_pickles
from framework.models.unwrap import unwrap_model
from framework.runtime.errors import ConfigError
from framework.training.rng_state import SUFFIX as RNG_SUFFIX
from framework.training.rng_state import read_rng_file, rng_state, save_rng_file, set_rng_state  # noqa: F401

log = logging.getLogger("framework.train_state")

#: 2: RNG states as safetensors (rng/*.safetensors); 1: as pickles (rng/*.pt), refused (read_state)
FORMAT_VERSION = 2
PICKLED_RNG_VERSION = 1
STATE_FILE = "state.json"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
#: how megatron's distributed optimizer lays out its state (ignored by the plain optimizer). megatron-core
#: 0.16.1 refuses ``fully_sharded_model_space`` (ShardedTensor.flattened_range is gone) and its
#: ``fully_reshardable`` gathers through ``Tensor.cuda()``; ``dp_reshardable`` works on CPU and GPU and
#: loads at another data-parallel size.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}

#: settings that must be the same for a resumed run to continue the same training (anything else, such as
#: the layout, micro-batch size, intervals or early-stopping patience, may change between invocations)
RESUME_KEYS = ("seed", "precision", "model.name", "model.source", "model.arch", "peft", "data.train",
               "data.validation", "data.validation_split", "data.format", "data.max_length", "data.truncation_side", "data.loss_on",
               "data.decoder_max_length", "data.packing", "trainer.global_batch_size", "trainer.lr", "trainer.min_lr", "trainer.warmup_steps",
               "trainer.weight_decay", "trainer.adam_beta1", "trainer.adam_beta2", "trainer.clip_grad",
               "dpo")  # preference tuning: the loss, beta, label smoothing, SFT weight and reference
# trainer.distributed_optimizer is checked against the optimizer layout recorded in state.json
# (optimizer_layout_problem), which also covers checkpoints whose settings lack the key.


@dataclasses.dataclass
class LoopState:
    """The training loop's own progress (JSON-serialisable)."""
    step: int = 0                     # optimiser steps done
    total_steps: int = 0              # the run's length (LR schedule), from trainer.max_steps / max_epochs
    losses: list = dataclasses.field(default_factory=list)        # train loss of steps 1..step
    validations: list = dataclasses.field(default_factory=list)   # [step, validation loss] after step>=1
    val_before: float | None = None   # validation loss before training (the base model)
    completion_before: str | None = None
    finished: bool = False            # True: total_steps reached or stopped early; nothing left to train
    units: int = 0                    # the task's units processed (Task.unit: SFT tokens, DPO pairs), for
    #                                   throughput over invocations
    train_seconds: float = 0.0        # time spent in training steps (validation and checkpoints excluded)
    wandb_run_id: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # a job's own JSON progress (DPO: per-step metrics)


def resume_settings(cfg) -> dict:
    """The values of RESUME_KEYS in ``cfg`` (resolved; absent keys are None)."""
    out = {}
    for key in RESUME_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def settings_differences(saved: dict, now: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in RESUME_KEYS
            if k in saved and saved.get(k) != now.get(k)]


# -- RNG (framework/training/rng_state.py) -------------------------------------------------------------
def _rank_position() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank())


def _rng_file(directory: Path, tp: int, pp: int, dp: int) -> Path:
    return directory / RNG_DIR / f"tp{tp}-pp{pp}-dp{dp}{RNG_SUFFIX}"


# -- optimizer ----------------------------------------------------------------------------------------------
def _optimizer_sharded(model, optimizer, is_loading: bool) -> dict:
    return optimizer.sharded_state_dict(unwrap_model(model).sharded_state_dict(), is_loading=is_loading,
                                        metadata=OPTIMIZER_METADATA)


def save_optimizer(model, optimizer, directory: Path, background: bool = False):
    """Write the optimizer state to ``directory`` (all ranks); ``background``: return megatron's AsyncRequest
    for its tensors instead of writing them (the directory is complete once its finalize functions ran)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.save(_optimizer_sharded(model, optimizer, is_loading=False), str(directory),
                                   async_sharded_save=background)


def is_distributed_optimizer(optimizer) -> bool:
    """megatron's DistributedOptimizer (alone or in a chain), not the plain one."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_layout_problem(state: dict, optimizer, where) -> str | None:
    """Why the optimizer state saved in ``state`` (state.json) cannot load into ``optimizer`` (None: it can)."""
    saved = (state.get("optimizer") or {}).get("distributed")
    if saved is None:  # written before the layout was recorded: the setting of the run that saved it
        saved = (state.get("settings") or {}).get("trainer.distributed_optimizer")
    now = is_distributed_optimizer(optimizer)
    if saved is None or bool(saved) == now:
        return None
    then, now = str(bool(saved)).lower(), str(now).lower()
    return (f"trainer.distributed_optimizer: checkpoint {where} was saved with trainer.distributed_optimizer={then}, "
            f"this run has trainer.distributed_optimizer={now}. The two optimizer layouts save different tensors "
            f"(the distributed optimizer flat per-data-parallel-rank shards, the plain one a tensor per parameter) "
            f"and megatron-core cannot load one from the other; resume with trainer.distributed_optimizer={then}, "
            f"or start a new run (another output_dir, or trainer.resume=never)")


def load_optimizer(model, optimizer, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    check_dcp_pickles(directory)  # before megatron unpickles anything in it
    _prime_distributed_state(optimizer)
    state = dist_checkpointing.load(_optimizer_sharded(model, optimizer, is_loading=True), str(directory))
    steps = _distributed_steps(optimizer, state)
    with torch.no_grad():  # fp32 params: the distributed optimizer's main params are views of the model's
        optimizer.load_state_dict(state)
    _set_distributed_steps(optimizer, steps)


def _prime_distributed_state(optimizer) -> None:
    """A distributed optimizer describes its state only once Adam has state (without Apex/TE it reads the
    step from it): take megatron's dummy step, with lr and weight decay 0 so no weight moves."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values") or opt.optimizer.state:
            continue
        groups = opt.optimizer.param_groups
        kept = [(g["lr"], g["weight_decay"]) for g in groups]
        for g in groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        try:
            opt._init_optimizer_states_with_dummy_values()
        finally:
            for g, (lr, wd) in zip(groups, kept):
                g["lr"], g["weight_decay"] = lr, wd


def _distributed_steps(optimizer, state) -> list:
    """The saved Adam step of each distributed optimizer (None for other optimizers). With torch's Adam
    (no Apex/TE) ``dp_reshardable`` keeps each parameter's step as a local object, so loading copies the
    primed step over the saved one; the saved step is in the param groups and is put back afterwards."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(opts) == 1 else [v for _, v in sorted(state.items())]
    steps = []
    for opt, st in zip(opts, states):
        found = {g.get("step") for g in st.get("optimizer", {}).get("param_groups", [])} - {None}
        is_distributed = hasattr(opt, "_init_optimizer_states_with_dummy_values")
        steps.append(found.pop() if is_distributed and len(found) == 1 else None)
    return steps


def _set_distributed_steps(optimizer, steps: list) -> None:
    for opt, step in zip(getattr(optimizer, "chained_optimizers", [optimizer]), steps):
        if step is not None:
            for param_state in opt.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = torch.tensor(float(step))


# -- the whole train state ------------------------------------------------------------------------------------
def save_train_state(directory, *, model, optimizer, scheduler, order, stopper, loop: LoopState, settings: dict,
                     rt, background: bool = False) -> list:
    """Write ``directory`` (= CHECKPOINT/train_state); all ranks call. state.json comes last, on rank 0,
    after every rank has written its part. ``background``: leave the optimizer's tensors and state.json to
    the returned megatron AsyncRequests (state.json in their last finalize function); else returns [].
    ``settings``: the run's resume_settings, which a resume must match."""
    directory = Path(directory)
    if rt.is_main:
        for sub in (RNG_DIR, OPTIMIZER_DIR):
            (directory / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if background:
        request = save_optimizer(model, optimizer, directory / OPTIMIZER_DIR, background=True)
    else:
        save_optimizer(model, optimizer, directory / OPTIMIZER_DIR)
    save_rng_file(_rng_file(directory, *_rank_position()), rng_state())
    distributed = is_distributed_optimizer(optimizer)
    # taken now: the loop, scheduler and data order go on while a background save is being written
    text = json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(loop),
                       "scheduler": scheduler.state_dict(), "data_order": order.state_dict(),
                       "early_stopping": stopper.state_dict(), "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp},
                       "optimizer": {"distributed": distributed, **(OPTIMIZER_METADATA if distributed else {})},
                       "settings": settings}, indent=1) if rt.is_main else None

    def write_state_json() -> None:
        if rt.is_main:
            tmp = directory / (STATE_FILE + ".tmp")
            tmp.write_text(text)
            tmp.replace(directory / STATE_FILE)

    if background:
        request.add_finalize_fn(write_state_json)  # after megatron's own finalization, which ends in a barrier
        return [request]
    dist.barrier()
    write_state_json()
    return []


def read_state(directory) -> dict:
    """state.json of CHECKPOINT/train_state (raises OSError/ValueError if missing or unreadable)."""
    path = Path(directory) / STATE_FILE
    state = json.loads(path.read_text())
    version = state.get("format_version") if isinstance(state, dict) else None
    if version == PICKLED_RNG_VERSION:
        raise ConfigError(
            f"trainer.resume: {path} is a train state of an earlier version of this framework (format_version "
            f"{version}), which kept the RNG states as pickles ({Path(directory) / RNG_DIR}/*.pt). Unpickling a "
            f"file can run any code it holds, so this version does not read them. Resume this checkpoint with "
            f"the version that wrote it, or start a new run: another output_dir, or "
            f"trainer.resume=never (which deletes the checkpoints in this output_dir)")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    return state


def load_train_state(directory, *, model, optimizer, scheduler, order, stopper, rt) -> LoopState:
    """Restore optimizer, scheduler, RNG, data position and early-stopping counters from ``directory``;
    returns the loop's progress. The weights are restored separately (framework.peft.registry.load_trained)
    and must be loaded first: a bf16 optimizer's fp32 main params are overwritten here."""
    directory = Path(directory)
    state = read_state(directory)
    problem = optimizer_layout_problem(state, optimizer, directory.parent)
    if problem:
        raise ConfigError(problem)
    load_optimizer(model, optimizer, directory / OPTIMIZER_DIR)
    scheduler.load_state_dict(state["scheduler"])
    order.load_state_dict(state["data_order"])
    stopper.load_state_dict(state["early_stopping"])
    tp, pp, dp = _rank_position()
    saved = state["layout"]
    same_layout = (saved["tp"], saved["pp"], saved["dp"]) == (rt.tp, rt.pp, rt.dp)
    rng_file = _rng_file(directory, tp, pp, dp if same_layout else 0)
    if rng_file.is_file():
        set_rng_state(read_rng_file(rng_file))
    else:
        log.warning("no RNG state for TP rank %d, PP rank %d in %s (the checkpoint's layout was TP=%d PP=%d): "
                    "random streams (dropout) restart from the seed", tp, pp, directory, saved["tp"], saved["pp"])
    return loop_state(state)


def loop_state(state: dict) -> LoopState:
    """The LoopState of a state.json. ``units`` was named ``tokens`` in state.json files of format 2 written
    before its rename (it counted the same units)."""
    fields = {f.name for f in dataclasses.fields(LoopState)}
    if "units" not in state:
        state = {**state, "units": state.get("tokens", 0)}
    return LoopState(**{k: v for k, v in state.items() if k in fields})
