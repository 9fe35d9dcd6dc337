"""Our checkpoint directory (DESIGN.md "Checkpoint layout"): base weights that load at any TP/PP.

    DIR/config.yaml    format_version, family, model (ModelConfig dict), hf_dtype, source, weights_files
    DIR/tokenizer/     the HF tokenizer files, copied as they are (load with Tokenizer.from_dir offline)
    DIR/weights/       megatron dist_checkpointing (torch_dist) of the model's ``sharded_state_dict()``

Writing is atomic: everything goes into a temporary sibling directory that is moved into place with
``os.replace`` once complete, so a crash leaves either the old checkpoint or the new one, never a
mixture. ``config.yaml`` also records the size of every file under ``weights/``, so a truncated or
missing file is reported by name before megatron reads anything, and so is a pickle in it that holds
more than plain data (framework/checkpoint/dcp_pickles.py).

Loading (:func:`load_checkpoint_into`) works at any layout: build the model at the wanted TP/PP and
dist_checkpointing reads each rank's shards of the global tensors (resharding on load). KV heads
replicated over TP ranks are written once, as the true tensor's head blocks (framework/models/kv_replication.py).
LoRA-wrapped models keep the base keys of their ``sharded_state_dict`` unchanged; their ``lora_A``/``lora_B``
keys are not part of base weights and are left alone.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import torch.distributed as dist
import yaml

from framework.checkpoint.dcp_pickles import check_dcp_pickles
from framework.checkpoint.streaming import streaming_save
from framework.models.config import ModelConfig, arch_mismatches
from framework.models.unwrap import unwrap_model
from framework.peft.wrapping import base_sharded_state_dict, is_adapter_key
from framework.runtime.atomic import publish
from framework.runtime.errors import CheckpointError

FORMAT_VERSION = 1
CONFIG_NAME = "config.yaml"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"

#: files of an HF model directory that make up its tokenizer (whichever exist are copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


# -- helpers ----------------------------------------------------------------------------------------------
def _dist():
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _broadcast_error(msg: str | None) -> None:
    """Raise the same CheckpointError on every rank when rank 0 found one (call on all ranks)."""
    d = _dist()
    box = [msg]
    if d:
        d.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])


def _gather_dicts(d: dict) -> dict:
    """The union of every rank's ``d`` on rank 0 (``d`` itself without process groups; {} off rank 0)."""
    dist = _dist()
    if not dist:
        return dict(d)
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(d, out, dst=0)
    return {k: v for part in out or [] for k, v in part.items()}



def copy_tokenizer(src_dir, dst_dir) -> list[str]:
    """Copy the tokenizer files of an HF directory into ``dst_dir``; returns the names copied."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    view = memoryview(bytearray(chunk))  # one buffer, reused: the hash adds 4 MiB to the resident set
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


# -- config.yaml ------------------------------------------------------------------------------------------
def read_config(ckpt_dir) -> dict:
    """config.yaml of a checkpoint directory, checked for format_version and a valid model section."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / CONFIG_NAME
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {ckpt_dir} is not a checkpoint directory of this framework")
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, this code reads "
                              f"version {FORMAT_VERSION}")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' section (the ModelConfig of the weights)")
    try:
        ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad 'model' section: {e}") from None
    return meta


def model_config_of(ckpt_dir) -> ModelConfig:
    """The ModelConfig stored in a checkpoint's config.yaml."""
    return ModelConfig.from_dict(read_config(ckpt_dir)["model"])


def tokenizer_dir(ckpt_dir) -> Path | None:
    """DIR/tokenizer when the checkpoint carries a tokenizer, else None."""
    p = Path(ckpt_dir) / TOKENIZER_DIR
    return p if p.is_dir() and any(p.iterdir()) else None


def config_mismatches(expected: ModelConfig, found: ModelConfig) -> list[str]:
    """Architecture differences (shapes/numerics) plus the family."""
    out = arch_mismatches(expected, found)
    if expected.family != found.family:
        out.insert(0, f"family: configured {expected.family!r}, checkpoint has {found.family!r}")
    return out


# -- save -------------------------------------------------------------------------------------------------
def save_checkpoint(model, ckpt_dir, model_cfg: ModelConfig, tokenizer_src=None, hf_dtype: str | None = None,
                    source: str | None = None, extra: dict | None = None, values=None, on_value=None) -> Path:
    """Write ``model``'s base weights (this process group's TP/PP layout, any) as DIR (all ranks call).

    ``tokenizer_src``: an HF directory whose tokenizer files are copied into DIR/tokenizer.
    ``hf_dtype``: dtype of the HF tensors the weights came from ('float32', 'bfloat16', ...), used by the
    HF export to write them back in the same dtype. ``extra`` is stored in config.yaml as given.
    ``values``: parameter name -> this rank's tensor, computed when the writer reaches it (``model`` may
    then be a skeleton on the meta device, framework/checkpoint/streaming.py); default: the model's own
    tensors. ``on_value(name)`` is called after each such parameter is computed (a progress bar).
    Stored in each parameter's dtype; every file's SHA-256 is recorded in config.yaml (the .distcp files
    hashed as they are written).
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir).absolute()
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp"
    err = None
    if _rank() == 0:
        try:
            ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / WEIGHTS_DIR).mkdir(parents=True)
        except OSError as e:
            err = f"cannot create {tmp}: {e}"
    _broadcast_error(err)
    try:
        strategy = streaming_save(unwrap_model(model), values, on_value=on_value)
        dist_checkpointing.save(base_sharded_state_dict(model), str(tmp / WEIGHTS_DIR), sharded_strategy=strategy)
        digests = _gather_dicts(strategy.sha256)
        if _rank() == 0:
            if tokenizer_src is not None:
                copy_tokenizer(tokenizer_src, tmp / TOKENIZER_DIR)
            meta = {
                "format_version": FORMAT_VERSION,
                "family": model_cfg.family,
                "model": model_cfg.to_dict(),
                "hf_dtype": hf_dtype,
                "source": source,
                **(extra or {}),
                "weights_files": _file_sizes(tmp / WEIGHTS_DIR),
                "weights_sha256": {n: digests.get(n) or _sha256(tmp / WEIGHTS_DIR / n)
                                   for n in _file_sizes(tmp / WEIGHTS_DIR)},
            }
            with open(tmp / CONFIG_NAME, "w") as f:
                yaml.safe_dump(meta, f, sort_keys=False)
            publish(tmp, ckpt_dir)
    finally:
        _barrier()
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ckpt_dir


# -- load -------------------------------------------------------------------------------------------------
def verify_checkpoint(ckpt_dir, model_cfg: ModelConfig | None = None, check_hashes: bool = True) -> dict:
    """Check config.yaml (and that it matches ``model_cfg``) and that every weights file is present with
    its recorded size (and, with ``check_hashes``, its recorded SHA-256: one extra read of the files).
    Returns config.yaml's contents; raises CheckpointError naming what is wrong."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_config(ckpt_dir)
    if model_cfg is not None:
        bad = config_mismatches(model_cfg, ModelConfig.from_dict(meta["model"]))
        if bad:
            raise CheckpointError(f"{ckpt_dir / CONFIG_NAME} does not match the model being loaded:\n  "
                                  + "\n  ".join(bad))
    weights = ckpt_dir / WEIGHTS_DIR
    if not weights.is_dir():
        raise CheckpointError(f"{weights} is missing: the checkpoint has no weights")
    recorded = meta.get("weights_files")
    if not isinstance(recorded, dict) or not recorded:
        raise CheckpointError(f"{ckpt_dir / CONFIG_NAME} lists no weights_files (incomplete checkpoint)")
    actual = _file_sizes(weights)
    for name, size in recorded.items():
        if name not in actual:
            raise CheckpointError(f"{weights / name} is missing (the checkpoint is incomplete)")
        if actual[name] != size:
            raise CheckpointError(f"{weights / name} is {actual[name]} bytes, but {size} were written: "
                                  f"the file is truncated or corrupted")
    if check_hashes:
        check_sha256(ckpt_dir, meta)
    check_dcp_pickles(weights)  # a checkpoint someone hands us: no code in its pickles before megatron loads them
    return meta


def check_sha256(ckpt_dir, meta: dict) -> None:
    """Compare every weights file with the SHA-256 recorded in config.yaml (``meta``): one read of the files.
    Raises CheckpointError naming the first file that differs."""
    weights = Path(ckpt_dir) / WEIGHTS_DIR
    for name, digest in (meta.get("weights_sha256") or {}).items():
        if _sha256(weights / name) != digest:
            raise CheckpointError(f"{weights / name} does not have the SHA-256 recorded in config.yaml: "
                                  f"the file is corrupted")


def load_checkpoint_into(model, ckpt_dir, model_cfg: ModelConfig, check_hashes: bool = True) -> dict:
    """Fill ``model`` (this rank's stage, any TP/PP; LoRA-wrapped or not) with the base weights of DIR.

    All ranks call. Every base tensor of the model must be in the checkpoint with a matching global
    shape; anything else raises CheckpointError on every rank naming the tensor. Global rank 0 also checks
    the files' SHA-256 (``check_hashes``). Returns config.yaml.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    gpt = unwrap_model(model)
    weights = ckpt_dir / WEIGHTS_DIR
    err, meta, sharded = None, None, None
    try:
        meta = verify_checkpoint(ckpt_dir, model_cfg, check_hashes=check_hashes and _rank() == 0)
        sharded = base_sharded_state_dict(gpt)
        _check_keys_and_shapes(sharded, weights)  # each stage checks its own tensors
    except CheckpointError as e:
        err = str(e)
    if _dist():  # agree on the first error, so no rank is left waiting in the load's collectives
        errs = [None] * _dist().get_world_size()
        _dist().all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise CheckpointError(err)
    try:
        state = dist_checkpointing.load(sharded, str(weights))
    except Exception as e:  # torch DCP / megatron raise assorted types; name the directory and the cause
        raise CheckpointError(f"cannot read weights from {weights}: {type(e).__name__}: {e}") from e
    missing, unexpected = _load_base_state(gpt, state)
    if missing or unexpected:
        raise CheckpointError(f"loading {weights} left parameters {missing} unassigned and found unexpected "
                              f"keys {unexpected}")
    return meta


def _check_keys_and_shapes(sharded: dict, weights: Path) -> None:
    """Compare the model's ShardedTensors with the checkpoint's metadata (global shapes, presence)."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    try:
        meta = load_tensors_metadata(str(weights))
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of {weights}: {type(e).__name__}: {e}") from e
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    built = _apply_factories_copy(sharded)
    for param_name, value in built.items():
        tensors, _ = extract_sharded_base({param_name: value})
        for st in nested_values(tensors):
            if not isinstance(st, ShardedTensor):
                continue
            if st.key not in meta:
                raise CheckpointError(f"tensor {st.key!r} (for model parameter {param_name!r}) is missing from "
                                      f"{weights}, which holds {len(meta)} tensors: {sorted(meta)[:8]}...")
            found = getattr(meta[st.key], "global_shape", None)
            if found is not None and tuple(found) != tuple(st.global_shape):
                raise CheckpointError(f"tensor {st.key!r} (for model parameter {param_name!r}): the model expects "
                                      f"global shape {tuple(st.global_shape)}, {weights} holds {tuple(found)}")


def _apply_factories_copy(sharded: dict) -> dict:
    """Apply ShardedTensorFactories (e.g. swiglu's split of linear_fc1) on a shallow copy."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = copy.copy(sharded)
    apply_factories(sd)
    return sd


def _load_base_state(gpt, state: dict) -> tuple[list[str], list[str]]:
    """model.load_state_dict for base keys only (LoRA factors and TE extra state excluded)."""
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_adapter_key(k) and not k.endswith("_extra_state")]
    return sorted(missing), sorted(result.unexpected_keys)
