"""The run folder under an unlucky user: a second writer, a rewind, a lost `latest`, a full disk,
a read-only or impossible path. Nothing is lost and every failure is one line that says what and
where. Real processes, real DeepSpeed checkpoints, a real (tmpfs) file system filling up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadalle import cli
from megadalle.training.checkpoint import CheckpointError
from trainer_toy import ToyTrainer, toy_config


def _ckpts(run: Path, stage: str = "toy") -> Path:
    return run / stage / "checkpoints"


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in folder.glob("step_*"))


def _train_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megadalle", "train", "--preset", "tiny", "--logging.run_dir", str(run),
            "--logging.progress", "false", "--logging.tensorboard", "false", "--train.synthetic_data", "true",
            "--train.micro_batch_size", "2", "--train.log_every", "50", *extra]


def test_a_second_writer_is_refused_and_the_first_finishes_intact(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(run, "--train.steps", "300", "--checkpoint.every_steps", "100",
                                        "--train.seed", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = run / "transformer" / ".lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip()):
        assert first.poll() is None and time.time() < deadline, "the first run never took its lock"
        time.sleep(0.2)
    second = subprocess.run(_train_cmd(run, "--train.steps", "300", "--train.seed", "2"), capture_output=True,
                            text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second tried: make it longer"
    assert second.returncode == 2
    assert f"is in use by pid {first.pid} on host" in second.stderr and "another logging.run_dir" in second.stderr
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    ckpts = _ckpts(run, "transformer")
    assert (ckpts / "latest").read_text() == "step_00000300"
    assert "seed: 1" in (ckpts / "step_00000300" / "config.yaml").read_text()  # the first run's, not the second's
    assert lock.read_text() == ""  # released on a clean exit


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    """flock dies with its process: a lock file left by a SIGKILLed run does not block the next."""
    run = tmp_path / "run"
    holder = subprocess.Popen(_train_cmd(run, "--train.steps", "100000", "--checkpoint.every_steps", "100000"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = run / "transformer" / ".lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip()):
        assert holder.poll() is None and time.time() < deadline
        time.sleep(0.2)
    holder.kill()
    holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the stale record is still there
    with caplog.at_level("WARNING", logger="megadalle.training"):
        assert cli.main(["train", "--preset", "tiny", "--logging.run_dir", str(run), "--logging.progress", "false",
                         "--logging.tensorboard", "false", "--train.synthetic_data", "true",
                         "--train.micro_batch_size", "2", "--train.steps", "1"]) == 0
    assert f"took over the lock left by pid {holder.pid}" in caplog.text


def test_resuming_an_older_step_sets_newer_checkpoints_aside(tmp_path, caplog):
    cfg = {"train.steps": 10, "checkpoint.every_steps": 1, "checkpoint.keep_last": 3, "checkpoint.keep_every": 5}
    ToyTrainer(toy_config(tmp_path, **cfg), dropout=0.0).train()
    folder = _ckpts(tmp_path)
    assert _steps(folder) == [5, 8, 9, 10]
    with caplog.at_level("WARNING", logger="megadalle.training"):
        s = ToyTrainer(toy_config(tmp_path, **{**cfg, "train.steps": 7, "checkpoint.resume": str(folder / "step_00000005")}),
                       dropout=0.0).train()
    assert s.resumed_from.endswith("step_00000005") and s.final_step == 7
    (aside,) = (tmp_path / "toy").glob("abandoned-*")
    assert _steps(aside) == [8, 9, 10] and (aside / "latest").read_text() == "step_00000010"
    assert _steps(folder) == [5, 6, 7] and (folder / "latest").read_text() == "step_00000007"
    assert "moved the 3 newer checkpoint(s)" in caplog.text and "nothing was deleted" in caplog.text
    # latest is valid for both resume and inspect.
    assert ToyTrainer(toy_config(tmp_path, **{**cfg, "train.steps": 8}), dropout=0.0).train().resumed_from.endswith(
        "step_00000007")
    assert cli.main(["inspect", str(folder)]) == 0


def test_a_lost_latest_file_resumes_from_the_newest_complete_checkpoint(tmp_path, caplog):
    ToyTrainer(toy_config(tmp_path), dropout=0.0).train()
    folder = _ckpts(tmp_path)
    (folder / "latest").unlink()
    (folder / "step_00000009").mkdir()  # an incomplete folder (no meta.json) is not a candidate
    with caplog.at_level("WARNING", logger="megadalle.training"):
        s = ToyTrainer(toy_config(tmp_path, **{"train.steps": 9}), dropout=0.0).train()
    assert s.resumed_from.endswith("step_00000006") and s.final_step == 9
    assert "no latest file; resuming from the newest complete checkpoint, step_00000006" in caplog.text
    assert (folder / "step_00000003").is_dir()  # not pruned as if the run had started over


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real file system that can fill up (needs root, as on CI and here)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the disk-full case needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_save_with_a_message_and_keeps_the_previous_checkpoint(small_disk):
    run = small_disk / "run"
    ToyTrainer(toy_config(run, **{"train.steps": 3}), dropout=0.0).train()
    folder = _ckpts(run)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 64 * 1024))  # leave 64 KiB: metrics lines fit, a checkpoint does not
    with pytest.raises(CheckpointError, match=r"saving the checkpoint of step 6 in .* failed \(.*the file system "
                                              r"is full.*\); the previous checkpoint \(step_00000003\) is intact"):
        ToyTrainer(toy_config(run), dropout=0.0).train()
    assert (folder / "latest").read_text() == "step_00000003" and not list(folder.glob(".tmp-*"))
    filler.unlink()
    s = ToyTrainer(toy_config(run), dropout=0.0).train()
    assert s.resumed_from.endswith("step_00000003") and s.final_step == 6


def test_a_read_only_or_impossible_run_folder_is_one_line(small_disk, tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--logging.progress", "false", "--logging.tensorboard", "false",
            "--train.synthetic_data", "true", "--train.steps", "1", "--logging.run_dir"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert cli.main([*args, str(small_disk / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the run folder" in err and "Read-only file system" in err and "Traceback" not in err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main([*args, str(a_file / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{a_file / 'run'}" in err and "Not a directory" in err and "Traceback" not in err
