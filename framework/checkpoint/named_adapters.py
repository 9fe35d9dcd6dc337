"""Several named adapters on one base model: load and save by name, switch the active one without
rebuilding or reloading the base.

    adapters = NamedAdapters(model, model_cfg, root=RUN_DIR)   # adapters live in RUN_DIR/adapters/NAME/
    adapters.load("code")        # apply its method (from its adapter.yaml), load its tensors: now active
    adapters.load("chat")        # another one, any layer-wrapping method; "code" stays in memory
    adapters.activate("code")    # switch back
    adapters.add("new", cfg)     # a fresh adapter (peft config as in conf/peft/) to train
    adapters.deactivate()        # the base model alone
    adapters.save("new")         # write RUN_DIR/adapters/new/ (unsharded, loadable at any layout)

One adapter is active (wired into the model) at a time; merging (framework/peft/merge.py) acts on it.
Every adapter's tensors are kept in memory as this rank's shards. Switching to an adapter with the same
method, settings and targets as the active one copies its tensors into the existing wrappers; otherwise
the wrappers are taken off (:func:`~framework.peft.wrapping.remove_peft` puts the untouched base modules
back) and the other method's wrappers are put on. The base modules and their weights stay the same
objects throughout. Switching changes which parameters are trainable: build an optimizer after choosing
the adapter. Methods that do not wrap layers (prompt tuning, full fine-tuning) are refused. All ranks call
every method together (applying DoRA, loading and saving are collective).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from framework.checkpoint.adapter import load_adapter, read_adapter_config, save_adapter, set_adapter_extras
from framework.checkpoint.saved_tensors import KEY as SAVED
from framework.peft.merge import is_merged
from framework.peft.registry import get_method
from framework.peft.wrapping import peft_modules, remove_peft

#: adapter.yaml keys that describe the file, not the method's configuration
_FILE_KEYS = ("format_version", "target_modules", "base", "model")
#: methods that only wrap layers (QLoRA also re-stores the base; prompt tuning and full SFT wrap nothing)
SWITCHABLE = ("lora", "dora", "ia3", "adapter")


class NamedAdapters:
    def __init__(self, model: nn.Module, model_cfg, root: str | Path | None = None):
        if any(True for _ in peft_modules(model)):
            raise ValueError("NamedAdapters starts from the bare base model; this one already has adapter layers")
        self.model, self.model_cfg = model, model_cfg
        self.root = None if root is None else Path(root)
        self._adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}  # name -> (peft config, shards)
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def directory(self, name: str) -> Path:
        if self.root is None:
            raise ValueError(f"no root directory given: pass the directory of adapter {name!r} explicitly")
        return self.root / "adapters" / name

    # -- adding ----------------------------------------------------------------------------------
    def add(self, name: str, peft_cfg) -> None:
        """Put a freshly initialised adapter on (method and settings as a conf/peft/*.yaml section)."""
        cfg = OmegaConf.to_container(peft_cfg, resolve=True) if not isinstance(peft_cfg, dict) else dict(peft_cfg)
        self._put_on(cfg, reuse=False)
        self._remember(name, cfg)

    def load(self, name: str, directory: str | Path | None = None) -> dict:
        """Load ``directory`` (default ROOT/adapters/NAME) under ``name`` and make it active; returns its
        adapter.yaml."""
        d = Path(directory) if directory is not None else self.directory(name)
        meta = read_adapter_config(d)
        if meta.get(SAVED):  # loading writes them over the base, which every adapter here shares
            raise ValueError(f"adapter {name!r} ({d}) carries whole base tensors ({', '.join(meta[SAVED])}: HF PEFT's "
                             f"modules_to_save or trained biases), which replace the shared base's; load it alone "
                             f"(framework.checkpoint.trained.load_trained on its own model)")
        cfg = {k: v for k, v in meta.items() if k not in _FILE_KEYS}
        self._put_on(cfg, reuse=True)
        load_adapter(self.model, d, self.model_cfg)
        self._remember(name, cfg)
        return meta

    # -- switching -------------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        if name not in self._adapters:
            raise ValueError(f"no adapter named {name!r}; known: {self.names}")
        cfg, shards = self._adapters[name]
        self._put_on(cfg, reuse=True)
        params = self._trainable()
        if params.keys() != shards.keys():
            raise ValueError(f"adapter {name!r} does not fit the wrappers put on for it")  # a bug, not user input
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(shards[n])
        set_adapter_extras(self.model, cfg)  # an imported adapter's per-column scales and HF layout
        self.active = name

    def deactivate(self) -> None:
        """Take the active adapter off (kept in memory); the model computes its base again."""
        self._stash()
        self._check_unmerged()
        remove_peft(self.model)
        self.active = None

    def save(self, name: str | None = None, directory: str | Path | None = None, base: dict | None = None) -> Path:
        """Write adapter ``name`` (default: the active one) to ``directory`` (default ROOT/adapters/NAME)."""
        name = name or self.active
        if name is None:
            raise ValueError("no adapter is active; name the adapter to save")
        previous = self.active
        if name != previous:
            self.activate(name)
        d = Path(directory) if directory is not None else self.directory(name)
        save_adapter(self.model, d, self._adapters[name][0], self.model_cfg, base=base)
        if previous is not None and previous != name:
            self.activate(previous)
        return d

    # -- internals ---------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _remember(self, name: str, cfg: dict) -> None:
        self._adapters[name] = (cfg, {n: p.detach().clone() for n, p in self._trainable().items()})
        self.active = name

    def _stash(self) -> None:
        """Keep the active adapter's current tensors (it may have been trained since it was activated)."""
        if self.active is not None:
            self._remember(self.active, self._adapters[self.active][0])

    def _check_unmerged(self) -> None:
        if is_merged(self.model):
            raise ValueError(f"adapter {self.active!r} is merged into the base weights; unmerge it before switching")

    def _put_on(self, cfg: dict, reuse: bool) -> None:
        """Wrappers for ``cfg`` on the model (the current ones when they have the same structure)."""

        if cfg.get("method") not in SWITCHABLE:
            raise ValueError(f"peft.method={cfg.get('method')!r}: NamedAdapters switches {list(SWITCHABLE)} "
                             f"adapters only (they wrap layers and leave the base weights untouched)")
        self._stash()
        self._check_unmerged()
        current = self._adapters[self.active][0] if self.active is not None else None
        if reuse and current == cfg:
            return
        remove_peft(self.model)
        self.active = None
        get_method(cfg["method"]).apply(self.model, OmegaConf.create(cfg), self.model_cfg)
