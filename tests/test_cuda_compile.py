"""Compile the CUDA kernels with a bare `nvcc -c` for sm_80 and sm_90.

The kernels include no torch header, so this catches a CUDA build break on machines (like CI)
that have nvcc but no GPU and only torch's CPU wheel. It checks that the code compiles and that
no kernel spills registers to local memory; it says nothing about speed or results (the GPU
tests in test_block_sparse_cuda.py do).
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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): "
                                         "cannot compile-check the CUDA kernels on this machine")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path: Path):
    source = [s for s in extension.sources(with_cuda=True) if s.endswith(".cu")][0]
    procs = {}
    # Both architectures at once: two processes on a 2-core machine.
    for arch in ARCHS:
        cmd = [NVCC, "-c", source, "-o", str(tmp_path / f"bsa_sm{arch}.o"), "-std=c++17", "-Xptxas", "-v",
               *extension.NVCC_FLAGS, *extension.cuda_arch_flags(arch)]
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for arch, proc in procs.items():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"nvcc failed for sm_{arch}:\n{output[-6000:]}"
        assert (tmp_path / f"bsa_sm{arch}.o").stat().st_size > 0
        spills = [line for line in output.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
        assert not spills, f"sm_{arch}: kernels spill registers:\n" + "\n".join(spills)
        assert "warning" not in output.lower(), f"sm_{arch}: nvcc warnings:\n{output[-6000:]}"


def test_arch_knob_is_parsed_and_checked():
    assert extension.cuda_arch_flags("80;90") == ["-gencode=arch=compute_80,code=sm_80",
                                                  "-gencode=arch=compute_90,code=sm_90",
                                                  "-gencode=arch=compute_90,code=compute_90"]
    assert extension.cuda_arch_flags("8.0") == ["-gencode=arch=compute_80,code=sm_80",
                                                "-gencode=arch=compute_80,code=compute_80"]
    with pytest.raises(ValueError, match="MEGADALLE_CUDA_ARCH"):
        extension.cuda_arch_flags("sm80")
