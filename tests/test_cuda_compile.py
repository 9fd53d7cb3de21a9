"""Compile the CUDA side without a GPU: a CUDA build break fails here, on CI and on laptops.

* The kernels include no torch header, so a bare `nvcc -c` builds them for sm_80 and sm_90: the
  default SIMT kernels (block_sparse_attention_cuda.cu) and the tensor-core ones, off by default
  (block_sparse_attention_cuda_tc.cu). Every kernel must report "0 bytes spill stores, 0 bytes
  spill loads" in `-Xptxas -v`, with no warnings, and the tensor-core kernels' PTX must hold
  WMMA mma instructions for both dtypes.
* The binding's CUDA branch (`-DMEGADALLE_WITH_CUDA`) needs torch's CUDA headers, which torch's
  CPU wheel ships except for one generated file (c10/cuda/impl/cuda_cmake_macros.h); with that
  file stubbed empty, `g++ -fsyntax-only` checks the branch against the CUDA runtime headers.
This says nothing about results or speed: tests/test_cuda_emulated.py checks the arithmetic on
the CPU, tests/test_block_sparse_cuda.py results on a GPU, benchmarks/gpu_check.py speed.
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
KERNELS = {"simt": "block_sparse_attention_cuda.cu", "tc": "block_sparse_attention_cuda_tc.cu"}


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
    for kernel, name in KERNELS.items():
        for arch in ARCHS:
            # -keep: the tensor-core test reads the PTX nvcc generated on the way.
            keep = tmp / f"{kernel}_sm{arch}"
            keep.mkdir()
            cmd = [NVCC, "-c", str(csrc / name), "-o", str(tmp / f"bsa_{kernel}_sm{arch}.o"), "-std=c++17",
                   "-Xptxas", "-v", "-keep", f"-keep-dir={keep}", *extension.NVCC_FLAGS,
                   *extension.cuda_arch_flags(arch)]
            procs[f"{kernel}_sm_{arch}"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                            text=True)
            procs[f"{kernel}_sm_{arch}"].keep_dir = keep
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


def ptxas_report(output: str) -> dict[str, dict[str, int]]:
    """Per kernel (demangled enough to read): registers, spill stores and loads, from -Xptxas -v."""
    report, name = {}, None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m[1]
            short = re.search(r"\d+(\w+?_kernel)I(\w+?)EEvNS", name)
            name = f"{short[1]}<{short[2]}>" if short else name
            report[name] = {}
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            report[name].update(spill_stores=int(m[1]), spill_loads=int(m[2]))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            report[name]["registers"] = int(m[1])
    return report


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_cuda_kernels_compile(compiles, kernel, arch):
    proc = compiles[f"{kernel}_sm_{arch}"]
    output = finished(proc)
    assert proc.returncode == 0, f"nvcc failed for {KERNELS[kernel]}, sm_{arch}:\n{output[-6000:]}"
    report = ptxas_report(output)
    assert report, f"no kernel in the ptxas report of {KERNELS[kernel]}:\n{output[-3000:]}"
    unread = [k for k, r in report.items() if set(r) != {"registers", "spill_stores", "spill_loads"}]
    assert not unread, f"ptxas -v reported no registers/spills for {unread}: has its format changed?"
    spills = {k: r for k, r in report.items() if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"{KERNELS[kernel]}, sm_{arch}: kernels spill registers: {spills}"
    assert "warning" not in output.lower(), f"{KERNELS[kernel]}, sm_{arch}: nvcc warnings:\n{output[-6000:]}"
    print(f"\n{KERNELS[kernel]} sm_{arch}: {len(report)} kernels, 0 bytes spilled, registers "
          f"{min(r['registers'] for r in report.values())}..{max(r['registers'] for r in report.values())}")


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_core_kernels_use_mma(compiles, arch):
    proc = compiles[f"tc_sm_{arch}"]
    output = finished(proc)
    assert proc.returncode == 0, output[-6000:]
    ptx = "\n".join(p.read_text() for p in proc.keep_dir.glob("*.ptx"))
    assert ptx, f"nvcc -keep left no PTX in {proc.keep_dir}"
    for kind, pattern in (("bf16", r"wmma\.mma\.sync\.aligned\.\w+\.\w+\.m16n16k16\.f32\.bf16\.bf16\.f32"),
                          ("fp16", r"wmma\.mma\.sync\.aligned\.\w+\.\w+\.m16n16k16\.f32\.f32")):
        assert re.search(pattern, ptx), f"sm_{arch}: no {kind} WMMA mma in the tensor-core kernels' PTX"
    # Every forward/dq/dkdv instantiation (2 dtypes x 3 block sizes x 2 head dims) is there.
    kernels = set(re.findall(r"\.entry\s+(\w*(?:forward|dq|dkdv)_tc_kernel\w*)", ptx))
    assert len(kernels) == 3 * 12, f"expected 36 tensor-core kernels in the PTX, found {len(kernels)}"


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
