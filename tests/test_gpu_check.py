"""benchmarks/gpu_check.py, the one prepared GPU check, cannot rot between GPU sessions.

Its dry run (no GPU: every part at tiny shapes on the CPU, the CUDA tests only collected) runs here
in a subprocess, as on any machine without a GPU; the JSON must say that no GPU was present and
every part must be ok, or skipped for lack of a GPU and saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

INSTALL_AND_RUN = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                   "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && "
                   "python3 benchmarks/gpu_check.py $OUT")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.slow
def test_dry_run_without_a_gpu(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, f"gpu_check.py exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads((out / "gpu_check.json").read_text())
    summary = (out / "gpu_check.txt").read_text()
    assert report["gpu"] is False and report["mode"] == "cpu-dry-run" and "no CUDA GPU" in report["no_gpu"]
    assert summary.startswith("NO GPU WAS PRESENT")
    assert report["total_s"] < report["budget_s"] <= 120
    assert list(report["parts"]) == [p[0] for p in gpu_check.PARTS]
    for name, part in report["parts"].items():
        if part["status"] == "skipped":
            assert gpu_check.NO_GPU in part["reason"], f"{name} skipped for another reason: {part['reason']}"
        else:
            assert part["status"] == "ok", f"{name}: {part['status']}: {part.get('error')}"
        assert f"] {name} " in summary
    parts = report["parts"]
    assert parts["build"]["status"] == "skipped"
    for name in ("cuda_tests", "cuda_tests_tc"):  # collected, so a renamed test or an empty selection fails
        assert parts[name]["status"] == "skipped" and parts[name]["result"]["collected"] > 0
        assert (out / parts[name]["result"]["report"]).exists()
    for kind in ("row", "column", "conv"):
        assert set(parts["attention"]["result"]["ms"][kind]) == {"blocksparse", "flex", "causal", "dense"}
        assert set(parts["attention_tc"]["result"]["ms"][kind]) == {"blocksparse-tc"}
    runs = parts["train"]["result"]["runs"]
    assert {(r["backend"], r["activation_checkpointing"]) for r in runs} == {("dense", False), ("dense", True),
                                                                             ("blocksparse", False)}
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in runs)  # no device peak on a CPU
    assert set(parts["train"]["result"]["flops_per_sample"]) == {"tiny", "small", "1.3b"}
    assert parts["sampling"]["result"]["runs"][0]["codes_in_range"]


def test_every_test_that_needs_cuda_is_selected():
    targets = gpu_check.cuda_tests()
    assert "tests/test_block_sparse_cuda.py" in targets
    assert "tests/test_attention.py::test_flex_gradients_match_reference_on_gpu" in targets
    # Anything else in tests/ that skips without CUDA is found too (a module flag or a direct call).
    for path in (ROOT / "tests").glob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        if "skipif(not torch.cuda.is_available()" in text or "skipif(not CUDA" in text:
            assert any(t == rel or t.startswith(rel + "::") for t in targets), f"{rel} has CUDA-only tests"


def test_the_gpu_command_and_the_wheels_target_are_written_down():
    assert INSTALL_AND_RUN in gpu_check.__doc__
    makefile = (ROOT / "Makefile").read_text()
    assert "\ngpu-wheels:" in makefile and "deepspeed==0.19.8" in makefile
    assert ".whl/" in (ROOT / ".gitignore").read_text().splitlines()
