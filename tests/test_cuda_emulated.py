"""The CUDA kernels' arithmetic on the CPU: both .cu files run on a thread-per-CUDA-thread emulator.

tests/cuda_emu/emu.h emulates what the kernels use (threads, __syncthreads, warp shuffles,
dynamic shared memory, WMMA tiles); `emulated_source` below rewrites the three constructs g++
cannot parse (`extern __shared__`, `__shared__`, `<<<...>>>`). g++ builds the kernels with the
harness (tests/cuda_emu/harness.cpp), which runs forward, backward and decode on cases written
here; the outputs are held to the same bound as tests/test_block_sparse_cuda.py on a GPU (error
against an fp32 reference at most twice PyTorch's own error in the same dtype, + 1e-3).

This is how the tensor-core path (block_sparse_attention_cuda_tc.cu, off by default) is checked
before any GPU has run it: it catches indexing, masking, synchronisation and shared-memory layout
mistakes, not speed, bank conflicts or sm_80/sm_90 code generation (tests/test_cuda_compile.py
and, on a GPU, tests/test_block_sparse_cuda.py via benchmarks/gpu_check.py cover those).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megadalle.ops import extension
from megadalle.ops.block_sparse_attention import block_sparse_attention_reference
from megadalle.ops.layout import BlockLayout
from megadalle.transformer.masks import MaskGeometry, mask_set

HERE = Path(__file__).resolve().parent / "cuda_emu"
CXX = shutil.which("g++") or shutil.which("c++")
SMALL = MaskGeometry(text_len=5, grid=6, row_window=7, conv_kernel=3)  # 41 positions, odd
KERNELS = {"simt": 0, "tensorcores": 1}
DTYPES = {torch.float16: 1, torch.bfloat16: 2}


def cuda_include_dir() -> Path | None:
    candidates = [Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "include", Path("/usr/local/cuda/include")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(1, Path(nvcc).resolve().parents[1] / "include")
    return next((c for c in candidates if (c / "cuda_bf16.h").is_file() and (c / "cuda_runtime.h").is_file()), None)


CUDA_INCLUDE = cuda_include_dir()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None,
                                 reason="needs g++ and the CUDA headers (cuda_runtime.h, cuda_bf16.h)")]


def emulated_source(cu: str) -> str:
    """Rewrite a .cu file so that g++ compiles it against tests/cuda_emu/emu.h."""
    src = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w[\w: ]*?)\s+(\w+)\[\];",
                 r"\1* \2 = ::emu::dynamic_smem<\1>();", cu)
    src = re.sub(r"\b__shared__\b", "static", src)
    src, n = re.subn(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);",
                     lambda m: f"::emu::launch({m[1]}, {' '.join(m[2].split())}, {m[3]});", src, flags=re.S)
    assert n > 0 and "<<<" not in src, "a kernel launch was not rewritten"
    return src


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cuda_emu")
    flags = ["-std=c++20", "-O1", "-pthread", "-w", f"-I{CUDA_INCLUDE}", f"-I{extension.CSRC}", f"-I{HERE}"]
    procs, objects = [], []
    for name in ("block_sparse_attention_cuda.cu", "block_sparse_attention_cuda_tc.cu"):
        src = tmp / (name.replace(".cu", "_emu.cpp"))
        src.write_text(emulated_source((extension.CSRC / name).read_text()))
        objects.append(src.with_suffix(".o"))
        procs.append(subprocess.Popen([CXX, *flags, "-include", str(HERE / "emu.h"), "-c", str(src), "-o",
                                       str(objects[-1])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    objects.append(tmp / "harness.o")
    procs.append(subprocess.Popen([CXX, *flags, "-c", str(HERE / "harness.cpp"), "-o", str(objects[-1])],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"{' '.join(p.args[:3])} ... failed:\n{out[-6000:]}"
    exe = tmp / "harness"
    link = subprocess.run([CXX, "-pthread", *map(str, objects), "-o", str(exe)], capture_output=True, text=True)
    assert link.returncode == 0, link.stdout + link.stderr
    return exe


class Case:
    """One layout, dtype and kernel: inputs written for the harness, outputs read back."""

    def __init__(self, tmp: Path, name: str, layout: BlockLayout, dtype: torch.dtype, kernel: str,
                 b: int = 1, h: int = 2, d: int = 64, seed: int = 0, decode_pos: int = -1):
        self.layout, self.dtype, self.decode_pos = layout, dtype, decode_pos
        self.shape = (b, h, layout.seq_len, d)
        gen = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v, self.dout = (torch.randn(*self.shape, generator=gen).to(dtype) for _ in range(4))
        self.scale = d ** -0.5
        self.path, self.out_path = tmp / f"{name}.case", tmp / f"{name}.out"
        a = layout.arrays("cpu")
        bits = [t.contiguous().view(torch.int16).numpy().tobytes() for t in (self.q, self.k, self.v, self.dout)]
        header = struct.pack("<12i", 0x31415342, KERNELS[kernel], DTYPES[dtype], b, h, layout.seq_len, d,
                             layout.block_size, a.row_ptr.numel() - 1, a.col_idx.numel(), a.block_masks.shape[0],
                             decode_pos) + struct.pack("<f", self.scale)
        arrays = [x.to(torch.int32).numpy().tobytes() for x in (a.row_ptr, a.col_idx, a.partial_idx, a.t_col_ptr,
                                                                a.t_row_idx, a.t_partial_idx)]
        masks = a.block_masks.to(torch.uint8).numpy().tobytes()
        tail = [self.q[:, :, decode_pos].contiguous().view(torch.int16).numpy().tobytes()] if decode_pos >= 0 else []
        self.path.write_bytes(header + b"".join(arrays) + masks + b"".join(bits) + b"".join(tail))

    def results(self) -> dict[str, torch.Tensor]:
        raw = self.out_path.read_bytes()
        b, h, s, d = self.shape
        n, pos, res = b * h * s * d, 0, {}
        for name, count, kind in (("out", n, "x"), ("lse", b * h * s, "f"), ("dq", n, "x"), ("dk", n, "x"),
                                  ("dv", n, "x"), *((("decode", b * h * d, "x"),) if self.decode_pos >= 0 else ())):
            size = count * (4 if kind == "f" else 2)
            chunk = np.frombuffer(raw[pos:pos + size], dtype=np.float32 if kind == "f" else np.int16).copy()
            t = torch.from_numpy(chunk)
            res[name] = t if kind == "f" else t.view(self.dtype)
            pos += size
        assert pos == len(raw), "output size differs from what the case expects"
        shapes = {"lse": (b, h, s), "decode": (b, h, 1, d)}
        return {k: v.reshape(shapes.get(k, self.shape)) for k, v in res.items()}

    def check(self) -> None:
        got = self.results()

        def run(q, k, v, dout, **kw):
            q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
            out = block_sparse_attention_reference(q, k, v, self.layout, self.scale, **kw)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))

        exact = run(*(t.float() for t in (self.q, self.k, self.v, self.dout)))
        low = run(self.q, self.k, self.v, self.dout, upcast=False)
        for name, ref, lp in zip(("out", "dq", "dk", "dv"), exact, low):
            a = got[name]
            assert torch.isfinite(a.float()).all(), f"{self.path.stem}: {name} has non-finite values"
            err = (a.float() - ref).abs().max().item()
            torch_err = (lp.float() - ref).abs().max().item()
            assert err <= 2 * torch_err + 1e-3, (f"{self.path.stem}: {name} error {err:.3g}, PyTorch "
                                                 f"{self.dtype} error {torch_err:.3g}")
        # lse: log of the row's softmax denominator; -inf for rows that allow nothing.
        mask = self.layout.dense_mask("cpu")
        scores = torch.einsum("bhqd,bhkd->bhqk", self.q.float(), self.k.float()) * self.scale
        lse_ref = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
        empty = ~mask.any(-1)
        assert (got["lse"][..., empty] == float("-inf")).all()
        torch.testing.assert_close(got["lse"][..., ~empty], lse_ref[..., ~empty], atol=2e-2, rtol=1e-2)
        if self.decode_pos >= 0:
            torch.testing.assert_close(got["decode"].float(), exact[0][:, :, self.decode_pos:self.decode_pos + 1],
                                       atol=2e-2, rtol=2e-2)


def run_cases(harness: Path, cases: list[Case]) -> None:
    args = [str(x) for c in cases for x in (c.path, c.out_path)]
    proc = subprocess.run([str(harness), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"harness failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    for c in cases:
        c.check()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_match_reference_on_the_emulator(harness, tmp_path, kernel):
    """Every block size and head dim the kernels are built for, the three masks; both dtypes for
    the tensor-core kernels (their WMMA fragments differ by dtype), one per case for the SIMT
    ones (the emulator runs their many warp shuffles slowly)."""
    cases = []
    for block_size, head_dim in ((16, 32), (32, 64), (64, 64)):
        for j, dtype in enumerate(DTYPES):
            for i, kind in enumerate(("row", "column", "conv")):
                if kernel == "simt" and (i + j + block_size // 16) % 2:
                    continue
                layout = mask_set(SMALL, kind, SMALL.seq_len).layout(block_size)
                cases.append(Case(tmp_path, f"{kernel}_{kind}_{block_size}_{head_dim}_{str(dtype)[6:]}", layout,
                                  dtype, kernel, d=head_dim, seed=i, decode_pos=SMALL.seq_len - 3))
    # Rows with no allowed key (zeros, lse -inf) and a partial last block.
    mask = torch.tril(torch.ones(70, 70, dtype=torch.bool))
    mask[[0, 33, 69]] = False
    cases.append(Case(tmp_path, f"{kernel}_empty_rows", BlockLayout.from_dense_mask(mask, 32), torch.bfloat16,
                      kernel, d=64, seed=5))
    run_cases(harness, cases)

