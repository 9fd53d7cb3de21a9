"""Reading torch-pickled files (checkpoints) without running code from them.

A `.pt` file is a pickle, and a pickle can name any callable to be run while it loads. Anything in
a run folder or a checkpoint may come from someone else (a shared run, a download), so every such
file megadalle reads, and every file DeepSpeed reads on our behalf, goes through torch's
weights-only unpickler with one explicit allow-list:

- what torch allows by default (tensors, storages, plain containers, torch.Size, dtypes);
- numpy's array reconstruction (our RNG states hold numpy's MT19937 key as an ndarray);
- four plain-data classes that DeepSpeed 0.19 pickles into its ZeRO optimizer files
  (`ZeroStageEnum`, `fragment_address`, `LossScaler`, `DynamicLossScaler`). Loading one only
  creates the object and fills its attributes; none defines `__setstate__` or `__reduce__` code
  that runs on load.

Two ways in:

    load_file(path)            our own files; refuses with `UnsafeCheckpointError` naming the file
                               and every global outside the list, before anything is executed
    check_folder(folder)       every `.pt` file of a checkpoint folder, checked statically (the
                               pickle is disassembled, not run) before DeepSpeed opens any of them
    weights_only_loads()       a context in which every `torch.load` (DeepSpeed's included, which
                               passes weights_only=False) is forced to weights-only with the same
                               list, through torch's own TORCH_FORCE_WEIGHTS_ONLY_LOAD switch

The static check names the offender in a message; the forced mode is the guarantee, because it
holds even for a file swapped in after the check.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from megadalle.errors import CommandError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(CommandError):
    """A file would need a global outside the allow-list to load; nothing of it was run."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = path, names
        listed = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        super().__init__(f"refusing to load {path}: it names {listed}, which megadalle does not load (a "
                         f"pickle can run code through such a name). Nothing from the file was run. If you "
                         f"wrote this file yourself with another tool, convert its tensors to safetensors")


def _numpy_globals() -> list[Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    out: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.UInt32DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def _deepspeed_globals() -> list[Any]:
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed (e.g. `inspect` on a bare machine): its classes cannot load
        return []
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def allowed_globals() -> list[Any]:
    return _numpy_globals() + _deepspeed_globals()


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals the pickle in `path` names outside the allow-list (a static look: nothing runs)."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))


def _refusal(path: Path, error: Exception) -> UnsafeCheckpointError | None:
    """An UnsafeCheckpointError when `error` came from the weights-only unpickler's allow-list."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    try:
        names = unsafe_globals(path)
    except Exception:  # noqa: BLE001 - not even a zip: the caller reports it as corrupt
        return None
    # No name outside the list: the file is corrupt rather than refused (nothing ran either way).
    return UnsafeCheckpointError(path, names) if names else None


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load of `path` with only allow-listed globals; UnsafeCheckpointError otherwise.

    Other failures (truncated, not a torch file) propagate as torch raises them.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        refusal = _refusal(path, e)
        if refusal is not None:
            raise refusal from None
        raise


def check_folder(folder: str | Path) -> None:
    """Refuse a checkpoint folder if any of its `.pt` files names a global outside the list."""
    for f in sorted(Path(folder).rglob("*.pt")):
        try:
            names = unsafe_globals(f)
        except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
            continue  # unreadable: the loader reports it as corrupt, with its own message
        if names:
            raise UnsafeCheckpointError(f, names)


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every torch.load in this process is weights-only with the allow-list."""
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)  # torch refuses both at once; ours wins here
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def refusal_from(folder: str | Path, error: Exception) -> UnsafeCheckpointError | None:
    """After a failed load under `weights_only_loads()`: the refusal naming the file, if that was it."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    for f in sorted(Path(folder).rglob("*.pt")):
        refusal = _refusal(f, error)
        if refusal is not None:
            return refusal
    return None
