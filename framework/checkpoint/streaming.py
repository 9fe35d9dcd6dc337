"""Checkpoint weights written and read one parameter at a time (what bounds the converters' memory).

Three pieces, all producing and reading exactly megatron's ``torch_dist`` format (the same keys, global
shapes, chunk offsets, main replicas, ``.metadata``, ``common.pt``, ``metadata.json`` and
``__RANK_THREAD.distcp`` files as ``dist_checkpointing.save``), so ``ckpt_format.load_checkpoint_into``
loads the result at any TP/PP:

* :func:`skeleton` -- this rank's model stage built by its family with every tensor megatron allocates
  through ``torch.empty`` on the meta device: the parameters have names, shapes, dtypes and the views
  megatron's ``sharded_state_dict()`` takes of them, but no storage and no (random) initialisation.
* :class:`StreamingSave` -- a ``dist_checkpointing`` save strategy. With ``values`` (our parameter name
  -> its tensor on this rank), the data of every ShardedTensor is taken from ``values`` when torch DCP's
  writer reaches that item: the ShardedTensor's data is a view (layer slice, swiglu half, the whole
  tensor) of a skeleton parameter, and the same view (size, stride, offset) of the computed value is
  written. Items are grouped by parameter, each group written by one writer thread, so a parameter is
  computed once and dropped when its last item is written. Without ``values`` the model's own tensors are
  written (the training job's save). Either way nothing is staged: megatron's own writer copies every
  tensor into a CPU buffer before writing; here each item goes from its tensor to the file. The SHA-256
  of every ``.distcp`` file is computed from the bytes as they are written (``sha256`` after the save).
* :class:`CheckpointParams` -- a read-only mapping {parameter name: tensor} over a skeleton and a
  checkpoint: each lookup reads that one parameter (torch DCP reads only the stored chunks it overlaps,
  one chunk in memory at a time) into a fresh tensor, without collectives.

Peak memory of a conversion is then the interpreter and libraries plus, per writer thread, one
parameter's value, the HF tensor(s) it is made of and one item being serialised; the largest is the
embedding or output layer (vocab x hidden).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter, _item_size, _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.overrides import TorchFunctionMode

from framework.models.config import ModelConfig
from framework.models.registry import get_family
from framework.peft.wrapping import base_sharded_state_dict
from framework.runtime.errors import CheckpointError


# -- the skeleton ------------------------------------------------------------------------------------------
class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device -> on the meta device (megatron's CPU initialisation path creates
    every weight that way; small tensors made otherwise, e.g. norms' ``torch.ones``, stay real), and
    in-place operations on meta tensors (the random initialisation: ``normal_``, ``zero_``, ...) skipped:
    they have nothing to fill, and torch's meta kernel for ``normal_`` alone imports torch._dynamo."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        if getattr(func, "__name__", "") in _FILLS:
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


#: in-place initialisations and fills (Tensor methods and torch.nn.init functions) skipped on meta tensors
_FILLS = frozenset({"normal_", "uniform_", "zero_", "fill_", "copy_", "trunc_normal_", "constant_", "ones_",
                    "zeros_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                    "orthogonal_"})


@contextlib.contextmanager
def _skeleton_build():
    """While building a skeleton: CUDA hidden (the family builds its CPU variant: local layer spec, CPU
    initialisation, no ``.cuda()``; the checkpoint keys are the same as the GPU variant's), and megatron's
    construction-time all-reduce of tied embedding copies (PP > 1) skipped for meta tensors, which have
    no values to reduce (the converter fills both copies)."""
    real_available, real_all_reduce = torch.cuda.is_available, dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        if tensor.is_meta:
            return None
        return real_all_reduce(tensor, *args, **kwargs)

    torch.cuda.is_available = lambda: False
    dist.all_reduce = all_reduce
    try:
        with _EmptyOnMeta():
            yield
    finally:
        torch.cuda.is_available, dist.all_reduce = real_available, real_all_reduce


def skeleton(model_cfg: ModelConfig, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32):
    """This rank's model stage (process groups must exist) with its weights on the meta device."""

    build = get_family(model_cfg.family).build
    settings = {}
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(build).parameters.values()):
        # no random initialisation at all (a builder that takes TransformerConfig fields): megatron's
        # initialisation would otherwise split and concatenate meta tensors, whose meta kernels import
        # torch._dynamo (seconds and ~70 MB); _EmptyOnMeta skips the fills either way
        settings["perform_initialization"] = False
    with _skeleton_build():
        return build(model_cfg, tp, pp, False, params_dtype=dtype, **settings)


# -- writing ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Source:
    """A ShardedTensor's data as a view of parameter ``name``: ``as_strided(size, stride, offset)``."""

    name: str
    size: tuple
    stride: tuple
    offset: int


def _sources(sharded_state_dict: dict, model) -> dict[tuple[str, tuple], _Source]:
    """{(checkpoint key, global offset): source} for every main-replica ShardedTensor of ``model``'s
    parameters (after factories: their data are the parameters or views of them)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    owners = {id(p): (n, p) for n, p in model.named_parameters()}
    out = {}
    for st in nested_values(sharded_state_dict):
        if not isinstance(st, ShardedTensor) or st.data is None or not is_main_replica(st.replica_id):
            continue  # replicas are not written (megatron keeps only the main one)
        data = st.data
        owner = owners.get(id(data)) or (owners.get(id(data._base)) if data._base is not None else None)
        if owner is None:
            continue  # not a parameter (a buffer): written from its own data
        name, param = owner
        out[(st.key, tuple(st.global_offset))] = _Source(
            name, tuple(data.shape), tuple(data.stride()), data.storage_offset() - param.storage_offset())
    return out


class _HashingSink(io.RawIOBase):
    """A write-only, non-seekable view of an open file that hashes and counts what passes through it
    (``torch.save`` then writes its zip stream sequentially); closing it leaves the file open."""

    def __init__(self, raw):
        self.raw, self.sha, self.position = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.raw.write(b)
        self.sha.update(b)
        self.position += n
        return n

    def close(self) -> None:
        if not self.closed and not self.raw.closed:
            self.raw.flush()
        super().close()


def _writer_class():
    class StreamingWriter(FileSystemWriter):
        """torch's FileSystemWriter (planning, file names, ``.metadata``) with our own item loop.

        torch's loop keeps a reference to every tensor it has written to a file until the file is
        complete (``tensor_dict``, used only by its safetensors format), which would hold a whole thread's
        share of the model. Here each item is resolved, serialised exactly as torch's loop does
        (``torch.save`` of a tensor owning just its bytes, or the bytes of a BytesIO), recorded and
        dropped. The items are grouped by parameter (``group_of``), groups dealt to the thread with the
        fewest bytes so far; one file per thread, fsync'ed, SHA-256 of its bytes in ``digests``.
        """

        def __init__(self, path, thread_count: int, group_of: Callable):
            super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count)
            self.group_of = group_of
            self.digests: dict[str, str] = {}

        def _buckets(self, items) -> list[list]:
            groups: dict = {}
            for item in items:  # plan order; a parameter's items stay together, in order
                groups.setdefault(self.group_of(item), []).append(item)
            buckets: list[list] = [[] for _ in range(self.thread_count)]
            sizes = [0] * self.thread_count
            for group in groups.values():
                k = sizes.index(min(sizes))
                buckets[k] += group
                sizes[k] += sum(_item_size(i) for i in group if i.type != WriteItemType.BYTE_IO)
            return buckets

        def _write_file(self, name: str, items, planner) -> list:
            results = []
            with open(Path(self.path) / name, "wb") as f:
                sink = _HashingSink(f)
                for item in items:
                    data = planner.resolve_data(item)
                    offset = sink.position
                    if item.type == WriteItemType.BYTE_IO:
                        sink.write(data.getbuffer())
                    else:
                        data = data.detach().cpu()
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # torch.save writes whole storages
                        torch.save(data, sink)
                    results.append(WriteResult(index=item.index, size_in_bytes=sink.position - offset,
                                               storage_data=_StorageInfo(name, offset, sink.position - offset)))
                    del data
                f.flush()
                os.fsync(f.fileno())
            self.digests[name] = sink.sha.hexdigest()
            return results

        def write_data(self, plan, planner):
            buckets = self._buckets(plan.items)
            names = [f"{plan.storage_data.prefix}{k}{DEFAULT_SUFFIX}" for k in range(len(buckets))]
            results: list = [None] * len(buckets)
            errors: list = []

            def run(k):
                try:
                    results[k] = self._write_file(names[k], buckets[k], planner)
                except BaseException as e:  # re-raised in the calling thread
                    errors.append(e)

            threads = [threading.Thread(target=run, args=(k,)) for k in range(1, len(buckets))]
            for t in threads:
                t.start()
            run(0)
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            fut: Future = Future()
            fut.set_result([r for part in results for r in part])
            return fut

    return StreamingWriter


def _planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazyPlanner(MCoreSavePlanner):
        """Resolves a write item whose tensor comes from a parameter through ``values``; one parameter
        value is kept per writer thread (its items are consecutive in that thread's file)."""

        def __init__(self, sources: dict, values: Callable | None, on_value: Callable | None):
            super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
            self.sources, self.values, self.on_value = sources, values, on_value
            self.local = threading.local()

        def source_of(self, item):
            offset = tuple(item.index.offset) if item.index.offset is not None else ()
            return self.sources.get((item.index.fqn, offset))

        def resolve_data(self, write_item):
            src = self.source_of(write_item) if self.values is not None else None
            if src is None:
                data = super().resolve_data(write_item)
                if isinstance(data, torch.Tensor) and data.is_meta:
                    raise CheckpointError(f"tensor {write_item.index.fqn!r} has no data (a meta tensor that is "
                                          f"not a model parameter) and cannot be written")
                return data
            cached = getattr(self.local, "value", None)
            if cached is None or cached[0] != src.name:
                self.local.value = None  # drop the previous parameter before computing the next
                value = self.values(src.name).contiguous()
                self.local.value = cached = (src.name, value)
                if self.on_value is not None:
                    self.on_value(src.name)
            value = cached[1]
            view = value.as_strided(src.size, src.stride, value.storage_offset() + src.offset)
            return view.reshape(write_item.tensor_data.chunk.sizes)

    return LazyPlanner


def _save_strategy_class():
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy

    class StreamingSave(SaveShardedStrategy):
        """megatron's torch_dist save, written item by item (see the module docstring)."""

        def __init__(self, model, values: Callable | None = None, thread_count: int = 2,
                     on_value: Callable | None = None):
            super().__init__("torch_dist", 1)
            self.model, self.values, self.thread_count, self.on_value = model, values, thread_count, on_value
            self.sha256: dict[str, str] = {}

        @property
        def can_handle_sharded_objects(self) -> bool:
            return True

        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            from megatron.core.dist_checkpointing.strategies.torch import (_replace_state_dict_keys_with_sharded_keys,
                                                                           mcore_to_pyt_state_dict)

            sources = _sources(sharded_state_dict, self.model) if self.values is not None else {}
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            pyt_state_dict = mcore_to_pyt_state_dict(sd, False)
            planner = _planner_class()(sources, self.values, self.on_value)

            def group_of(item):
                src = planner.source_of(item)
                return ("param", src.name) if src is not None else ("item", item.index)

            writer = _writer_class()(checkpoint_dir, self.thread_count, group_of)
            try:
                dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
            except dcp.CheckpointException as e:  # raise this rank's own error (e.g. an HFImportError) as is
                failures = getattr(e, "failures", {}) or {}
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                mine = failures.get(rank)
                if isinstance(mine, Exception):
                    raise mine from None
                raise
            self.sha256 = dict(writer.digests)

    return StreamingSave


def streaming_save(model, values: Callable | None = None, thread_count: int = 2, on_value: Callable | None = None):
    """A :class:`StreamingSave` strategy for ``dist_checkpointing.save(..., sharded_strategy=...)``."""
    return _save_strategy_class()(model, values, thread_count, on_value)


# -- reading ---------------------------------------------------------------------------------------------
def _without_prepended_axes(st):
    """The same ShardedTensor with megatron's prepended (layer-stacking) axes made real size-1 axes of
    its data. megatron's legacy conversion of prepended-axis tensors cannot load one layer of a stack in
    a single process; the equivalent tensor without prepended axes takes torch DCP's regular path, which
    reads any sub-region. Same key, offsets and global shape, so the same stored chunks are read."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(st, ShardedTensor) or not st.prepend_axis_num:
        return st
    shape = (1,) * st.prepend_axis_num + tuple(st.local_shape)
    return dataclasses.replace(st, data=st.data.view(shape), local_shape=shape, prepend_axis_num=0,
                               axis_fragmentations=None)


class CheckpointParams(Mapping):
    """{our parameter name: tensor} of a skeleton's stage, each read from ``weights_dir`` when looked up.

    ``params``: {name: the skeleton's (meta) tensor} to offer (default: the skeleton's parameters); each
    lookup returns a new tensor with that tensor's shape and dtype (stored values are cast); nothing is
    cached. No collectives: ranks read independently. A checkpoint lacking the tensor or holding another
    global shape raises CheckpointError naming the parameter.
    """

    def __init__(self, model, weights_dir, params: dict | None = None):
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import \
            CachedMetadataFileSystemReader

        self.weights_dir = Path(weights_dir)
        self.params = dict(params) if params is not None else dict(model.named_parameters())
        self.sharded = base_sharded_state_dict(model)
        self.reader = CachedMetadataFileSystemReader(str(self.weights_dir))  # .metadata read once

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self):
        return iter(self.params)

    def __contains__(self, name) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> torch.Tensor:
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
        from megatron.core.dist_checkpointing.strategies.torch import (MCoreLoadPlanner,
                                                                       _replace_state_dict_keys_with_sharded_keys,
                                                                       mcore_to_pyt_state_dict)

        param = self.params[name]
        value = torch.empty(param.shape, dtype=param.dtype)
        # the parameter's sharded entry (a ShardedTensor or a factory such as swiglu's) over ``value``:
        # factories and prepended axes give views of ``value``, which DCP fills in place
        sub = {name: dataclasses.replace(self.sharded[name], data=value)}
        apply_factories(sub)
        dict_list_map_inplace(_without_prepended_axes, sub)
        tensors = [st for st in nested_values(sub) if isinstance(st, ShardedTensor)]
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sub, keep_only_main_replica=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP's note that no_dist reads in this process only
                dcp.load(mcore_to_pyt_state_dict(flat, True), storage_reader=self.reader,
                         planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=tensors), no_dist=True)
        except Exception as e:  # DCP / megatron raise assorted types; name the parameter and the directory
            keys = sorted({st.key for st in tensors})
            raise CheckpointError(f"cannot read parameter {name!r} (checkpoint tensor(s) {keys}) from "
                                  f"{self.weights_dir}: {type(e).__name__}: {e}") from e
        return value
