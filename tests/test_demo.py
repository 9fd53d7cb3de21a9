"""`megadalle demo --quick`: every stage for real (data, tokenizer, dVAE, encode, transformer,
reranker, sample, eval), each as its own `megadalle` process; then a re-run that skips them all."""

import json
import os

import pytest

from megadalle.cli import main
from megadalle.commands.demo import busy_cpus, stage_threads


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
    # The scores, recomputed from each caption's judgement of its best image (eval/samples.json):
    # a caption counts when the image's shape, colour, grid cell and relation all match.
    judged = [c for c in json.loads((out / "eval" / "samples.json").read_text())["captions"] if "best_matches" in c]
    assert len(judged) == report["best_of_n"]["all"]["n"] == report["n_captions"] - report["captions_not_scored"]
    for split in ("all", "seen", "heldout"):
        group = [c["best_matches"] for c in judged if split in ("all", c["split"])]
        got = report["best_of_n"][split]
        assert got["n"] == len(group), split
        assert got["accuracy"] == pytest.approx(
            sum(all(m[a] for a in ("shape", "colour", "position", "relation")) for m in group) / len(group)), split
        assert got["per_attribute"] == pytest.approx(
            {a: sum(m[a] for m in group) / len(group) for a in group[0] if a != "all"}), split
    singles = report["best_of_n"]["single_object"]
    assert summary["single_object_best_of_n_accuracy"] == {s: singles[s]["accuracy"] for s in ("all", "seen", "heldout")}
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert len(samples["captions"]) >= 3
    # OMP_NUM_THREADS (conftest sets 1 unless the caller chose) overrides the idle-core count.
    assert summary["threads_per_stage"] == int(os.environ["OMP_NUM_THREADS"])


def test_stage_threads_leave_busy_cores_alone():
    assert stage_threads(2, 0.05) == 2  # idle 2-core machine: both cores
    assert stage_threads(2, 1.2) == 1  # one core busy elsewhere
    assert stage_threads(2, 7.0) == 1  # overloaded: still one thread
    assert stage_threads(16, 3.4) == 13


def test_busy_cpus_reads_the_idle_share_of_proc_stat(monkeypatch):
    """Busy cores = (1 - idle+iowait ticks / all ticks over the window) x cores; the load average
    when /proc/stat cannot be read."""
    import sys

    demo = sys.modules[busy_cpus.__module__]
    # Over the window: 400 ticks, of which idle 150 and iowait 50, so half of 4 cores busy.
    lines = iter(["cpu  100 0 100 700 100 0 0 0 0 0\n", "cpu  200 0 200 850 150 0 0 0 0 0\n"])

    class FakeStat:
        def __init__(self, path):
            assert str(path) == "/proc/stat"

        def read_text(self):
            return next(lines) + "cpu0 ...\n"

    monkeypatch.setattr(demo, "Path", FakeStat)
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert busy_cpus(0.5) == 2.0

    class Unreadable(FakeStat):
        def read_text(self):
            raise OSError("no /proc")

    monkeypatch.setattr(demo, "Path", Unreadable)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.25, 1.0, 0.5))
    assert busy_cpus(0.5) == 1.25


def test_busy_cpus_sees_a_spinning_process():
    import multiprocessing

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
