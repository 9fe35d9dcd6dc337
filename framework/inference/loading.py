"""The model to generate with: the configured base model, plus what a fine-tuning run trained, if given.

``adapter=PATH`` names what ``framework/peft/registry.py`` saved:

    PATH/adapter.yaml   an adapter (LoRA, DoRA, IA3, Houlsby adapters, QLoRA, prompt tuning, P-tuning, ...):
                        its method and settings are read from adapter.yaml, applied to the base model
                        through the registry (``apply_peft``), then its weights loaded (``load_trained``)
    PATH/config.yaml    full fine-tuned weights (``peft.method=none``, a run's ``weights/``), loaded over
                        the base model

so any method the registry knows works here without code of its own. Weights load at any TP/PP.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from framework.checkpoint.model_loading import build_pretrained
from framework.checkpoint.trained import load_trained
from framework.peft.registry import get_method
from framework.runtime.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.yaml"
WEIGHTS_CONFIG_FILE = "config.yaml"
# adapter.yaml keys that describe the file, not the method's settings
_NOT_SETTINGS = ("format_version", "model", "base", "target_modules", "token_dim")


def trained_peft_config(path: str | Path, key: str = "adapter") -> dict:
    """The PEFT settings to apply before loading ``path`` (see the module docstring)."""
    p = Path(path)
    if (p / ADAPTER_FILE).is_file():
        try:
            meta = yaml.safe_load((p / ADAPTER_FILE).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={path}: {p / ADAPTER_FILE} is not valid YAML: {e}") from None
        settings = {k: v for k, v in meta.items() if k not in _NOT_SETTINGS}
        settings.setdefault("method", "lora")
        if settings.get("init") == "text":  # the loaded prompt table replaces any initialisation
            settings["init"] = "random"
        return settings
    if (p / WEIGHTS_CONFIG_FILE).is_file():
        return {"method": "none"}
    what = "does not exist" if not p.exists() else f"has neither {ADAPTER_FILE} (an adapter) nor " \
                                                    f"{WEIGHTS_CONFIG_FILE} (full fine-tuned weights)"
    raise ConfigError(f"{key}={path} {what}; give a run's adapters/NAME or weights/ directory")


def _base_name_differs(path: Path, cfg) -> str | None:
    f = path / ADAPTER_FILE
    if not f.is_file():
        return None
    base = (yaml.safe_load(f.read_text()) or {}).get("base") or {}
    name = base.get("name")
    return name if name and name != cfg.model.get("name") else None


def load_model(cfg: DictConfig, model_cfg, rt, adapter: str | None = None):
    """This rank's stage of the base model with ``adapter`` (a trained directory, or None) loaded, in eval mode."""
    peft = trained_peft_config(adapter) if adapter else {"method": "none"}
    get_method(peft["method"])  # an unknown method is a ConfigError naming it
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.peft = OmegaConf.create(peft)
    model = build_pretrained(job, model_cfg, rt)
    if adapter:
        other = _base_name_differs(Path(adapter), cfg)
        if other:
            log.warning("adapter=%s was trained on %r, loading it onto model %r", adapter, other, cfg.model.name)
        try:
            load_trained(model, adapter, job.peft, model_cfg)
        except ConfigError:
            raise
        except (ValueError, KeyError) as e:  # AdapterError, VirtualTokenError, CheckpointError: name the key
            raise ConfigError(f"adapter={adapter}: {e}") from None
        log.info("loaded %s (%s) onto %s", adapter, peft["method"], cfg.model.name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
