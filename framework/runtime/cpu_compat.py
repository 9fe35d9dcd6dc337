"""Run megatron-core on a machine without CUDA.

megatron-core assumes a GPU in a few dozen places: it allocates with
``device=torch.cuda.current_device()`` or a literal ``device="cuda"``, synchronises streams and keeps
its tensor-parallel RNG streams in CUDA generators. Everything else (parallel layers, schedules, DDP,
optimizer, dist_checkpointing) is plain torch and runs on CPU with gloo.

Rather than patching ``torch`` globally (which would change behaviour for every library in the
process), this layer rebinds the module-global name ``torch`` *inside megatron-core modules only* to a
proxy. The proxy forwards everything to the real torch, except:

* ``torch.cuda.current_device()`` -> ``"cpu"``; ``synchronize``/``empty_cache`` -> no-ops;
  ``current_stream()`` -> a stream object whose waits do nothing;
* ``torch.cuda.{get_rng_state, set_rng_state, manual_seed}`` -> the CPU generator, so megatron's RNG
  tracker forks the generator that CPU dropout and initialisation actually draw from;
* tensor factories called with ``device="cuda"`` get ``device="cpu"``.

Each served call is recorded by call site and logged once at DEBUG. A call from a megatron module
that is not in :data:`SERVED_MODULES` raises :class:`CpuCompatError` naming the file, line and the
call: a megatron upgrade that adds a CUDA-only call fails loudly instead of deep inside torch.

Three sites are not reachable through the ``torch`` name (``Tensor.type()`` compared to
``'torch.cuda.FloatTensor'`` in gradient clipping, the CUDA-generator helpers in
``tensor_parallel/random.py``, and ``weight.data.cuda()`` when the last pipeline stage copies tied
embeddings in ``LanguageModule.setup_embeddings_and_output_layer``); those functions are replaced by
CPU equivalents, listed in :data:`REPLACED_FUNCTIONS` and :func:`_keep_tied_copy_on_cpu`. The
distributed optimizer's constructor also compares ``Tensor.type()`` to CUDA names
(:func:`_distributed_optimizer_on_cpu`).

The linear layers' autograd functions are decorated with ``custom_fwd/custom_bwd(device_type="cuda")``,
so under CPU autocast (``precision=bf16``) their backward would run without autocast and multiply bf16
gradients by fp32 weights; :func:`_autocast_linears_on_cpu` re-decorates them for the CPU.
"""

from __future__ import annotations

import collections
import importlib
import logging
import sys
import types

import torch

log = logging.getLogger(__name__)

# megatron-core modules whose CUDA-only calls are known to be device bookkeeping only (allocation
# device, stream sync, RNG generator choice) and therefore safe to serve on the CPU.
SERVED_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.moe.router",  # moves the router weight to current_device() on first use
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    # background saves: synchronize() before forking the writer, int tensors for the all-reduces of finalization
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.models.common.language_module.language_module",
)

REPLACED_FUNCTIONS = (
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
)

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "eye", "linspace", "tril", "triu",
)

served_sites: collections.Counter = collections.Counter()
_active = False


class CpuCompatError(RuntimeError):
    """A megatron-core call site needs CUDA and is not known to be safe to serve on the CPU."""


def _caller(depth: int = 2):
    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", "?"), frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def _serve(what: str) -> None:
    module, filename, lineno, func = _caller(3)
    if not module.startswith("megatron.") or module in SERVED_MODULES:
        key = f"{module}:{func}:{lineno} {what}"
        if key not in served_sites:
            log.debug("cpu_compat served %s", key)
        served_sites[key] += 1
        return
    raise CpuCompatError(
        f"{filename}:{lineno} (in {module}.{func}) calls {what}, which needs CUDA. The CPU "
        f"compatibility layer (framework/runtime/cpu_compat.py) serves only the megatron-core modules "
        f"in SERVED_MODULES; read that call site and, if it only chooses a device or syncs a stream, "
        f"add {module!r} there."
    )


class _NullStream:
    def wait_stream(self, *_a, **_k):
        pass

    def record_event(self, *_a, **_k):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CudaProxy(types.ModuleType):
    """Stands in for ``torch.cuda`` inside megatron modules."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    def current_device(self):
        _serve("torch.cuda.current_device()")
        return "cpu"

    def synchronize(self, *_a, **_k):
        _serve("torch.cuda.synchronize()")

    def empty_cache(self):
        _serve("torch.cuda.empty_cache()")

    def current_stream(self, *_a, **_k):
        _serve("torch.cuda.current_stream()")
        return _NullStream()

    def get_rng_state(self, *_a, **_k):
        _serve("torch.cuda.get_rng_state()")
        return torch.get_rng_state()

    def set_rng_state(self, state, *_a, **_k):
        _serve("torch.cuda.set_rng_state()")
        torch.set_rng_state(state)

    def manual_seed(self, seed):
        _serve("torch.cuda.manual_seed()")
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        _serve("torch.cuda.manual_seed_all()")
        torch.manual_seed(seed)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare int is a CUDA ordinal in megatron's usage


def _cpu_factory(name):
    real = getattr(torch, name)

    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            _serve(f"torch.{name}(device={kwargs['device']!r})")
            kwargs["device"] = "cpu"
        return real(*args, **kwargs)

    factory.__name__ = name
    return factory


class _TorchProxy(types.ModuleType):
    """Stands in for ``torch`` inside megatron modules; see the module docstring."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaProxy()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(name))

    def __getattr__(self, name):
        return getattr(torch, name)


# --- functions replaced whole -------------------------------------------------------------------

def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # Same as megatron's, minus the assertion that gradients are torch.cuda.FloatTensor.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


_REPLACEMENTS = {
    "_get_cuda_rng_state": _get_cpu_rng_state,
    "_set_cuda_rng_state": _set_cpu_rng_state,
    "clip_grad_by_total_norm_fp32": _clip_grad_by_total_norm_fp32,
}


class _QuietCpuRngWarning(logging.Filter):
    # megatron warns when the CPU generator changes inside its CUDA-RNG fork; on CPU the fork *is* the
    # CPU generator, so the warning is expected and says nothing.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _keep_tied_copy_on_cpu() -> None:
    """Under PP with tied embeddings the last stage moves its output-weight copy with ``Tensor.cuda()``
    before all-reducing it from the first stage; on CPU that move must be a no-op, for that call only."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_cpu_compat", False):
        return

    def setup_embeddings_and_output_layer(self):
        real_cuda = torch.Tensor.cuda

        def stay_on_cpu(t, *_a, **_k):
            _serve("Tensor.cuda()")
            return t

        torch.Tensor.cuda = stay_on_cpu
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = real_cuda

    setup_embeddings_and_output_layer._cpu_compat = True
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _autocast_linears_on_cpu() -> None:
    from megatron.core.tensor_parallel import layers

    for cls in (layers.LinearWithFrozenWeight, layers.LinearWithGradAccumulationAndAsyncCommunication):
        if getattr(cls, "_cpu_compat", False):
            continue
        fwd, bwd = cls.forward, cls.backward  # staticmethods resolve to the decorated functions
        cls.forward = staticmethod(torch.amp.custom_fwd(getattr(fwd, "__wrapped__", fwd), device_type="cpu"))
        cls.backward = staticmethod(torch.amp.custom_bwd(getattr(bwd, "__wrapped__", bwd), device_type="cpu"))
        cls._cpu_compat = True


def _megatron_modules():
    return [m for n, m in list(sys.modules.items()) if n.startswith("megatron.core") and m is not None]


def enable() -> None:
    """Install the layer into every loaded megatron-core module. Idempotent; never on CUDA machines."""
    global _active
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.enable() called on a machine with CUDA; the runtime must not do this")
    # Import the modules with known sites first, so they are patched even before the caller uses them.
    for name in SERVED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a module that this megatron-core version does not have
            log.debug("cpu_compat: %s not present in this megatron-core", name)
    proxy = _TorchProxy()
    for module in _megatron_modules():
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    for path in REPLACED_FUNCTIONS:
        mod_name, func = path.rsplit(".", 1)
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, func):
            setattr(mod, func, _REPLACEMENTS[func])
    _keep_tied_copy_on_cpu()
    _autocast_linears_on_cpu()
    _router_gemm_without_te()
    _distributed_optimizer_on_cpu()
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_QuietCpuRngWarning())
    _active = True
    log.debug("cpu_compat enabled for %d megatron modules", len(_megatron_modules()))


def _distributed_optimizer_on_cpu() -> None:
    """megatron's DistributedOptimizer sorts parameters by ``Tensor.type()`` compared to
    'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' while its constructor builds the shards; on CPU
    the names lack '.cuda' and it raises. During that constructor only, ``type()`` (no arguments) of a CPU
    tensor answers with the CUDA name of the same dtype."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.__init__
    if getattr(original, "_cpu_compat", False):
        return

    def __init__(self, *args, **kwargs):
        real_type = torch.Tensor.type

        def cuda_named(t, *a, **k):
            name = real_type(t, *a, **k)
            if a or k or t.is_cuda:
                return name
            _serve("Tensor.type()")
            return name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = cuda_named
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.type = real_type

    __init__._cpu_compat = True
    DistributedOptimizer.__init__ = __init__


def _router_gemm_without_te() -> None:
    """megatron-core 0.16.1's moe_utils imports ``te_general_gemm`` inside ``try`` and, when Transformer
    Engine is absent, never binds the name, so the MoE router's ``is not None`` check raises NameError.
    Binding it to None selects the plain ``torch.mm`` path that module already has."""
    mod = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if mod is not None and not hasattr(mod, "te_general_gemm"):
        mod.te_general_gemm = None


def refresh() -> None:
    """Patch megatron modules imported after :func:`enable` (cheap; call before building models)."""
    if _active:
        enable()


def is_active() -> bool:
    return _active
