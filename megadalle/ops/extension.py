"""How the csrc/ extension is built and found: shared by setup.py (install) and the JIT path.

setup.py loads this file by path (it must not import the package while installing it), so it
imports nothing from megadalle and nothing heavier than the standard library at module level.

Build knobs (environment):
    MEGADALLE_SKIP_EXT=1       build no extension (the ops fall back to the PyTorch reference)
    MEGADALLE_SKIP_CUDA=1      build the CPU extension only, even where CUDA is available
    MEGADALLE_CUDA_ARCH="80;90"  compute capabilities of the CUDA build (default 80;90)
Run-time knobs:
    MEGADALLE_BSA_TENSOR_CORES=1  run the tensor-core (WMMA) CUDA kernels instead of the default
                               SIMT ones (off until tests/test_block_sparse_cuda.py has passed
                               with them on a GPU; see block_sparse_attention.use_tensor_cores)
    MEGADALLE_JIT=0            never JIT-compile; without an installed extension use the reference
                               (MEGADALLE_SKIP_EXT=1 at run time does the same)
    MEGADALLE_JIT=1            JIT-compile even when an installed extension exists (development)
    MEGADALLE_EXT_CACHE=DIR    where JIT builds are cached (default ~/.cache/megadalle/extensions)
"""

from __future__ import annotations

import os
from pathlib import Path

EXTENSION_NAME = "megadalle.ops._C"
CSRC = Path(__file__).resolve().parents[2] / "csrc" / "block_sparse_attention"
DEFAULT_CUDA_ARCH = "80;90"

# -O2 -g0 (setuptools otherwise adds Python's -g, debug info for all of torch's headers) and two
# translation units keep the CPU build short on a small machine; -fopenmp makes at::parallel_for
# (header-inlined) actually run in parallel and enables the `omp simd` loops.
CXX_FLAGS = ["-O2", "-g0", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sources(with_cuda: bool, root: Path = CSRC) -> list[str]:
    """The extension's sources: the binding, the CPU implementation, and the kernels with CUDA
    (the default SIMT kernels and the tensor-core ones, which run only when asked for)."""
    srcs = [root / "block_sparse_attention_binding.cpp", root / "block_sparse_attention_cpu.cpp"]
    if with_cuda:
        srcs += [root / "block_sparse_attention_cuda.cu", root / "block_sparse_attention_cuda_tc.cu"]
    return [str(s) for s in srcs]


def cuda_arch_flags(arch: str | None = None) -> list[str]:
    """nvcc -gencode flags for e.g. "80;90" (SASS for each, plus PTX of the newest for later GPUs)."""
    arch = arch if arch is not None else os.environ.get("MEGADALLE_CUDA_ARCH", DEFAULT_CUDA_ARCH)
    caps = [a.strip().replace(".", "") for a in arch.replace(",", ";").split(";") if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise ValueError(f"MEGADALLE_CUDA_ARCH={arch!r}: give compute capabilities like '80;90'")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    flags.append(f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}")
    return flags


def cuda_build_possible() -> tuple[bool, str]:
    """Whether the installed torch and toolkit can build the CUDA extension, and why not."""
    if env_flag("MEGADALLE_SKIP_CUDA"):
        return False, "MEGADALLE_SKIP_CUDA is set"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, ""


def jit_cache_dir() -> Path:
    default = Path.home() / ".cache" / "megadalle" / "extensions"
    return Path(os.environ.get("MEGADALLE_EXT_CACHE", str(default)))


def jit_build(verbose: bool = False) -> str:
    """Compile the extension with torch.utils.cpp_extension.load into the cache and load it.

    Rebuilds only when a source or flag changed (torch hashes them). Returns the build folder.
    """
    import torch
    from torch.utils.cpp_extension import load

    with_cuda, _ = cuda_build_possible()
    with_cuda = with_cuda and torch.cuda.is_available()
    name = "megadalle_bsa_cuda" if with_cuda else "megadalle_bsa_cpu"
    build_dir = jit_cache_dir() / f"torch{torch.__version__.split('+')[0]}" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=sources(with_cuda), build_directory=str(build_dir),
         extra_cflags=CXX_FLAGS + (["-DMEGADALLE_WITH_CUDA"] if with_cuda else []),
         extra_ldflags=LINK_FLAGS,
         extra_cuda_cflags=NVCC_FLAGS + ["-DMEGADALLE_WITH_CUDA"] + (cuda_arch_flags() if with_cuda else []),
         with_cuda=with_cuda, is_python_module=False, verbose=verbose)
    return str(build_dir)
