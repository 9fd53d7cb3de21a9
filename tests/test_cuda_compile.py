"""Compile the CUDA side without a GPU: a CUDA build break fails here, on CI and on laptops.

* The kernels (block_sparse_attention_cuda.cu) include no torch header, so a bare `nvcc -c`
  builds them for sm_80 and sm_90; we also require no register spills and no warnings.
* The binding's CUDA branch (`-DMEGADALLE_WITH_CUDA`) needs torch's CUDA headers, which torch's
  CPU wheel ships except for one generated file (c10/cuda/impl/cuda_cmake_macros.h); with that
  file stubbed empty, `g++ -fsyntax-only` checks the branch against the CUDA runtime headers.
This says nothing about results or speed: tests/test_block_sparse_cuda.py does, on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megadalle.ops import extension

ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): "
                                                     "cannot compile-check the CUDA code on this machine")


@pytest.fixture(scope="module")
def compiles(tmp_path_factory) -> dict[str, subprocess.Popen]:
    """Start every compile at once (they are independent; wall time is the slowest one)."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    csrc = extension.CSRC
    procs = {}
    for arch in ARCHS:
        cmd = [NVCC, "-c", str(csrc / "block_sparse_attention_cuda.cu"), "-o", str(tmp / f"bsa_sm{arch}.o"),
               "-std=c++17", "-Xptxas", "-v", *extension.NVCC_FLAGS, *extension.cuda_arch_flags(arch)]
        procs[f"sm_{arch}"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:
        from torch.utils.cpp_extension import include_paths

        stub = tmp / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes = [tmp / "stub", *include_paths(), cuda_include_dir(), csrc]
        cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DMEGADALLE_WITH_CUDA", f"-I{sysconfig_include()}",
               *(f"-I{p}" for p in includes), str(csrc / "block_sparse_attention_binding.cpp")]
        procs["binding"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def cuda_include_dir() -> Path:
    # nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc).
    candidates = [Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "include",
                  Path(NVCC).resolve().parents[1] / "include", Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_runtime_api.h").is_file():
            return c
    return candidates[-1]


def sysconfig_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def finished(proc: subprocess.Popen) -> str:
    return proc.communicate(timeout=600)[0]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_compile(compiles, arch):
    output = finished(compiles[f"sm_{arch}"])
    assert compiles[f"sm_{arch}"].returncode == 0, f"nvcc failed for sm_{arch}:\n{output[-6000:]}"
    spills = [line for line in output.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
    assert not spills, f"sm_{arch}: kernels spill registers:\n" + "\n".join(spills)
    assert "warning" not in output.lower(), f"sm_{arch}: nvcc warnings:\n{output[-6000:]}"


@pytest.mark.slow
@needs_nvcc
def test_binding_cuda_branch_compiles(compiles):
    if "binding" not in compiles:
        pytest.skip("no C++ compiler (c++/g++) on PATH")
    output = finished(compiles["binding"])
    assert compiles["binding"].returncode == 0, f"binding with -DMEGADALLE_WITH_CUDA failed:\n{output[-6000:]}"


def test_arch_knob_is_parsed_and_checked():
    assert extension.cuda_arch_flags("80;90") == ["-gencode=arch=compute_80,code=sm_80",
                                                  "-gencode=arch=compute_90,code=sm_90",
                                                  "-gencode=arch=compute_90,code=compute_90"]
    assert extension.cuda_arch_flags("8.0") == ["-gencode=arch=compute_80,code=sm_80",
                                                "-gencode=arch=compute_80,code=compute_80"]
    with pytest.raises(ValueError, match="MEGADALLE_CUDA_ARCH"):
        extension.cuda_arch_flags("sm80")
