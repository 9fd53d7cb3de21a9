"""`megadalle demo --quick`: every stage for real (data, tokenizer, dVAE, encode, transformer,
reranker, sample, eval), each as its own `megadalle` process; then a re-run that skips them all."""

import json

import pytest

from megadalle.cli import main
from megadalle.demo import busy_cpus, stage_threads


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--quick", "--out", str(out)])
    return out, rc


def test_quick_demo_writes_grid_and_scores(quick_run, capsys):
    out, rc = quick_run
    assert rc == 0
    for p in ("samples/grid.png", "samples/samples.json", "eval/eval.json", "eval/eval.txt", "demo-summary.json",
              "dvae/dvae.safetensors", "transformer/transformer.safetensors", "clip/clip.safetensors",
              "tokenizer.json"):
        assert (out / p).is_file(), p
    summary = json.loads((out / "demo-summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["data", "tokenizer", "dvae", "encode", "transformer",
                                                      "reranker", "sample", "eval"]
    assert all(s["status"] == "ran" for s in summary["stages"])
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["best_of_n"]["single_object"]["heldout"]["n"] == 1
    assert 0.0 <= report["best_of_n"]["all"]["accuracy"] <= 1.0
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert len(samples["captions"]) >= 3
    assert 1 <= summary["threads_per_stage"] <= summary["cpus"]


def test_stage_threads_leave_busy_cores_alone():
    assert stage_threads(2, 0.05) == 2  # idle 2-core machine: both cores
    assert stage_threads(2, 1.2) == 1  # one core busy elsewhere
    assert stage_threads(2, 7.0) == 1  # overloaded: still one thread
    assert stage_threads(16, 3.4) == 13


def test_busy_cpus_sees_a_spinning_process():
    import multiprocessing
    import os

    quiet = busy_cpus(0.3)
    assert 0.0 <= quiet <= os.cpu_count() + 0.5
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    spinner = ctx.Process(target=_spin, args=(ready, 3.0))
    spinner.start()
    try:
        assert ready.wait(60)
        loaded = busy_cpus(1.0)
    finally:
        spinner.join()
    assert loaded >= 0.7  # one core fully used by the spinner


def _spin(ready, seconds: float) -> None:
    import time

    ready.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_rerun_skips_complete_stages(quick_run, capsys):
    out, _ = quick_run
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "demo-summary.json").read_text())
    assert all(s["status"] == "skipped" for s in summary["stages"])
    assert "already complete, skipped" in capsys.readouterr().out


def test_run_folder_of_another_config_is_refused(quick_run, capsys):
    out, _ = quick_run
    assert main(["demo", "--out", str(out)]) == 2  # the full settings into the quick run's folder
    assert "different settings" in capsys.readouterr().err


def test_demo_repeats_exactly(quick_run, tmp_path, monkeypatch):
    """Same settings and thread count: every stage's weights, the samples' ranking and the scores
    repeat bit for bit (all randomness is seeded)."""
    from safetensors.torch import load_file

    first, _ = quick_run
    monkeypatch.setenv("OMP_NUM_THREADS", str(json.loads((first / "demo-summary.json").read_text())["threads_per_stage"]))
    again = tmp_path / "again"
    assert main(["demo", "--quick", "--out", str(again)]) == 0
    for weights in ("dvae/dvae.safetensors", "transformer/transformer.safetensors", "clip/clip.safetensors"):
        a, b = load_file(first / weights), load_file(again / weights)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), weights
    assert (json.loads((first / "samples/samples.json").read_text())["captions"]
            == json.loads((again / "samples/samples.json").read_text())["captions"])
    scores = [json.loads((d / "eval/eval.json").read_text()) for d in (first, again)]
    assert scores[0]["best_of_n"] == scores[1]["best_of_n"] and scores[0]["single_sample"] == scores[1]["single_sample"]
