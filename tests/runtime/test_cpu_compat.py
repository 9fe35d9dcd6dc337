"""The CPU compatibility layer serves megatron's known CUDA-only calls and refuses unknown ones clearly."""

import pytest
import torch

from launch.spawn import run_distributed


def _probe():
    import sys
    import types

    from framework.runtime import cpu_compat, initialize

    initialize(tp=1, pp=1, seed=0)
    served = sorted(cpu_compat.served_sites)
    # A megatron module this layer has never seen, calling a CUDA-only function.
    fake = types.ModuleType("megatron.core.some_future_module")
    exec("import torch\ndef allocate():\n    return torch.empty(4, device=torch.cuda.current_device())\n",
         fake.__dict__)
    sys.modules[fake.__name__] = fake
    cpu_compat.refresh()
    try:
        fake.allocate()
        unknown = None
    except cpu_compat.CpuCompatError as e:
        unknown = str(e)
    # Outside megatron, torch is the real torch: CUDA calls fail as they always do.
    try:
        torch.cuda.current_device()
        outside = "no error"
    except Exception as e:  # torch raises AssertionError or RuntimeError depending on the build
        outside = type(e).__name__
    return served, unknown, outside, torch.cuda.is_available()


@pytest.mark.timeout(120)
def test_cpu_compat_serves_known_sites_and_refuses_unknown_ones():
    if torch.cuda.is_available():
        pytest.skip("the CPU compatibility layer is never enabled when CUDA is present")
    served, unknown, outside, cuda = run_distributed(_probe, 1, timeout=100)[0]
    assert not cuda
    # Seeding megatron's RNG tracker goes through the CUDA RNG functions: served, and recorded by site.
    assert any(s.startswith("megatron.core.tensor_parallel.random:") and "manual_seed" in s for s in served)
    assert unknown is not None, "an unknown megatron module's CUDA call must not be served silently"
    assert "megatron.core.some_future_module" in unknown and "torch.cuda.current_device()" in unknown
    assert "SERVED_MODULES" in unknown and "<string>:3" in unknown  # names the file and line
    assert outside != "no error"
