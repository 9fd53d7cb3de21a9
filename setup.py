"""Package build. Metadata lives in pyproject.toml; this file only adds the csrc/ extension.

`pip install --no-build-isolation -e .` builds `megadalle.ops._C` against the installed torch:
the CPU implementation always, the CUDA kernels too when torch and a toolkit support CUDA.
Knobs (see megadalle/ops/extension.py): MEGADALLE_SKIP_EXT=1, MEGADALLE_SKIP_CUDA=1,
MEGADALLE_CUDA_ARCH="80;90".
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_extension_helpers():
    # By path: importing the megadalle package while installing it is not possible in general.
    spec = importlib.util.spec_from_file_location("_megadalle_extension", ROOT / "megadalle" / "ops" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions() -> dict:
    ext = _load_extension_helpers()
    if ext.env_flag("MEGADALLE_SKIP_EXT"):
        print("megadalle: MEGADALLE_SKIP_EXT set, not building the block-sparse extension", file=sys.stderr)
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("megadalle: torch is not importable (install it first and use --no-build-isolation); "
              "building without the block-sparse extension", file=sys.stderr)
        return {}
    with_cuda, why_not = ext.cuda_build_possible()
    # Relative paths: setuptools wants sources inside the project.
    sources = [os.path.relpath(s, ROOT) for s in ext.sources(with_cuda)]
    if with_cuda:
        module = CUDAExtension(
            ext.EXTENSION_NAME, sources,
            extra_compile_args={"cxx": ext.CXX_FLAGS + ["-DMEGADALLE_WITH_CUDA"],
                                "nvcc": ext.NVCC_FLAGS + ["-DMEGADALLE_WITH_CUDA"] + ext.cuda_arch_flags()},
            extra_link_args=ext.LINK_FLAGS)
    else:
        print(f"megadalle: building the CPU block-sparse extension only ({why_not})", file=sys.stderr)
        module = CppExtension(ext.EXTENSION_NAME, sources, extra_compile_args={"cxx": ext.CXX_FLAGS},
                              extra_link_args=ext.LINK_FLAGS)
    # ninja compiles the translation units in parallel.
    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extensions())
