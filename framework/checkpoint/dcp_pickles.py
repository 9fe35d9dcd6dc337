"""The pickles inside a torch distributed checkpoint, checked before megatron's dist_checkpointing reads them.

A ``torch_dist`` directory (a base checkpoint's weights, the optimizer state of a train state) holds three
kinds of pickle: ``.metadata``, which torch's ``FileSystemReader`` reads with plain ``pickle.load``; the
non-tensor items stored as bytes inside the ``*.distcp`` files, which torch's ``DefaultLoadPlanner`` reads with
``torch.load(weights_only=False)`` (megatron's distributed optimizer saves its param groups and bucket sizes
this way); and ``common.pt``, which megatron reads with torch's default (``weights_only=True`` since torch 2.6,
unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set). A directory someone hands us could make the first two run
code. :func:`check_dcp_pickles` reads each one first with a loader that builds nothing but plain data:
``.metadata`` with an unpickler that resolves only torch's checkpoint-metadata classes, ``torch.Size`` and
dtypes; the byte items and ``*.pt`` files with ``torch.load(weights_only=True)``. A pickle that these loaders
accept references only those globals, so the unrestricted loads that follow run nothing else.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from framework.runtime.errors import CheckpointError

METADATA_FILE = ".metadata"

#: the globals a ``.metadata`` pickle of torch's FileSystemWriter (and megatron's async writer) references:
#: dataclasses and enums of torch's checkpoint metadata, torch.Size, dtypes (checked separately), the layout
#: lookup TensorProperties pickles through; none of them runs anything when built
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id when the writer was given a Path
}


#: read from the module's own namespace: ``getattr(torch, name)`` could import a submodule
_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_GLOBALS.get(module, ()) or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of torch's checkpoint metadata")


def read_metadata(path: Path):
    """The ``Metadata`` object of a ``.metadata`` file, unpickled with only the globals above resolvable."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # any malformed or foreign pickle: name the file and why
        raise CheckpointError(f"{path}: not a torch distributed-checkpoint metadata file this code will read "
                              f"({type(e).__name__}: {e}); it was not loaded, since loading it could run "
                              f"code. Use a checkpoint written by this framework") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not torch's checkpoint Metadata")
    return metadata


def _check_weights_only(data, where: str) -> None:
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message is a page of advice on loading it anyway; keep only the reason
        found = re.search(r"WeightsUnpickler error: (.*)", str(e))
        reason = found.group(1).split(" Please use")[0] if found else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{where}: holds a pickle that torch's safe loader (weights_only=True) refuses "
                              f"({reason}); it was not loaded, since loading it could run code. Use a "
                              f"checkpoint written by this framework") from None


def check_dcp_pickles(directory) -> None:
    """Raise CheckpointError (naming the file) unless every pickle that loading the torch_dist checkpoint
    ``directory`` would unpickle holds only plain data (see the module docstring)."""
    directory = Path(directory)
    metadata_path = directory / METADATA_FILE
    if not metadata_path.is_file():
        raise CheckpointError(f"{directory}: no {METADATA_FILE} (not a complete torch distributed checkpoint)")
    metadata = read_metadata(metadata_path)
    for path in sorted(directory.rglob("*.pt")):
        _check_weights_only(path, str(path))
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_keys:
            continue  # tensors are read with weights_only=True by torch itself
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{metadata_path}: item {index.fqn!r} points outside the directory ({name!r})")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{metadata_path}: item {index.fqn!r} is stored through transforms "
                                  f"{info.transform_descriptors}, which checkpoints of this framework never use")
        try:
            with open(directory / name, "rb") as f:
                f.seek(int(info.offset))
                data = f.read(int(info.length))
        except (OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"{metadata_path}: cannot read item {index.fqn!r} from {name!r}: {e}") from None
        if len(data) != info.length:
            raise CheckpointError(f"{directory / name}: item {index.fqn!r} is truncated ({len(data)} of "
                                  f"{info.length} bytes)")
        _check_weights_only(io.BytesIO(data), f"{directory / name} (item {index.fqn!r})")
