"""Worker results that survive the trip back from run_distributed's processes.

A torch tensor put on a multiprocessing queue travels as a shared-memory handle that the parent must
fetch from the child; a child that has already exited leaves the parent with ``FileNotFoundError``.
NumPy arrays pickle by value. Workers return ``to_numpy(result)``; tests read ``to_torch(result)``.
"""

import numpy as np
import torch


def _map(obj, fn):
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return fn(obj)


def to_numpy(obj):
    return _map(obj, lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)


def to_torch(obj):
    return _map(obj, lambda x: torch.from_numpy(x) if isinstance(x, np.ndarray) else x)
