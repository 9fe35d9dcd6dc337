"""A Hugging Face PEFT adapter directory -> our adapter directory (the inverse of peft_export.py).

    IN/adapter_config.json, IN/adapter_model.safetensors  ->  OUT/adapter.safetensors, OUT/adapter.yaml

HF PEFT trains one LoRA pair per module: A_q, A_k, A_v and B_q, B_k, B_v. Our fused ``linear_qkv`` (and
``linear_fc1`` for gate/up) has one A shared by the fused outputs. When the HF A's of a fused group are
identical (an adapter we exported) they are taken as they are. Otherwise the group is represented exactly
by a LoRA of k times the rank (k = 3 for q/k/v, 2 for gate/up)::

    [B_q A_q; B_k A_k; B_v A_v] = blockdiag(B_q, B_k, B_v) [A_q; A_k; A_v]

so A' = cat(A_q, A_k, A_v) is shared and each module's B' holds its B in its own column block, zeros
elsewhere. A module of the group that HF did not target (e.g. ``target_modules=[q_proj, v_proj]``) gets
zero A and B blocks. Every target is then padded with zeros to one common rank R (our LoRA has one rank),
and alpha is rescaled so that the scale s = alpha/r (rsLoRA: alpha/sqrt(r)) is unchanged. The result
computes exactly HF's update (the extra rows and columns are zeros); training it further lets the zero
blocks move, which HF's structure would not. IA3 vectors map one to one. DoRA imports only when every
module of a fused group is targeted (a magnitude of an untargeted module would need the base weights).
Anything else in the config (rank/alpha patterns, layers_to_transform, biases, modules_to_save) is refused.

Module names are the family's (framework/models/peft_names.py, through the registry): ``target_modules`` are
matched as HF PEFT matches them (a module whose name is an entry or ends with ``.`` + an entry, so GPT-2's
``c_proj`` selects ``attn.c_proj`` and ``mlp.c_proj``), and must select a module in every layer or in none.
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
from pathlib import Path

import torch

from framework.checkpoint.adapter import (FORMAT_VERSION, AdapterError, _stacks, _write_atomically,
                                          check_adapter_tensors, hf_module, layer_prefix, peft_names, target_modules)
from framework.models.peft_names import LAYER_TARGETS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_REFUSED = ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "layer_replication",
            "exclude_modules", "target_parameters")


class PeftImportError(AdapterError):
    """An HF PEFT adapter that cannot be represented by our adapters (names the key at fault)."""


def _read(peft_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

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
    return module in entries or any(module.endswith("." + e) for e in entries)


class _Selection:
    """Which of the family's HF modules a list of module names (target_modules, feedforward_modules) selects,
    in every layer alike."""

    def __init__(self, entries, key: str, path: Path, model_cfg):
        if isinstance(entries, str):
            raise PeftImportError(f"{path}: {key} is a regex ({entries!r}); give a list of module names")
        self.entries, self.key, self.path, self.cfg = list(entries or []), key, path, model_cfg
        self.used: set[str] = set()

    def layer_module(self, module: str, stack: str | None = None) -> bool:
        """Whether ``module`` (under a layer of ``stack``, T5's encoder or decoder) is selected; refused when
        only some layers are."""
        fam, hits = self.cfg.family, []
        for i in range(dict(_stacks(self.cfg))[stack]):
            full = layer_prefix(fam, i, stack) + module
            hits.append(_matches(full, self.entries))
            self.used.update(e for e in self.entries if full == e or full.endswith("." + e))
        if any(hits) and not all(hits):
            where = f"the {stack}'s layers" if stack else "layers"
            raise PeftImportError(f"{self.path}: {self.key} {self.entries} select {module} in {where} "
                                  f"{[i for i, h in enumerate(hits) if h]} only; our adapters cover every layer")
        return all(hits) and bool(hits)

    def model_module(self, module: str) -> bool:
        hit = [e for e in self.entries if module == e or module.endswith("." + e)]
        self.used.update(hit)
        return bool(hit)

    def check_all_used(self, known) -> None:
        """Every entry selected something; otherwise name why (a module we do not wrap) or what is known."""
        names = peft_names(self.cfg.family)
        for e in self.entries:
            if e in self.used:
                continue
            why = next((w for m, w in names.unsupported.items() if e == m or e.endswith("." + m)), None)
            if why:
                raise PeftImportError(f"{self.path}: {self.key} has {e!r}: {why}")
            raise PeftImportError(f"{self.path}: {self.key} {[e]} have no counterpart in our {self.cfg.family} "
                                  f"model; known: {sorted(known)}")


def _check_config(cfg: dict, path: Path, model_cfg) -> str:
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise PeftImportError(f"{path}: peft_type={kind!r}; LORA (incl. rsLoRA, DoRA) and IA3 import")
    try:
        names = peft_names(model_cfg.family)
    except AdapterError as e:
        raise PeftImportError(f"{path}: {e}") from None
    for key in _REFUSED:
        if cfg.get(key):
            raise PeftImportError(f"{path}: {key}={cfg[key]!r} is not supported (one setting for every layer)")
    if names.stacks and (kind != "LORA" or cfg.get("use_dora")):
        raise PeftImportError(f"{path}: {'DoRA' if kind == 'LORA' else kind} adapters of the encoder-decoder "
                              f"{model_cfg.family} do not import (its job trains LoRA and full weights); LoRA and "
                              f"rsLoRA do")
    if cfg.get("bias", "none") != "none":
        raise PeftImportError(f"{path}: bias={cfg['bias']!r}; only bias='none' adapters import")
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


def _lora_groups(tensors: dict, sel: _Selection, model_cfg, dora: bool):
    """{target: {(stack, layer): [(module, A or None, B or None, magnitude or None), ...]}} for the targeted
    groups (stack None for a decoder-only model; T5's 'encoder' / 'decoder')."""
    names, fam, gated = peft_names(model_cfg.family), model_cfg.family, model_cfg.gated_linear_unit
    if sel.model_module(names.embedding) or sel.model_module(names.output):
        raise PeftImportError(f"LoRA on {names.target_name(names.embedding)} / {names.target_name(names.output)} "
                              f"does not import yet; adapt only the linear layers")
    modules = {(t, stack): hf_module(t, gated, fam, stack).names for t in _layer_targets(model_cfg)
               for stack, _ in _stacks(model_cfg) if peft_names(fam, stack).module(t, gated) is not None}
    selected = {key: [sel.layer_module(m, key[1]) for m in mods] for key, mods in modules.items()}
    sel.check_all_used(_known(model_cfg, "lora"))
    _check_stacks_agree(selected, modules, sel)
    targets = [t for t in _layer_targets(model_cfg) if any(any(on) for (tt, _), on in selected.items() if tt == t)]
    groups = {t: {} for t in targets}
    for (t, stack), mods in modules.items():
        if t not in groups:
            continue
        for i in range(dict(_stacks(model_cfg))[stack]):
            entries = []
            for m, on in zip(mods, selected[(t, stack)]):
                p = layer_prefix(fam, i, stack) + m
                if on:
                    a, b = tensors.pop(f"{p}.lora_A.weight", None), tensors.pop(f"{p}.lora_B.weight", None)
                    if a is None or b is None:
                        raise PeftImportError(f"{p}.lora_{'A' if a is None else 'B'}.weight is missing")
                    mag = tensors.pop(f"{p}.lora_magnitude_vector", None) if dora else None
                    if dora and mag is None:
                        raise PeftImportError(f"{p}.lora_magnitude_vector is missing (use_dora=true)")
                    entries.append((m, a, b, mag))
                elif dora:
                    raise PeftImportError(f"DoRA adapter targets part of the fused {t} group but not {m}; DoRA "
                                          f"imports only when every module of the group is targeted")
                else:
                    entries.append((m, None, None, None))
            groups[t][(stack, i)] = entries
    return targets, groups


def _check_stacks_agree(selected: dict, modules: dict, sel: _Selection) -> None:
    """T5: one of our targets covers its modules in both stacks, so target_modules must select a module of it
    in the encoder exactly when they select it in the decoder."""
    for t in dict.fromkeys(t for t, _ in selected):
        stacks = [s for tt, s in selected if tt == t]
        for j, module in enumerate(modules[(t, stacks[0])]):
            on = {s: selected[(t, s)][j] for s in stacks}
            if len(set(on.values())) > 1:
                name = module.split(".", 1)[1]
                raise PeftImportError(f"{sel.path}: {sel.key} {sel.entries} select {name} in the "
                                      f"{' and '.join(s for s in stacks if on[s])} but not the "
                                      f"{' and '.join(s for s in stacks if not on[s])}; our T5 adapters apply "
                                      f"{t} to both stacks (select it in both, e.g. {name.split('.')[-1]!r})")


def _fuse(entries, r: int, fan_in: int):
    """Shared A and per-module B for one fused group (see the module docstring)."""
    present = [(a, b) for _, a, b, _ in entries if a is not None]
    if len(present) == len(entries) and all(torch.equal(a, present[0][0]) for a, _ in present):
        return present[0][0], [b for _, _, b, _ in entries]
    k = len(entries)
    A = torch.zeros(k * r, fan_in, dtype=present[0][0].dtype)
    Bs = []
    for j, (_, a, b, _) in enumerate(entries):
        out = b.shape[0] if b is not None else None
        if a is not None:
            A[j * r:(j + 1) * r] = a
        Bs.append((j, out, b))
    return A, Bs


def _check_ia3_fused_queries(key: str, vector: torch.Tensor, model_cfg) -> None:
    """IA3 on a fused qkv module: the query rows must be one (ours scales keys and values only)."""
    from framework.checkpoint.hf_import import shard_context
    from framework.models import weight_table as wt
    from framework.models.fused_layout import split_qkv

    rows = peft_names(model_cfg.family).targets["qkv"].rows
    ours = wt.TRANSFORMS[rows].forward([vector.reshape(-1)], shard_context(model_cfg, 0, 1)) if rows else vector
    q, _, _ = split_qkv(ours.reshape(-1), model_cfg.num_attention_heads, model_cfg.num_query_groups)
    if not torch.all(q == 1):
        raise PeftImportError(f"{key} scales query rows (max |l_q - 1| = {(q - 1).abs().max().item():.3g}); our IA3 "
                              f"scales keys and values only, so only adapters with l_q = 1 import")


def _import_ia3(tensors: dict, cfg: dict, path: Path, model_cfg) -> tuple[list[str], dict]:
    names, fam = peft_names(model_cfg.family), model_cfg.family
    sel = _Selection(cfg.get("target_modules"), "target_modules", path, model_cfg)
    ff = _Selection(cfg.get("feedforward_modules"), "feedforward_modules", path, model_cfg)
    targets = [t for t in ("k", "v", "fc2") if t in names.ia3 and sel.layer_module(names.ia3[t])]
    sel.check_all_used(_known(model_cfg, "ia3"))
    for t in targets:
        if ff.layer_module(names.ia3[t]) != (t == "fc2"):
            raise PeftImportError(f"{path}: feedforward_modules must be exactly fc2's module "
                                  f"{names.target_name(names.ia3['fc2'])!r}: ours scales its input, and the "
                                  f"outputs of the key/value modules")
    ff.check_all_used(_known(model_cfg, "ia3"))
    out = {}
    for t in targets:
        for i in range(model_cfg.num_layers):
            key = f"{layer_prefix(fam, i)}{names.ia3[t]}.ia3_l"
            if key in out:
                continue  # keys and values in one fused module
            if key not in tensors:
                raise PeftImportError(f"{key} is missing from {path.parent / PEFT_WEIGHTS}")
            out[key] = tensors.pop(key)
            if t != "fc2" and names.ia3_fused():
                _check_ia3_fused_queries(key, out[key], model_cfg)
    if names.ia3_fused() and any(t in targets for t in ("k", "v")):
        targets = ["k", "v"] + [t for t in targets if t == "fc2"]  # the fused vector covers both
    return targets, out


def import_peft(peft_dir, out_dir, model_cfg, base: dict | None = None) -> dict:
    """Write our adapter for ``model_cfg`` (its config.json/config.yaml architecture) from an HF PEFT
    directory; returns the adapter.yaml contents."""
    from framework.checkpoint.adapter import expected_shapes

    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    cfg, tensors = _read(peft_dir)
    method = _check_config(cfg, peft_dir / PEFT_CONFIG, model_cfg)
    fam, gated = model_cfg.family, model_cfg.gated_linear_unit
    meta = {"format_version": FORMAT_VERSION, "method": method,
            "base": dict(base or {"name": cfg.get("base_model_name_or_path")}), "model": model_cfg.to_dict(),
            "imported_from": str(peft_dir)}
    if method == "ia3":
        targets, out = _import_ia3(tensors, cfg, peft_dir / PEFT_CONFIG, model_cfg)
        meta.update(targets=targets, target_modules=target_modules("ia3", targets, gated, fam))
    else:
        r = int(cfg["r"])
        scale = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        sel = _Selection(cfg.get("target_modules"), "target_modules", peft_dir / PEFT_CONFIG, model_cfg)
        targets, groups = _lora_groups(tensors, sel, model_cfg, method == "dora")
        want = expected_shapes(model_cfg, targets, 1, method)  # rank 1: read fan-in/fan-out from the shapes
        fused = {}
        for t in targets:
            for (stack, i), entries in groups[t].items():
                fan_in = want[f"{layer_prefix(fam, i, stack)}{entries[0][0]}.lora_A.weight"][1]
                fused[(t, stack, i)] = _fuse(entries, r, fan_in)
        R = max(A.shape[0] for A, _ in fused.values())
        out = {}
        for (t, stack, i), (A, Bs) in fused.items():
            A_pad = torch.zeros(R, A.shape[1], dtype=A.dtype)
            A_pad[:A.shape[0]] = A
            for (m, _, _, mag), b in zip(groups[t][(stack, i)], Bs):
                p = f"{layer_prefix(fam, i, stack)}{m}"
                fan_out = want[f"{p}.lora_B.weight"][0]
                B = torch.zeros(fan_out, R, dtype=A.dtype)
                if isinstance(b, tuple):  # block-diagonal placement (j, out, b)
                    j, _, blk = b
                    if blk is not None:
                        B[:, j * r:(j + 1) * r] = blk
                else:
                    B[:, :b.shape[1]] = b
                out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = A_pad.clone(), B
                if mag is not None:
                    out[f"{p}.lora_magnitude_vector"] = mag
        alpha = scale * (math.sqrt(R) if cfg.get("use_rslora") else R)
        meta.update(rank=R, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                    rslora=bool(cfg.get("use_rslora")), targets=targets,
                    target_modules=target_modules(method, targets, gated, fam), hf_rank=r)
    if tensors:
        raise PeftImportError(f"{peft_dir / PEFT_WEIGHTS} holds {len(tensors)} tensor(s) the config does not "
                              f"explain, first {sorted(tensors)[0]}")
    check_adapter_tensors(out, model_cfg, meta)
    _write_atomically(out_dir, {k: out[k] for k in sorted(out)}, meta)
    return meta
