"""A run folder may come from someone else: loading it never runs code.

Each checkpoint file that megadalle or DeepSpeed reads is replaced by a pickle whose `__reduce__`
would create a marker file, with meta.json updated so that the file looks complete. Every command
that reads checkpoints (`train` with and without `--resume`, `inspect`, `convert
zero-to-safetensors`) must refuse with a message naming the file and the global, exit non-zero,
and never create the marker. Real DeepSpeed checkpoints (ZeRO-1, so both DeepSpeed file kinds
exist), real commands in this process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megadalle import cli

STEP = "step_00000002"


class Payload:
    """Unpickling this runs os.system: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train(run: Path, *extra: str) -> int:
    return cli.main(["train", "--preset", "tiny", "--logging.run_dir", str(run), "--logging.progress", "false",
                     "--logging.tensorboard", "false", "--train.synthetic_data", "true", "--train.micro_batch_size",
                     "2", "--checkpoint.every_steps", "2", "--distributed.zero_stage", "1", "--train.ema_decay", "0",
                     *extra])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("clean")
    assert _train(run, "--train.steps", "2") == 0
    return run


FILES = ["trainer_state.pt", "rank_00000.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def _poison(clean: Path, dst: Path, name: str) -> tuple[Path, Path]:
    """A copy of the run whose `name` carries the payload next to its real contents."""
    run = Path(shutil.copytree(clean, dst))
    ckpt = run / "transformer" / "checkpoints" / STEP
    marker = dst.parent / f"pwned-{dst.name}"
    path = ckpt / name
    obj = torch.load(path, weights_only=False)  # our own clean file
    obj["extra_key"] = Payload(marker)
    torch.save(obj, path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = path.stat().st_size  # an attacker keeps meta.json consistent
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return run, marker


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("command", ["train", "train --resume latest", "train --resume PATH", "inspect", "convert"])
def test_a_malicious_pickle_never_runs(clean_run, tmp_path, capsys, name, command):
    run, marker = _poison(clean_run, tmp_path / "run", name)
    ckpts = run / "transformer" / "checkpoints"
    if command == "train":
        rc = _train(run, "--train.steps", "4")
    elif command == "train --resume latest":
        rc = _train(run, "--train.steps", "4", "--resume", "latest")
    elif command == "train --resume PATH":
        rc = _train(run, "--train.steps", "4", "--resume", str(ckpts / STEP))
    elif command == "inspect":
        rc = cli.main(["inspect", str(ckpts)])
    else:
        rc = cli.main(["convert", "zero-to-safetensors", str(ckpts), "--out", str(tmp_path / "w.safetensors")])
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert rc == 2
    assert f"refusing to load {ckpts / STEP / name}" in err and "posix.system" in err
    # Nothing was written over the folder either: the refused checkpoint is still the latest.
    assert (ckpts / "latest").read_text() == STEP and not (ckpts / "step_00000004").exists()


def test_forced_weights_only_holds_even_without_the_static_check(clean_run, tmp_path):
    """The static check names the offender; the guarantee is the forced weights-only load, which
    holds for a file swapped in after the check. Load a poisoned optimizer file through DeepSpeed's
    own reader inside `weights_only_loads()` directly."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megadalle import safe_load

    run, marker = _poison(clean_run, tmp_path / "run", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    path = run / "transformer" / "checkpoints" / STEP / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with safe_load.weights_only_loads(), pytest.raises(Exception, match="posix.system"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the block
    # The clean files of every kind load weights-only: the allow-list covers what DeepSpeed writes.
    for f in (clean_run / "transformer" / "checkpoints" / STEP).glob("*.pt"):
        safe_load.load_file(f)


def test_a_latest_file_pointing_outside_the_folder_is_refused(clean_run, tmp_path, capsys):
    run = Path(shutil.copytree(clean_run, tmp_path / "run"))
    ckpts = run / "transformer" / "checkpoints"
    (ckpts / "latest").write_text(f"../../../{tmp_path.name}")
    assert cli.main(["inspect", str(ckpts)]) == 2
    assert "not a checkpoint name like step_00001000" in capsys.readouterr().err
