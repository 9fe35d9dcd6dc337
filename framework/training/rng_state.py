"""The random-number state of one rank, taken and put back exactly, stored as a safetensors file (no pickle).

One file per rank, ``train_state/rng/tpT-ppP-dpD.safetensors``:

    tensors   ``torch`` (the CPU generator), ``cuda`` (this rank's device generator, when there is one) and
              ``tracker/NAME`` for each of megatron's RNG-tracker states (the tensor-parallel streams that
              dropout draws from), all the generators' own uint8 state bytes
    metadata  (the safetensors header's string map) ``python`` and ``numpy``: the Mersenne-Twister states
              of ``random`` and ``numpy.random`` as JSON (integers, and a float whose JSON text round-trips
              exactly); ``tracker_generators``: the tracker entries that are ``torch.Generator`` objects
              (megatron's CUDA-graph-safe tracker) with their device, the others being state tensors

Reading never unpickles anything: safetensors parses a JSON header and raw bytes, and the JSON becomes
ints, floats and strings. On a CPU the compatibility layer (framework/runtime/cpu_compat.py) makes
megatron's tracker states copies of the CPU generator's state, so they are uint8 tensors here too.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framework.runtime.errors import CheckpointError

SUFFIX = ".safetensors"
FORMAT = "framework-rng-state"
VERSION = "1"
_TRACKER = "tracker/"


def rng_state() -> dict:
    """This process's RNG state: python, numpy, torch CPU, CUDA (if available) and megatron's tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": {k: v.clone() if torch.is_tensor(v) else v
                         for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Put back a state of :func:`rng_state` or :func:`read_rng_file`."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = get_cuda_rng_tracker()
    current = tracker.get_states()
    states = {}
    for name, value in state["tracker"].items():
        device = state.get("tracker_generators", {}).get(name)
        if device is None or isinstance(value, torch.Generator):
            states[name] = value
            continue
        # a graph-safe tracker keeps generator objects: set the one it has (or a new one) to the saved bytes
        generator = current.get(name) if isinstance(current.get(name), torch.Generator) else torch.Generator(device)
        generator.set_state(value)
        states[name] = generator
    tracker.set_states(states)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def save_rng_file(path, state: dict) -> None:
    """Write ``state`` (:func:`rng_state`) to ``path``, atomically (a temporary file renamed into place)."""
    path = Path(path)
    version, internal, gauss_next = state["python"]
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    tensors = {"torch": _bytes(state["torch"])}
    if state.get("cuda") is not None:
        tensors["cuda"] = _bytes(state["cuda"])
    generators = {}
    for key, value in state["tracker"].items():
        if isinstance(value, torch.Generator):
            generators[key] = str(value.device)
            value = value.get_state()
        tensors[_TRACKER + key] = _bytes(value)
    metadata = {"format": FORMAT, "version": VERSION,
                "python": json.dumps({"version": version, "state": list(internal), "gauss_next": gauss_next}),
                "numpy": json.dumps({"bit_generator": name, "keys": [int(k) for k in keys], "pos": int(pos),
                                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}),
                "tracker_generators": json.dumps(generators)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _ints(value, count: int, what: str) -> list:
    if not (isinstance(value, list) and len(value) == count and all(type(v) is int for v in value)):
        raise ValueError(f"{what}: expected {count} integers")
    return value


def read_rng_file(path) -> dict:
    """The state written by :func:`save_rng_file` (for :func:`set_rng_state`); CheckpointError naming the
    file if it is not one."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
                             f"version {VERSION!r}")
        py, npy = json.loads(meta["python"]), json.loads(meta["numpy"])
        generators = json.loads(meta.get("tracker_generators", "{}"))
        gauss_next = py["gauss_next"]
        if not (gauss_next is None or isinstance(gauss_next, float)) or type(py["version"]) is not int:
            raise ValueError("python: version must be an integer and gauss_next a float or null")
        python = (py["version"], tuple(_ints(py["state"], 625, "python state")), gauss_next)
        if npy["bit_generator"] != "MT19937" or not all(type(npy[k]) is int for k in ("pos", "has_gauss")) \
                or not isinstance(npy["cached_gaussian"], float):
            raise ValueError("numpy: expected an MT19937 state with integer pos, has_gauss and a float cached_gaussian")
        numpy_state = ("MT19937", np.array(_ints(npy["keys"], 624, "numpy keys"), dtype=np.uint32), npy["pos"],
                       npy["has_gauss"], npy["cached_gaussian"])
        for key, tensor in tensors.items():
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise ValueError(f"tensor {key!r}: expected a 1-D uint8 generator state, got {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
        if "torch" not in tensors:
            raise ValueError("no 'torch' tensor (the CPU generator's state)")
        random.Random().setstate(python)  # the generators' own checks of ranges and lengths, on throwaways
        np.random.RandomState().set_state(numpy_state)
        tracker = {k[len(_TRACKER):]: v for k, v in tensors.items() if k.startswith(_TRACKER)}
        if not isinstance(generators, dict) or not set(generators) <= set(tracker) \
                or not all(isinstance(d, str) for d in generators.values()):
            raise ValueError("tracker_generators: expected {tracker name: device}")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors, JSON, missing keys, wrong types: name the file
        raise CheckpointError(f"{path}: not an RNG state file of this framework ({type(e).__name__}: {e})") from None
    state = {"python": python, "numpy": numpy_state, "torch": tensors["torch"], "tracker": tracker,
             "tracker_generators": generators}
    if "cuda" in tensors:
        state["cuda"] = tensors["cuda"]
    return state
