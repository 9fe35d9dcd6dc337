"""A Hugging Face PEFT adapter directory -> our adapter directory (the inverse of peft_export.py).

    IN/adapter_config.json, IN/adapter_model.safetensors  ->  OUT/adapter.safetensors, OUT/adapter.yaml

HF PEFT trains one LoRA pair per module: A_q, A_k, A_v and B_q, B_k, B_v. Our fused ``linear_qkv`` (and
``linear_fc1`` for gate/up) has one A shared by the fused outputs. When the HF A's of a fused group are
identical (an adapter we exported) they are taken as they are. Otherwise the group is represented exactly
by a LoRA of k times the rank (k = 3 for q/k/v, 2 for gate/up)::

    [B_q A_q; B_k A_k; B_v A_v] = blockdiag(B_q, B_k, B_v) [A_q; A_k; A_v]

so A' = cat(A_q, A_k, A_v) is shared and each module's B' holds its B in its own column block, zeros
elsewhere; each module keeps its own rank (``rank_pattern``) and its scale (``alpha_pattern``, rsLoRA) as
the scale of its rank columns. A module of the group that HF did not adapt (``target_modules=[q_proj,
v_proj]``, or a layer ``layers_to_transform`` leaves out) gets no block and becomes an adapter that changes
nothing: zero B rows, for DoRA a magnitude equal to the base row norm (read from ``base_dir``; DoRA rescales
each row of W + s B A to its magnitude, so a row with zero delta stays W's), for IA3 ones. Every target is
padded with zeros to one common rank R (our LoRA has one rank). The result computes exactly HF's update;
training it further lets the zero blocks move, which HF's structure would not. adapter.yaml records HF's
config and where each module sits (``hf_peft``, framework/checkpoint/peft_layout.py), for the export.
Whole base tensors the adapter file holds, ``modules_to_save`` (a trained ``embed_tokens`` / ``lm_head``) and
trained biases (``bias="lora_only"`` / ``"all"``, PEFT's ``...q_proj.base_layer.bias`` or ``...k_proj.bias``),
are kept under the base model's names (framework/checkpoint/saved_tensors.py), completed with the base's own
values where they fill one parameter of ours together (q/k/v biases). A few rarer settings (``_REFUSED``) are
refused by key, as is a saved embedding or head of another vocabulary size (added tokens).

Module names are the family's (framework/models/peft_names.py, through the registry): ``target_modules`` are
matched as HF PEFT matches them (a module whose name is an entry or ends with ``.`` + an entry, so GPT-2's
``c_proj`` selects ``attn.c_proj`` and ``mlp.c_proj``; a string is a regex, ``"all-linear"`` every linear
module but the output layer).
A fused HF module (GPT-2's ``c_attn``, Falcon's ``query_key_value``, ...) is one of our layers already: its
tensors are taken as they are (adapter.py reorders their rows on load). IA3 on such a module must leave its
query rows at one (ours scales keys and values only); ``feedforward_modules`` must be exactly fc2's module.
``fan_in_fan_out`` is accepted for Conv1D families (GPT-2), where HF PEFT sets it anyway. Modules we do not
wrap (Mixtral's experts and router) are refused with the reason.

Encoder-decoder (T5): the family's names are per stack (``encoder.block.{i}.layer.0.SelfAttention.q``,
``decoder.block.{i}.layer.1.EncDecAttention.k``, ...). HF PEFT's entries select modules of both stacks at
once (``q`` is every SelfAttention.q and EncDecAttention.q); each of our targets covers its modules in both
stacks (qkv, proj, fc1, fc2) or in the decoder (cross_q = EncDecAttention.q, cross_kv = EncDecAttention.k/v
fused as above, cross_proj = EncDecAttention.o), so a module must be selected in both stacks or in neither.
LoRA and rsLoRA import (what the T5 job trains); DoRA and IA3 adapters of a T5 are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from framework.checkpoint.adapter import (COLUMN_SCALES, FORMAT_VERSION, AdapterError, _stacks, _write_atomically,
                                          check_adapter_tensors, expected_shapes, hf_module, layer_prefix, peft_names,
                                          target_modules, wrapper_key)
from framework.checkpoint import prefix_tuning_hf
from framework.checkpoint.hf_import import safetensors_index, shard_context
from framework.checkpoint.safetensors_stream import SafetensorsReader
from framework.checkpoint.peft_layout import KEY as LAYOUT_KEY
from framework.checkpoint.peft_layout import digest, entry_selects, in_layers, module_scale, pattern_value
from framework.checkpoint.saved_tensors import KEY as SAVED
from framework.checkpoint.saved_tensors import base_shapes, complete_groups
from framework.models import weight_table as wt
from framework.models.fused_layout import split_qkv
from framework.models.peft_names import LAYER_TARGETS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_REFUSED = {  # config keys whose adapters do not import, and why
    "layer_replication": "our models do not repeat layers",
    "exclude_modules": "give the modules to adapt in target_modules",
    "target_parameters": "adapters of bare parameters (MoE experts) have no counterpart in our wrappers",
}


class PeftImportError(AdapterError):
    """An HF PEFT adapter that cannot be represented by our adapters (names the key at fault)."""


def _read(peft_dir: Path) -> tuple[dict, dict]:
    cfg_path, w_path = peft_dir / PEFT_CONFIG, peft_dir / PEFT_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise PeftImportError(f"{p} not found: {peft_dir} is not an HF PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PeftImportError(f"{cfg_path} is not valid JSON: {e}") from None
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in load_file(str(w_path)).items()}
    return cfg, tensors


def _matches(module: str, entries) -> bool:
    """HF PEFT's rule: a module is targeted when its name is an entry or ends with '.' + an entry."""
    return bool(entry_selects(entries, module))


class _Selection:
    """Which of the family's HF modules ``target_modules`` (or IA3's ``feedforward_modules``) select, layer by
    layer, by HF PEFT's rules (``check_target_module_exists``): a list entry selects a module it names, or one
    whose name ends with '.' + the entry, on the layers ``layers_to_transform`` / ``layers_pattern`` keep (a
    full name selects its module whatever the layers); a string is a regex the whole name must match;
    ``"all-linear"`` is every linear module but the output layer."""

    def __init__(self, cfg: dict, key: str, path: Path, model_cfg):
        entries = cfg.get(key)
        self.regex, self.all_linear = None, False
        if isinstance(entries, str) and entries.lower() == "all-linear":
            names = peft_names(model_cfg.family)
            self.all_linear = True
            entries = [*_known(model_cfg, "lora"), *names.unsupported]
            entries = [e for e in entries if e not in (names.target_name(names.embedding),
                                                       names.target_name(names.output))]
        elif isinstance(entries, str):
            self.regex, entries = entries, []
        self.entries, self.key, self.path, self.cfg, self.peft_cfg = list(entries or []), key, path, model_cfg, cfg
        self.used: set[str] = set()

    def selects(self, full: str) -> bool:
        if self.regex is not None:
            return re.fullmatch(self.regex, full) is not None
        hit = entry_selects(self.entries, full)
        self.used.update(hit)
        if full in self.entries:
            return True
        return bool(hit) and in_layers(self.peft_cfg, full)

    def layers(self, module: str, stack: str | None = None) -> list[bool]:
        """Whether ``module`` is selected in each layer of ``stack`` (T5's encoder or decoder)."""
        fam = self.cfg.family
        return [self.selects(layer_prefix(fam, i, stack) + module) for i in range(dict(_stacks(self.cfg))[stack])]

    def model_module(self, module: str) -> bool:
        return self.selects(module)

    def check_all_used(self, known) -> None:
        """Every entry selected something; otherwise name why (a module we do not wrap) or what is known."""
        names = peft_names(self.cfg.family)
        for e in self.entries:
            if e in self.used:
                continue
            why = next((w for m, w in names.unsupported.items() if e == m or e.endswith("." + m)), None)
            if why and (not self.all_linear or e in names.unsupported):
                raise PeftImportError(f"{self.path}: {self.key} has {e!r}: {why}")
            if not self.all_linear:
                raise PeftImportError(f"{self.path}: {self.key} {[e]} have no counterpart in our "
                                      f"{self.cfg.family} model; known: {sorted(known)}")


def _check_config(cfg: dict, path: Path, model_cfg) -> str:
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise PeftImportError(f"{path}: peft_type={kind!r}; LORA (incl. rsLoRA, DoRA) and IA3 import")
    try:
        names = peft_names(model_cfg.family)
    except AdapterError as e:
        raise PeftImportError(f"{path}: {e}") from None
    for key, why in _REFUSED.items():
        if cfg.get(key):
            raise PeftImportError(f"{path}: {key}={cfg[key]!r} is not supported: {why}")
    if names.stacks and (kind != "LORA" or cfg.get("use_dora")):
        raise PeftImportError(f"{path}: {'DoRA' if kind == 'LORA' else kind} adapters of the encoder-decoder "
                              f"{model_cfg.family} do not import (its job trains LoRA and full weights); LoRA and "
                              f"rsLoRA do")
    if cfg.get("bias", "none") not in ("none", "lora_only", "all"):
        raise PeftImportError(f"{path}: bias={cfg['bias']!r}; expected 'none', 'lora_only' or 'all'")
    if cfg.get("fan_in_fan_out") and not names.fan_in_fan_out:
        raise PeftImportError(f"{path}: fan_in_fan_out=true (Conv1D bases) is not supported: {model_cfg.family}'s "
                              f"modules are nn.Linear")
    return "ia3" if kind == "IA3" else ("dora" if cfg.get("use_dora") else "lora")


def _known(model_cfg, method: str) -> list[str]:
    names = peft_names(model_cfg.family)
    if names.stacks:  # T5: modules without their sub-layer index (SelfAttention.q, EncDecAttention.k, ...)
        return target_modules(method, _layer_targets(model_cfg), model_cfg.gated_linear_unit, model_cfg.family)
    mods = list(names.ia3.values()) if method == "ia3" else names.all_modules()
    return [names.target_name(m) for m in dict.fromkeys(mods)]


def _layer_targets(model_cfg) -> list[str]:
    """Our layer targets that have HF modules in some stack of the model, in our order (T5: + cross_*)."""
    fam, gated = model_cfg.family, model_cfg.gated_linear_unit
    stacks = [peft_names(fam, stack) for stack, _ in _stacks(model_cfg)]
    order = dict.fromkeys([*LAYER_TARGETS, *(t for names in stacks for t in names.targets)])
    return [t for t in order if any(names.module(t, gated) is not None for names in stacks)]


def _lora_groups(tensors: dict, sel: _Selection, cfg: dict, model_cfg, dora: bool):
    """(targets, {(target, stack, layer): [(module path, A, B, magnitude, scale) or (path, None, ...)]}) for the
    targeted groups (stack None for a decoder-only model; T5's 'encoder' / 'decoder'); a member HF PEFT did not
    adapt in that layer has A = None."""
    names, fam, gated = peft_names(model_cfg.family), model_cfg.family, model_cfg.gated_linear_unit
    if sel.model_module(names.embedding) or sel.model_module(names.output):
        raise PeftImportError(f"LoRA on {names.target_name(names.embedding)} / {names.target_name(names.output)} "
                              f"does not import yet; adapt only the linear layers")
    modules = {(t, stack): hf_module(t, gated, fam, stack).names for t in _layer_targets(model_cfg)
               for stack, _ in _stacks(model_cfg) if peft_names(fam, stack).module(t, gated) is not None}
    selected = {key: [sel.layers(m, key[1]) for m in mods] for key, mods in modules.items()}
    sel.check_all_used(_known(model_cfg, "lora"))
    _check_stacks_agree(selected, modules, sel)
    targets = [t for t in _layer_targets(model_cfg)
               if any(any(map(any, on)) for (tt, _), on in selected.items() if tt == t)]
    groups = {}
    for (t, stack), mods in modules.items():
        if t not in targets:
            continue
        for i in range(dict(_stacks(model_cfg))[stack]):
            entries = []
            for m, on in zip(mods, selected[(t, stack)]):
                p = layer_prefix(fam, i, stack) + m
                if not on[i]:
                    entries.append((p, None, None, None, None))
                    continue
                a, b = tensors.pop(f"{p}.lora_A.weight", None), tensors.pop(f"{p}.lora_B.weight", None)
                if a is None or b is None:
                    raise PeftImportError(f"{p}.lora_{'A' if a is None else 'B'}.weight is missing")
                mag = tensors.pop(f"{p}.lora_magnitude_vector", None) if dora else None
                if dora and mag is None:
                    raise PeftImportError(f"{p}.lora_magnitude_vector is missing (use_dora=true)")
                r = int(pattern_value(cfg.get("rank_pattern"), p, cfg["r"]))
                if a.shape[0] != r or b.shape[1] != r:
                    raise PeftImportError(f"{p}.lora_A.weight has rank {a.shape[0]} (lora_B {b.shape[1]}) but the "
                                          f"config gives the module r={r} (r / rank_pattern)")
                entries.append((p, a, b, mag, module_scale(cfg, p, r)))
            groups[(t, stack, i)] = entries
    return targets, groups


def _check_stacks_agree(selected: dict, modules: dict, sel: _Selection) -> None:
    """T5: one of our targets covers its modules in both stacks, so target_modules must select a module of it
    in the encoder exactly when they select it in the decoder."""
    for t in dict.fromkeys(t for t, _ in selected):
        stacks = [s for tt, s in selected if tt == t]
        for j, module in enumerate(modules[(t, stacks[0])]):
            on = {s: any(selected[(t, s)][j]) for s in stacks}
            if len(set(on.values())) > 1:
                name = module.split(".", 1)[1]
                raise PeftImportError(f"{sel.path}: {sel.key} {sel.entries} select {name} in the "
                                      f"{' and '.join(s for s in stacks if on[s])} but not the "
                                      f"{' and '.join(s for s in stacks if not on[s])}; our T5 adapters apply "
                                      f"{t} to both stacks (select it in both, e.g. {name.split('.')[-1]!r})")


def _blocks(entries) -> tuple[list[tuple[int, int]], int]:
    """Rank columns [start, stop) of each member of a fused group (None for a member HF left alone), and the
    group's width: one block shared by all when every member is there with one A and one scale (an adapter
    we exported), otherwise one block per member side by side (see the module docstring)."""
    present = [e for e in entries if e[1] is not None]
    if not present:
        return [None] * len(entries), 0
    a0, s0 = present[0][1], present[0][4]
    if len(present) == len(entries) and all(torch.equal(e[1], a0) and e[4] == s0 for e in present):
        return [(0, a0.shape[0])] * len(entries), a0.shape[0]
    blocks, start = [], 0
    for e in entries:
        if e[1] is None:
            blocks.append(None)
            continue
        blocks.append((start, start + e[1].shape[0]))
        start += e[1].shape[0]
    return blocks, start


def _base_tensor(base_dir, name: str, why: str) -> torch.Tensor:
    """HF base tensor ``name`` from the HF model directory ``base_dir``; ``why``: what needs it."""
    if base_dir is None:
        raise PeftImportError(f"{why} is the base model's: pass the HF base model directory (--model HF_DIR)")
    index = safetensors_index(base_dir)
    if name not in index:
        raise PeftImportError(f"{base_dir} has no {name} (needed for {why})")
    reader = SafetensorsReader(PeftImportError)
    try:
        return reader.read(index[name], name)
    finally:
        reader.close()


def _base_row_norms(base_dir, module: str, model_cfg) -> torch.Tensor:
    """||W_row|| of an HF base module (a DoRA magnitude that leaves the module unchanged)."""
    w = _base_tensor(base_dir, f"{module}.weight", f"{module}: the DoRA adapter leaves this module of a fused "
                                                  f"group (or layer) alone; its magnitude, the row norm of the "
                                                  f"weight,").float()
    if peft_names(model_cfg.family).fan_in_fan_out:  # Conv1D stores [in, out]
        w = w.t()
    return w.pow(2).sum(dim=1).sqrt()


def _import_lora(tensors: dict, cfg: dict, path: Path, model_cfg, dora: bool, base_dir) -> tuple[dict, dict]:
    """Our LoRA/DoRA tensors and adapter.yaml settings for an HF PEFT LoRA (see the module docstring)."""
    fam = model_cfg.family
    sel = _Selection(cfg, "target_modules", path, model_cfg)
    targets, groups = _lora_groups(tensors, sel, cfg, model_cfg, dora)
    if not targets:
        raise PeftImportError(f"{path}: target_modules {cfg.get('target_modules')!r} select none of our "
                              f"{fam} model's modules")
    want = expected_shapes(model_cfg, targets, 1, "dora" if dora else "lora")  # rank 1: fan-in/fan-out
    blocks = {key: _blocks(entries) for key, entries in groups.items()}
    R = max(width for _, width in blocks.values())
    scales = [e[4] for entries in groups.values() for e in entries if e[1] is not None]
    rslora = bool(cfg.get("use_rslora"))
    s = max(set(scales), key=scales.count)  # the most common scale is our wrappers' one
    out, modules, fillers, column_scales = {}, {}, {}, {}
    for (t, stack, i), entries in groups.items():
        member_blocks, _ = blocks[(t, stack, i)]
        fan_in = want[f"{entries[0][0]}.lora_A.weight"][1]
        A = torch.zeros(R, fan_in, dtype=next((e[1].dtype for e in entries if e[1] is not None), torch.float32))
        col = torch.full((R,), s, dtype=torch.float64)
        for (p, a, b, mag, scale), blk in zip(entries, member_blocks):
            fan_out = want[f"{p}.lora_B.weight"][0]
            B = torch.zeros(fan_out, R, dtype=A.dtype)
            if blk is not None:
                A[blk[0]:blk[1]] = a
                B[:, blk[0]:blk[1]] = b
                col[blk[0]:blk[1]] = scale
                modules[p] = [blk[0], blk[1], scale]
            if dora:
                if mag is None:
                    mag = _base_row_norms(base_dir, p, model_cfg).to(A.dtype)
                    fillers[p] = digest(mag)
                out[f"{p}.lora_magnitude_vector"] = mag
            elif blk is None:
                fillers[p] = None
            out[f"{p}.lora_B.weight"] = B
        for p, *_ in entries:
            out[f"{p}.lora_A.weight"] = A.clone()
        if torch.any(col != s):
            column_scales[wrapper_key(stack, i, t)] = col.tolist()
    alpha = s * (math.sqrt(R) if rslora else R)
    meta = dict(rank=R, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), rslora=rslora, targets=targets,
                target_modules=target_modules("dora" if dora else "lora", targets, model_cfg.gated_linear_unit, fam),
                hf_rank=int(cfg["r"]))
    meta[LAYOUT_KEY] = {"config": cfg, "modules": modules, "fillers": fillers}
    if column_scales:
        meta[COLUMN_SCALES] = column_scales
    return out, meta


def _check_ia3_fused_queries(key: str, vector: torch.Tensor, model_cfg) -> None:
    """IA3 on a fused qkv module: the query rows must be one (ours scales keys and values only)."""
    rows = peft_names(model_cfg.family).targets["qkv"].rows
    ours = wt.TRANSFORMS[rows].forward([vector.reshape(-1)], shard_context(model_cfg, 0, 1)) if rows else vector
    q, _, _ = split_qkv(ours.reshape(-1), model_cfg.num_attention_heads, model_cfg.num_query_groups)
    if not torch.all(q == 1):
        raise PeftImportError(f"{key} scales query rows (max |l_q - 1| = {(q - 1).abs().max().item():.3g}); our IA3 "
                              f"scales keys and values only, so only adapters with l_q = 1 import")


def _import_ia3(tensors: dict, cfg: dict, path: Path, model_cfg) -> tuple[dict, dict]:
    """Our IA3 vectors for an HF PEFT IA3: a module left alone in a layer gets ones."""
    names, fam = peft_names(model_cfg.family), model_cfg.family
    sel = _Selection(cfg, "target_modules", path, model_cfg)
    ff = _Selection(cfg, "feedforward_modules", path, model_cfg)
    on = {t: sel.layers(names.ia3[t]) for t in ("k", "v", "fc2") if t in names.ia3}
    targets = [t for t, hits in on.items() if any(hits)]
    sel.check_all_used(_known(model_cfg, "ia3"))
    for t in targets:
        for i, hit in enumerate(on[t]):
            if hit and ff.selects(layer_prefix(fam, i) + names.ia3[t]) != (t == "fc2"):
                raise PeftImportError(f"{path}: feedforward_modules must be exactly fc2's module "
                                      f"{names.target_name(names.ia3['fc2'])!r}: ours scales its input, and the "
                                      f"outputs of the key/value modules")
    ff.check_all_used(_known(model_cfg, "ia3"))
    if names.ia3_fused() and any(t in targets for t in ("k", "v")):
        targets = ["k", "v"] + [t for t in targets if t == "fc2"]  # the fused vector covers both
    shapes = expected_shapes(model_cfg, targets, None, "ia3")
    out, modules, fillers = {}, {}, {}
    for t in targets:
        for i in range(model_cfg.num_layers):
            p = f"{layer_prefix(fam, i)}{names.ia3[t]}"
            key = f"{p}.ia3_l"
            if key in out:
                continue  # keys and values in one fused module
            if any(on[u][i] for u in on if names.ia3[u] == names.ia3[t]):
                if key not in tensors:
                    raise PeftImportError(f"{key} is missing from {path.parent / PEFT_WEIGHTS}")
                out[key], modules[p] = tensors.pop(key), None
                if t != "fc2" and names.ia3_fused():
                    _check_ia3_fused_queries(key, out[key], model_cfg)
            else:
                out[key], fillers[p] = torch.ones(shapes[key]), None
    meta = dict(targets=targets, target_modules=target_modules("ia3", targets, model_cfg.gated_linear_unit, fam))
    meta[LAYOUT_KEY] = {"config": cfg, "modules": modules, "fillers": fillers}
    return out, meta


def _unexplained(tensors: dict, path: Path, model_cfg) -> PeftImportError:
    first = sorted(tensors)[0]
    names = peft_names(model_cfg.family)
    why = next((w for m, w in names.unsupported.items() if f".{m}." in f".{first}"), None)
    return PeftImportError(f"{path} holds {len(tensors)} tensor(s) the config does not explain, first {first}"
                           + (f": {why}" if why else ""))


def _saved_name(key: str, cfg: dict) -> str | None:
    """The HF base tensor a leftover key of the adapter file stands for, when the config explains it: a
    trained bias (``bias`` not 'none'; PEFT names an adapted module's ``base_layer.bias``) or a tensor of a
    ``modules_to_save`` module."""
    name = key.replace(".base_layer.", ".")
    module = name.rsplit(".", 1)[0]
    if cfg.get("bias", "none") != "none" and name.endswith(".bias"):
        return name
    saved = cfg.get("modules_to_save") or []
    if entry_selects([saved] if isinstance(saved, str) else saved, module):
        return name
    return None


def _import_saved(tensors: dict, cfg: dict, path: Path, model_cfg, base_dir) -> tuple[dict, dict, dict]:
    """(our tensors, {HF name: the key PEFT wrote}, {HF name read from the base: digest}) for the whole base
    tensors the adapter holds (framework/checkpoint/saved_tensors.py); the keys taken leave ``tensors``."""
    base = base_shapes(model_cfg)
    out, keys = {}, {}
    for key in sorted(tensors):
        name = _saved_name(key, cfg)
        if name is None:
            continue
        if name not in base:
            raise PeftImportError(f"{path}: {key} (modules_to_save {cfg.get('modules_to_save')!r}, bias "
                                  f"{cfg.get('bias', 'none')!r}) is not a tensor of the {model_cfg.family} base model")
        t = tensors[key]
        if tuple(t.shape) != base[name]:
            if name in _vocab_tensors(model_cfg) and t.shape[1:] == base[name][1:]:
                raise PeftImportError(f"{path}: {key} has {t.shape[0]} rows, the base model's vocabulary "
                                      f"{base[name][0]}: an adapter that added tokens (a resized embedding or "
                                      f"head in modules_to_save) does not import yet")
            raise PeftImportError(f"{path}: {key} has shape {tuple(t.shape)}, the base model's {name} is "
                                  f"{base[name]}")
        if model_cfg.tie_word_embeddings and name in _vocab_tensors(model_cfg):
            raise PeftImportError(f"{path}: {key}: a trained {name} of a model with tied embeddings "
                                  f"(tie_word_embeddings) does not import; HF PEFT unties what ours shares")
        out[name], keys[name] = tensors.pop(key), key
    fillers = {}
    for name in complete_groups(out, model_cfg):
        out[name] = _base_tensor(base_dir, name, f"{name}, which fills one parameter of ours with the trained "
                                                 f"{sorted(keys)[0]},")
        fillers[name] = digest(out[name])
    return out, keys, fillers


def _vocab_tensors(model_cfg) -> set[str]:
    return {n for n, shape in base_shapes(model_cfg).items() if shape[:1] == (model_cfg.vocab_size,)}


def import_peft(peft_dir, out_dir, model_cfg, base: dict | None = None, base_dir=None) -> dict:
    """Write our adapter for ``model_cfg`` (its config.json/config.yaml architecture) from an HF PEFT
    directory; returns the adapter.yaml contents. ``base_dir``: the HF base model directory, read only for
    what the adapter leaves to the base (DoRA's magnitude of a module HF did not adapt)."""
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    cfg, tensors = _read(peft_dir)
    if prefix_tuning_hf.is_hf_prefix_tuning(cfg):  # one table, not per-module tensors: its own module
        return prefix_tuning_hf.import_prefix_tuning(peft_dir, out_dir, model_cfg, cfg, base)
    method = _check_config(cfg, peft_dir / PEFT_CONFIG, model_cfg)
    meta = {"format_version": FORMAT_VERSION, "method": method,
            "base": dict(base or {"name": cfg.get("base_model_name_or_path")}), "model": model_cfg.to_dict(),
            "imported_from": str(peft_dir)}
    if method == "ia3":
        out, settings = _import_ia3(tensors, cfg, peft_dir / PEFT_CONFIG, model_cfg)
    else:
        out, settings = _import_lora(tensors, cfg, peft_dir / PEFT_CONFIG, model_cfg, method == "dora", base_dir)
    meta.update(settings)
    saved, keys, fillers = _import_saved(tensors, cfg, peft_dir / PEFT_CONFIG, model_cfg, base_dir)
    if tensors:
        raise _unexplained(tensors, peft_dir / PEFT_WEIGHTS, model_cfg)
    if saved:
        out.update(saved)
        meta[SAVED] = sorted(saved)
        meta[LAYOUT_KEY].update(saved=keys, saved_fillers=fillers)
    check_adapter_tensors(out, model_cfg, meta)
    _write_atomically(out_dir, {k: out[k] for k in sorted(out)}, meta)
    return meta
