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
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from framework.checkpoint.adapter import (FORMAT_VERSION, HF_MODULES, IA3_MODULES, AdapterError, _write_atomically,
                                          check_adapter_tensors, target_modules)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MODULE_TARGET = {m.split(".")[-1]: t for t, mods in HF_MODULES.items() for m in mods}
_REFUSED = ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "layer_replication")


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


def _check_config(cfg: dict, path: Path) -> str:
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise PeftImportError(f"{path}: peft_type={kind!r}; LORA (incl. rsLoRA, DoRA) and IA3 import")
    for key in _REFUSED:
        if cfg.get(key):
            raise PeftImportError(f"{path}: {key}={cfg[key]!r} is not supported (one setting for every layer)")
    if cfg.get("bias", "none") != "none":
        raise PeftImportError(f"{path}: bias={cfg['bias']!r}; only bias='none' adapters import")
    if cfg.get("fan_in_fan_out"):
        raise PeftImportError(f"{path}: fan_in_fan_out=true (Conv1D bases) is not supported")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):
        raise PeftImportError(f"{path}: target_modules is a regex ({modules!r}); give a list of module names")
    unknown = [m for m in modules if m not in _MODULE_TARGET]
    if unknown:
        raise PeftImportError(f"{path}: target_modules {unknown} have no counterpart in our model; known: "
                              f"{sorted(_MODULE_TARGET)}")
    return "ia3" if kind == "IA3" else ("dora" if cfg.get("use_dora") else "lora")


def _lora_groups(tensors: dict, cfg: dict, model_cfg, r: int, dora: bool):
    """{target: {layer: [(module, A or None, B or None, magnitude or None), ...]}} for the targeted groups."""
    modules = set(cfg["target_modules"])
    targets = [t for t in HF_MODULES if t not in ("embedding", "output") and modules & {m.split(".")[-1] for m in HF_MODULES[t]}]
    if modules & {"embed_tokens", "lm_head"}:
        raise PeftImportError("LoRA on embed_tokens / lm_head does not import yet; adapt only the linear layers")
    groups = {}
    for t in targets:
        groups[t] = {}
        for i in range(model_cfg.num_layers):
            entries = []
            for m in HF_MODULES[t]:
                p = f"model.layers.{i}.{m}"
                if m.split(".")[-1] in modules:
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
            groups[t][i] = entries
    return targets, groups


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


def import_peft(peft_dir, out_dir, model_cfg, base: dict | None = None) -> dict:
    """Write our adapter for ``model_cfg`` (its config.json/config.yaml architecture) from an HF PEFT
    directory; returns the adapter.yaml contents."""
    from framework.checkpoint.adapter import expected_shapes

    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    cfg, tensors = _read(peft_dir)
    method = _check_config(cfg, peft_dir / PEFT_CONFIG)
    meta = {"format_version": FORMAT_VERSION, "method": method,
            "base": dict(base or {"name": cfg.get("base_model_name_or_path")}), "model": model_cfg.to_dict(),
            "imported_from": str(peft_dir)}
    if method == "ia3":
        wanted = {"k_proj": "k", "v_proj": "v", "down_proj": "fc2"}
        targets = [t for m, t in wanted.items() if m in cfg["target_modules"]]
        out = {}
        for t in targets:
            for i in range(model_cfg.num_layers):
                key = f"model.layers.{i}.{IA3_MODULES[t]}.ia3_l"
                if key not in tensors:
                    raise PeftImportError(f"{key} is missing from {peft_dir / PEFT_WEIGHTS}")
                out[key] = tensors.pop(key)
        meta.update(targets=targets, target_modules=target_modules("ia3", targets))
    else:
        r = int(cfg["r"])
        scale = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        targets, groups = _lora_groups(tensors, cfg, model_cfg, r, method == "dora")
        want = expected_shapes(model_cfg, targets, 1, method)  # rank 1: read fan-in/fan-out from the shapes
        fused = {}
        for t in targets:
            for i, entries in groups[t].items():
                fan_in = want[f"model.layers.{i}.{entries[0][0]}.lora_A.weight"][1]
                fused[(t, i)] = _fuse(entries, r, fan_in)
        R = max(A.shape[0] for A, _ in fused.values())
        out = {}
        for (t, i), (A, Bs) in fused.items():
            A_pad = torch.zeros(R, A.shape[1], dtype=A.dtype)
            A_pad[:A.shape[0]] = A
            for (m, _, _, mag), b in zip(groups[t][i], Bs):
                p = f"model.layers.{i}.{m}"
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
                    target_modules=target_modules(method, targets), hf_rank=r)
    if tensors:
        raise PeftImportError(f"{peft_dir / PEFT_WEIGHTS} holds {len(tensors)} tensor(s) the config does not "
                              f"explain, first {sorted(tensors)[0]}")
    check_adapter_tensors(out, model_cfg, meta)
    _write_atomically(out_dir, {k: out[k] for k in sorted(out)}, meta)
    return meta
