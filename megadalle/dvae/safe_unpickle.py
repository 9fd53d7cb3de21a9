"""A restricted reader for torch-pickled module files (both torch.save formats).

Only three kinds of thing can come out of it: tensors (rebuilt here from raw storage bytes by
our own functions, not torch's), plain containers (dict, list, tuple, OrderedDict, set), and
instances of the inert stand-in classes the caller names. Every other global a pickle refers to
raises `RefusedGlobal` when the unpickler first meets its name, before anything could call it.
This is the "restricting globals" recipe of the Python pickle documentation, applied to torch's
two container layouts:

- zip (torch >= 1.6 default): `<prefix>/data.pkl` + one file per storage `<prefix>/data/<key>`;
  persistent ids ('storage', storage_type, key, location, numel).
- legacy: magic number, protocol, sys info, the object pickle, the list of storage keys, then
  for each key an int64 element count and the raw bytes; persistent ids
  ('storage', storage_type, root_key, location, numel, view_metadata) and
  ('module', class, source_file, source) for module classes.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names something outside the allowlist; nothing was executed."""

    def __init__(self, name: str) -> None:
        super().__init__(f"GLOBAL {name} is not allowed")
        self.name = name


class _StorageType:
    """Marker standing for `torch.FloatStorage` & co.: carries the dtype, does nothing."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    """A storage's elements as a flat tensor; filled later in the legacy format."""

    def __init__(self, dtype: torch.dtype, numel: int, max_bytes: int) -> None:
        # A forged element count must not make us allocate more than the file could hold.
        if numel * torch.empty(0, dtype=dtype).element_size() > max_bytes:
            raise pickle.UnpicklingError(f"storage of {numel} elements is larger than the file")
        self.data = torch.zeros(numel, dtype=dtype)
        self.filled = False


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    needed = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if offset < 0 or needed > storage.data.numel():
        raise pickle.UnpicklingError(f"tensor of size {tuple(size)} does not fit its storage")
    # A view: legacy files fill the storage after the tensors are built.
    return torch.as_strided(storage.data, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _rebuild_from_type_v2(func: Callable, _new_type: Any, args: tuple, _state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("tensor subclass rebuilt by an unknown function")
    return func(*args)


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


_SAFE: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset,
    "__builtin__.set": set, "__builtin__.frozenset": frozenset,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": torch.Tensor,  # only ever an argument to _rebuild_from_type_v2
    "torch.nn.parameter.Parameter": torch.Tensor,
    "torch.device": _device,
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, classes: dict[str, type], storage: Callable[[tuple], Any]) -> None:
        super().__init__(file)
        self._classes = classes
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._classes:
            return self._classes[full]
        if full in _SAFE:
            return _SAFE[full]
        raise RefusedGlobal(full)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2 and pid[1] in self._classes.values():
            return pid[1]
        if kind == "storage":
            return self._storage(pid[1:])
        raise pickle.UnpicklingError(f"unexpected persistent id of kind {kind!r}")


def _storage_args(args: tuple) -> tuple[torch.dtype, str, int]:
    storage_type, key, _location, numel = args[:4]
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError("storage of an unknown type")
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"storage with a bad element count {numel!r}")
    return storage_type.dtype, str(key), numel


def _load_zip(path: Path, classes: dict[str, type]) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("zip file without exactly one data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and zf.read(byteorder).strip() != b"little":
            raise pickle.UnpicklingError("big-endian torch files are not supported")
        storages: dict[str, _Storage] = {}

        def storage(args: tuple) -> _Storage:
            dtype, key, numel = _storage_args(args)
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise pickle.UnpicklingError(f"storage {key} missing from the zip file")
                s = _Storage(dtype, numel, zf.getinfo(name).file_size)
                raw = zf.read(name)
                nbytes = numel * s.data.element_size()
                if len(raw) != nbytes:
                    raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {nbytes}")
                if nbytes:
                    s.data.view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
                s.filled = True
                storages[key] = s
            return storages[key]

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), classes, storage).load()


def _load_legacy(path: Path, classes: dict[str, type]) -> Any:
    storages: dict[str, _Storage] = {}
    file_size = path.stat().st_size

    def storage(args: tuple) -> _Storage:
        dtype, key, numel = _storage_args(args)
        if len(args) > 4 and args[4] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in storages:
            storages[key] = _Storage(dtype, numel, file_size)
        return storages[key]

    with open(path, "rb") as f:
        def header() -> Any:
            return _Unpickler(f, classes, storage).load()

        if header() != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a torch.save file (bad magic number)")
        if header() != LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("unsupported legacy torch file protocol")
        info = header()
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise pickle.UnpicklingError("big-endian torch files are not supported")
        obj = header()
        keys = header()
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("storage key list missing")
        for key in keys:
            s = storages.get(str(key))
            if s is None:
                raise pickle.UnpicklingError(f"data for storage {key} that no tensor uses")
            (count,) = struct.unpack("<q", f.read(8))
            if count != s.data.numel():
                raise pickle.UnpicklingError(f"storage {key} holds {count} elements, expected {s.data.numel()}")
            nbytes = count * s.data.element_size()
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise pickle.UnpicklingError(f"file ends inside storage {key}")
            if nbytes:
                s.data.view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            s.filled = True
    missing = [k for k, s in storages.items() if not s.filled]
    if missing:
        raise pickle.UnpicklingError(f"no data for storages {missing[:3]}")
    return obj


def restricted_load(path: str | Path, classes: dict[str, type]) -> Any:
    """Load a torch.save file allowing only tensors, containers and the given classes
    (`{"module.Name": stand_in_class}`). Raises `RefusedGlobal` for anything else and
    `pickle.UnpicklingError` (or OSError/EOFError) for malformed files."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path, classes)
    return _load_legacy(path, classes)
