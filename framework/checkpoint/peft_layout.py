"""Where the modules of an imported HF PEFT adapter sit in our adapter, kept in adapter.yaml under ``hf_peft``
so that the export gives back exactly the modules, tensors and config that came in.

HF PEFT adapts modules one by one, each with its own rank and scale (``r`` / ``lora_alpha``, overridden per
module by ``rank_pattern`` / ``alpha_pattern``), on the layers ``layers_to_transform`` selects. Our wrappers
adapt a whole fused layer (q/k/v in one, gate/up in one) on every layer, with one rank R. An import
(peft_import.py) puts each HF module's A rows and B columns in a block of our R rank columns and writes::

    hf_peft:
      config:   HF's adapter_config.json as it came
      modules:  {HF module path: [start, stop, scale]}   the rank columns [start, stop) of ours that hold the
                                                          module's factors and its scale s = alpha/r (rsLoRA:
                                                          alpha/sqrt(r)); IA3: {path: null}
      fillers:  {HF module path: digest or null}          modules HF left alone, represented by adapters that
                                                          change nothing: zero B rows (LoRA, DoRA), DoRA's
                                                          magnitude = the base row norm (digest: its sha256),
                                                          IA3 ones
      saved:    {HF base tensor: key in HF's file}        the whole tensors it carries (modules_to_save,
                                                          biases: PEFT's ``q_proj.base_layer.bias``)
      saved_fillers: {HF base tensor: digest}             the base's own values carried beside them (k_proj's
                                                          bias beside a trained q/v bias: one tensor of ours)
    column_scales: {"[stack.]layer.target": [R scales]}   beside it, where the scales of a wrapper's rank
                                                          columns differ from its one scale (mixed ranks or
                                                          alphas)

A DoRA filler leaves its rows unchanged because DoRA rescales each row of W + s B A to the magnitude: with
zero B rows the row is W's own, and a magnitude equal to ||W_row|| scales it by one. Our LoRA multiplies
each rank column by its scale (``column_scales``, set on the wrappers by adapter.py's load, which also hands
the wrappers this section; saving the model again writes both back), so mixed ranks and alphas are held as
they are, not folded into B. The export (:func:`hf_layout`) slices each module's block back out (bitwise
what came in while the columns outside its block stay zero) and leaves out fillers that are still
identities; a module trained beyond its block, or a filler that moved, is exported whole at our rank with
its per-column scales folded into B, and named in the config's patterns. An adapter with column scales but
without this section exports at one rank and scale, the scales folded into B (:func:`fold_column_scales`).
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

from framework.checkpoint.adapter import COLUMN_SCALES, HF_LAYOUT, AdapterError, _stacks, hf_module, ia3_module
from framework.checkpoint.adapter import layer_prefix, peft_names, wrapper_key
from framework.checkpoint.saved_tensors import KEY as SAVED
from framework.peft.lora import lora_scaling

KEY = HF_LAYOUT
_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def pattern_value(patterns: dict | None, module: str, default):
    """HF PEFT's ``get_pattern_key``: the value of the first pattern that matches ``module`` as a dotted
    suffix (a regex), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(cfg: dict, module: str, rank: int) -> float:
    """HF PEFT's scaling of ``module``: its alpha (``alpha_pattern`` or ``lora_alpha``) over r or sqrt(r)."""
    alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    return lora_scaling(alpha, rank, bool(cfg.get("use_rslora")))


def layer_index(module: str, layers_pattern) -> int | None:
    """HF PEFT's layer index of a module name: the first numbered segment (after ``layers_pattern``)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


def entry_selects(entries, module: str) -> list[str]:
    """The entries of a ``target_modules`` list that select ``module`` (its name, or a dotted suffix)."""
    return [e for e in entries if module == e or module.endswith("." + e)]


def in_layers(cfg: dict, module: str) -> bool:
    """``layers_to_transform`` / ``layers_pattern``: whether HF PEFT adapts ``module``'s layer."""
    wanted = cfg.get("layers_to_transform")
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    idx = layer_index(module, cfg.get("layers_pattern"))
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:32]


def groups(meta: dict, model_cfg) -> dict[str, list[str]]:
    """{wrapper key: the HF module paths its tensors hold, in split order} for every layer target."""
    fam, gated, out = model_cfg.family, model_cfg.gated_linear_unit, {}
    for t in meta["targets"]:
        for stack, layers in _stacks(model_cfg):
            if meta["method"] == "ia3":
                if stack is None:
                    for i in range(layers):
                        out.setdefault(wrapper_key(stack, i, t), []).append(layer_prefix(fam, i) + ia3_module(t, fam))
                continue
            if peft_names(fam, stack).module(t, gated) is None:
                continue
            for i in range(layers):
                out[wrapper_key(stack, i, t)] = [layer_prefix(fam, i, stack) + m
                                                 for m in hf_module(t, gated, fam, stack).names]
    return out


def _column_scales(meta: dict, key: str, rank: int) -> torch.Tensor:
    given = (meta.get(COLUMN_SCALES) or {}).get(key)
    if given is not None:
        return torch.tensor(given, dtype=torch.float64)
    s = lora_scaling(meta["alpha"], rank, bool(meta.get("rslora")))
    return torch.full((rank,), s, dtype=torch.float64)


def fold_column_scales(tensors: dict, meta: dict, model_cfg) -> dict:
    """The tensors with each wrapper's per-column scales folded into its B's (B * scale / s, s our one
    scale), so that an adapter of one rank and one scale computes the same: what an adapter without HF's
    layout exports when its columns scale differently."""
    scales = meta.get(COLUMN_SCALES) or {}
    if not scales:
        return tensors
    rank = int(meta["rank"])
    s = lora_scaling(meta["alpha"], rank, bool(meta.get("rslora")))
    out = dict(tensors)
    for key, paths in groups(meta, model_cfg).items():
        if key in scales:
            factor = _column_scales(meta, key, rank) / s
            for p in paths:
                b = out[f"{p}.lora_B.weight"]
                out[f"{p}.lora_B.weight"] = (b.double() * factor).to(b.dtype)
    return out


def _changed_config(cfg: dict, emitted: dict[str, tuple | None], patterns: dict[str, tuple[int, float]]) -> dict:
    """The config for a layout that moved: every emitted module named, the moved ones' rank/alpha first in
    the patterns (HF PEFT takes the first pattern that matches)."""
    cfg = dict(cfg)
    cfg["target_modules"] = sorted(emitted)
    for key in ("layers_to_transform", "layers_pattern"):  # IA3's config has neither
        if key in cfg:
            cfg[key] = None
    ff = cfg.get("feedforward_modules")
    if ff:  # IA3: a subset of target_modules, so full names too
        cfg["feedforward_modules"] = sorted(p for p in emitted if (re.fullmatch(ff, p) if isinstance(ff, str)
                                                                  else p in ff or entry_selects(ff, p)))
    if patterns:
        cfg["rank_pattern"] = {**{re.escape(p): r for p, (r, _) in patterns.items()}, **(cfg.get("rank_pattern") or {})}
        cfg["alpha_pattern"] = {**{re.escape(p): a for p, (_, a) in patterns.items()},
                                **(cfg.get("alpha_pattern") or {})}
    return cfg


def hf_layout(tensors: dict, meta: dict, model_cfg) -> tuple[dict, dict]:
    """(HF tensors, adapter_config.json) of an imported adapter's tensors (ours: every module of every
    wrapper, and the base tensors it carries), as the module docstring describes."""
    out, config = _module_layout(tensors, meta, model_cfg)
    hp = meta[KEY]
    fillers = hp.get("saved_fillers") or {}
    for name in meta.get(SAVED) or []:
        if name in fillers:
            if digest(tensors[name]) != fillers[name]:
                raise AdapterError(f"{name} was the base model's own at the import (it fills one parameter of "
                                   f"ours with a trained tensor) and has changed since; HF PEFT's "
                                   f"bias={hp['config'].get('bias')!r} adapter has no place for it")
            continue
        out[hp["saved"][name]] = tensors[name]
    return out, config


def _module_layout(tensors: dict, meta: dict, model_cfg) -> tuple[dict, dict]:
    hp, method = meta[KEY], meta["method"]
    modules, fillers = hp.get("modules") or {}, hp.get("fillers") or {}
    out, emitted, patterns = {}, {}, {}
    if method == "ia3":
        for paths in groups(meta, model_cfg).values():
            for p in paths:
                v = tensors[f"{p}.ia3_l"]
                if p in modules or not torch.all(v == 1):
                    out[f"{p}.ia3_l"], emitted[p] = v, None
        moved = set(emitted) != set(modules)
        return out, (_changed_config(hp["config"], emitted, {}) if moved else dict(hp["config"]))

    rank, rslora = int(meta["rank"]), bool(meta.get("rslora"))
    s_ours = lora_scaling(meta["alpha"], rank, rslora)
    moved = False
    for key, paths in groups(meta, model_cfg).items():
        scales = _column_scales(meta, key, rank)
        for p in paths:
            a, b = tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"]
            mag = tensors.get(f"{p}.lora_magnitude_vector")
            if p in modules:
                start, stop, _ = modules[p]
                outside = torch.cat([b[:, :start], b[:, stop:]], dim=1)
                if not torch.any(outside != 0):
                    out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = a[start:stop], b[:, start:stop]
                    if mag is not None:
                        out[f"{p}.lora_magnitude_vector"] = mag
                    emitted[p] = (start, stop)
                    continue
            elif p in fillers:
                if not torch.any(b != 0) and (mag is None or digest(mag) == fillers[p]):
                    continue  # still an adapter that changes nothing: HF had none here
            else:
                raise AdapterError(f"{KEY} of the adapter names neither a module nor a filler {p!r}")
            # trained beyond its block (or a filler that moved): the whole rank, per-column scales folded
            moved = True
            out[f"{p}.lora_A.weight"] = a
            out[f"{p}.lora_B.weight"] = (b.double() * (scales / s_ours)).to(b.dtype)
            if mag is not None:
                out[f"{p}.lora_magnitude_vector"] = mag
            emitted[p] = None
            patterns[p] = (rank, s_ours * (math.sqrt(rank) if rslora else rank))
    if moved or set(emitted) != set(modules):
        return out, _changed_config(hp["config"], emitted, patterns)
    return out, dict(hp["config"])
