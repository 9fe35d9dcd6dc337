"""LoRA initialisations from the base weight, as HF PEFT's ``init_lora_weights="pissa"``,
``"pissa_niter_<n>"`` and ``"olora"`` compute them (peft/tuners/lora/layer.py, ``pissa_init``/``olora_init``):

    PiSSA (Meng et al. 2024):  W = U S V^T (fp32 SVD; pissa_niter_<n>: torch.svd_lowrank with n iterations)
                               A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s)     so  s B A = U_r S_r V_r^T
    OLoRA (Buyukakyuz 2024):   W = Q R (fp32 QR);  A = R[:r],  B = Q[:, :r]
    both:                      W <- W_res = W - s B A                            so the model starts unchanged

s is LoRA's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA). The base weight is modified.

Each factorisation is taken on a Hugging Face module's full weight -- q, k and v separately for our fused
``linear_qkv``, gate and up for a gated ``linear_fc1``, the whole matrix otherwise -- exactly the matrix HF
PEFT factorises on the HF model. Under tensor parallelism the shards are gathered over TP (one layer at a
time), every rank computes the same factorisation, and keeps its shard of W_res and of the factors: every
layout starts from the same model, the one HF PEFT starts from.

A fused layer holds one LoRA pair per HF module: our layer's single (A, B) becomes a LoRA of k times the rank
(k = 3 for q/k/v, 2 for gate/up), exactly::

    [s B_q A_q; s B_k A_k; s B_v A_v] = s blockdiag(B_q, B_k, B_v) [A_q; A_k; A_v]

A = cat(A_q, A_k, A_v) (shared), each module's B rows hold its B in its own column block and zeros
elsewhere; the scale stays s (that of rank r). Training moves the zero blocks too (HF's three pairs would
not have them): the start is HF's, the parameterisation is a superset.

``pissa_niter_<n>`` is randomised (torch.svd_lowrank draws a Gaussian test matrix): each HF module draws from
its own seed (the run seed, layer and target mixed as for A's default initialisation, plus the module's
index), the same on every TP rank and at every layout.
"""

from __future__ import annotations

import re

import torch

from framework.peft.hf_sources import source_layout

#: A's initialisations that leave the base alone (HF PEFT's True and "gaussian")
PLAIN_INITS = ("kaiming", "gaussian")
#: initialisations from the base weight, which they modify (plus pissa_niter_<n>)
BASE_INITS = ("pissa", "olora")
_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def init_problem(init) -> str | None:
    """Why ``init`` is not an initialisation we take (None when it is)."""
    if isinstance(init, str) and (init in PLAIN_INITS + BASE_INITS or _NITER.fullmatch(init)):
        return None
    return (f"expected one of {list(PLAIN_INITS + BASE_INITS)} or pissa_niter_<n> (n >= 1 iterations of a "
            f"randomised SVD); kaiming is HF PEFT's init_lora_weights=True")


def modifies_base(init: str) -> bool:
    return init in BASE_INITS or bool(_NITER.fullmatch(init))


def hf_modules_in(target: str, glu_fused: bool) -> int:
    """How many HF modules one of our layers holds for a base-modifying init (its LoRA gets that many blocks)."""
    return 3 if target == "qkv" else 2 if target == "fc1" and glu_fused else 1


def factors(weight: torch.Tensor, rank: int, scaling: float, init: str, seed: int = 0):
    """(A [r, in], B [out, r], W_res) of one full HF weight [out, in], in fp32, as HF PEFT computes them."""
    w = weight.to(torch.float32)
    if init == "olora":
        q, r = torch.linalg.qr(w)
        a, b = r[:rank].contiguous(), q[:, :rank].contiguous()
    else:
        if init == "pissa":
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :rank], s[:rank], uh[:rank]
        else:
            niter = int(_NITER.fullmatch(init).group(1))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vr, sr, ur = torch.svd_lowrank(w, rank, niter=niter)
            uhr = ur.t()
        sr = sr / scaling
        a = torch.diag(torch.sqrt(sr)) @ uhr
        b = vr @ torch.diag(torch.sqrt(sr))
    return a, b, w - scaling * b @ a


@torch.no_grad()
def init_from_base(layer, rank: int, init: str, kv_spec=None, seed: int = 0) -> None:
    """Set ``layer``'s factors from its base weight and replace the base weight by the residual (this rank's
    shards; see the module docstring). ``rank`` is the per-HF-module rank r (``layer.rank`` is k r)."""
    weight = layer.base_layer.weight
    if weight is None:
        raise ValueError(f"{layer.where()}: {init} initialises from the base weight, and this output layer shares "
                         f"the embedding's (tie_word_embeddings); leave 'output' out of peft.targets")
    if isinstance(layer.scaling, torch.Tensor):
        raise ValueError(f"{layer.where()}: {init} needs one LoRA scale per layer")
    sources, to_local = source_layout(layer, weight.detach(), kv_spec)
    k = len(sources)
    if layer.rank != k * rank:
        raise ValueError(f"{layer.where()}: holds {k} HF module(s), so its LoRA rank must be {k} x {rank}, "
                         f"got {layer.rank}")
    a_parts, b_parts, residuals = [], [], []
    for i, w in enumerate(sources):
        if rank > min(w.shape):
            raise ValueError(f"{layer.where()}: rank {rank} exceeds the {tuple(w.shape)} weight's rank bound "
                             f"{min(w.shape)} ({init} takes its first r components)")
        a, b, res = factors(w, rank, layer.scaling, init, seed + i)
        wide = b.new_zeros(b.shape[0], k * rank)
        wide[:, i * rank:(i + 1) * rank] = b
        a_parts.append(a)
        b_parts.append(wide)
        residuals.append(res.to(weight.dtype))
    a = torch.cat(a_parts, dim=0)
    if layer.parallel_mode == "row":
        a_local, b_local = to_local([a]), b_parts[0]
    else:
        a_local, b_local = a, to_local(b_parts)
    weight.copy_(to_local(residuals))
    layer.lora_A.weight.copy_(a_local.to(layer.lora_A.weight.dtype))
    layer.lora_B.weight.copy_(b_local.to(layer.lora_B.weight.dtype))
