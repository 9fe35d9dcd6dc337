"""Run a function in N local processes under torch.distributed, as torchrun would, and collect results.

Used by tests and benchmarks to check every parallel layout on one machine, and by the converters to run a
conversion at TP x PP ranks without torchrun; it is an entry-point tool, not part of the library. Each child gets torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on a free port, calls
``fn(*args, **kwargs)`` and sends back its return value (which must pickle) or its traceback. The
parent raises if any rank fails or the whole run exceeds ``timeout`` seconds; no child outlives it.

Children come from a fork server that has already imported torch, megatron-core and transformers:
a fresh interpreter spends ~4.5 s on those imports, a fork from the server ~0.05 s, and the test suite
starts several hundred process groups. The server is forked before any torch op runs, so no thread
pool or communicator is inherited. Because the server's environment is frozen when it starts, each
child gets the parent's environment as it is at the call.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback

from framework.runtime.distributed import free_port


class DistributedRunError(RuntimeError):
    pass


_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "transformers",
            "framework.models.gpt", "framework.training.step"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # modules that fail to import are skipped by the server
    return ctx


def _child(fn, rank, world, port, q, args, kwargs, env):
    os.setpgid(0, 0)  # a process group of its own, so the parent can end it with everything it started
    os.environ.clear()
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        result = fn(*args, **kwargs)
        q.put((rank, True, result))
    except BaseException:  # report everything, including SystemExit from argument errors
        q.put((rank, False, traceback.format_exc()))
    finally:
        from framework.runtime.distributed import shutdown

        try:
            shutdown()
        except Exception:
            pass


def end_group(p) -> None:
    """Kill process ``p`` and whatever it started that is still running (megatron's checkpoint writer starts
    a multiprocessing manager, which outlives a killed rank otherwise); ``p`` must lead its process group."""
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
    p.join()


def run_distributed(fn, world_size: int, *args, timeout: float = 300, env: dict | None = None, **kwargs):
    """Return [result of rank 0, ..., result of rank world_size-1]."""
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    # Not daemonic: megatron's checkpoint writer starts processes of its own. The finally below reaps them.
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, q, args, kwargs, env), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedRunError(f"timed out after {timeout}s; ranks done: {sorted(results)}, "
                                          f"failed: {sorted(errors)}")
            try:
                rank, ok, payload = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # A rank died without reporting (segfault, OOM kill): do not wait for the others.
                    raise DistributedRunError(f"rank(s) {dead} exited with codes "
                                              f"{[procs[i].exitcode for i in dead]} without a report")
                continue
            (results if ok else errors)[rank] = payload
            if errors:
                break  # the others are probably blocked in a collective with the failed rank
    finally:
        for p in procs:
            p.join(timeout=0.1 if errors else 5)
            end_group(p)
    if errors:
        rank = min(errors)
        raise DistributedRunError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
