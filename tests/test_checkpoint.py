"""Checkpoint manager: crash during save, retention, and clear errors for bad checkpoints.

Real DeepSpeed saves on disk; faults are injected by making the file system write fail midway
through a save (the manager itself is not replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import megadalle.training.checkpoint as ckpt_mod
from megadalle.training.checkpoint import CheckpointError, resolve_checkpoint
from trainer_toy import ToyTrainer, losses, toy_config


def _ckpts(run: Path) -> Path:
    return run / "toy" / "checkpoints"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A toy run with checkpoints at steps 3 and 6 (keep_last 3)."""
    run = tmp_path_factory.mktemp("trained")
    ToyTrainer(toy_config(run), dropout=0.0).train()
    return run


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ToyTrainer(toy_config(tmp_path, **{"train.steps": 3}), dropout=0.0).train()
    assert (_ckpts(tmp_path) / "latest").read_text() == "step_00000003"

    real_save = torch.save
    # Let DeepSpeed write its files for step 6, then fail on the first file of our own.
    def failing_save(obj, f, *a, **kw):
        if "step_00000006" in str(f) and Path(str(f)).name.startswith("rank_"):
            raise OSError("injected: disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"saving the checkpoint of step 6 in .*checkpoints failed "
                                              r"\(OSError: injected: disk full; [\d.]+ MiB free there\); the previous "
                                              r"checkpoint \(step_00000003\) is intact"):
        ToyTrainer(toy_config(tmp_path), dropout=0.0).train()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    folder = _ckpts(tmp_path)
    assert (folder / "latest").read_text() == "step_00000003"
    # The failed save removed its own temporary folder; nothing under the final name.
    assert not list(folder.glob(".tmp-*")) and not (folder / "step_00000006").exists()
    # A save that a killed run left behind (another run id) is removed by the next run, which
    # holds the folder's lock and so knows its writer is gone.
    (folder / ".tmp-step_00000006-deadbeef0000").mkdir()
    s = ToyTrainer(toy_config(tmp_path), dropout=0.0).train()
    assert s.resumed_from.endswith("step_00000003") and s.final_step == 6
    assert not list(folder.glob(".tmp-*")) and (folder / "latest").read_text() == "step_00000006"


def test_retention_keeps_last_n_and_every_k(tmp_path):
    cfg = toy_config(tmp_path, **{"train.steps": 9, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2,
                                  "checkpoint.keep_every": 4, "train.ema_decay": 0.0})
    ToyTrainer(cfg, dropout=0.0).train()
    kept = sorted(p.name for p in _ckpts(tmp_path).glob("step_*"))
    assert kept == ["step_00000004", "step_00000008", "step_00000009"]
    meta = json.loads((_ckpts(tmp_path) / "step_00000009" / "meta.json").read_text())
    assert meta["step"] == 9 and meta["world_size"] == 1 and "rank_00000.pt" in meta["files"]


def _resume(run: Path, **overrides) -> None:
    ToyTrainer(toy_config(run, **{"train.steps": 7, **overrides}), dropout=0.0).train()


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_reported(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    f = _ckpts(run) / "step_00000006" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="incomplete or corrupt.*mp_rank_00_model_states.pt has 100 bytes"):
        _resume(run)


def test_garbled_file_of_right_size_is_reported(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    f = _ckpts(run) / "step_00000006" / "trainer_state.pt"
    f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(CheckpointError, match="cannot read .*trainer_state.pt.*corrupt"):
        _resume(run)


def test_latest_pointing_to_missing_checkpoint(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    (_ckpts(run) / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match="points to 'step_00000099', which is missing"):
        _resume(run)


def test_mismatched_runs_are_refused(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    # Another ZeRO stage or number of ranks goes through DeepSpeed's universal checkpoint
    # (test_elastic_resume.py), except to and from ZeRO-0, which writes no ZeRO files.
    with pytest.raises(CheckpointError, match="between ZeRO-0 and ZeRO 1-3 is not supported"):
        _resume(run, **{"distributed.zero_stage": 1})
    with pytest.raises(CheckpointError, match="precision.mode=fp32 and this run uses bf16"):
        _resume(run, **{"precision.mode": "bf16"})


def test_different_model_config_is_refused(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")

    class Checked(ToyTrainer):
        model_sections = ("transformer",)

    with pytest.raises(CheckpointError, match=r"different model: transformer.depth: checkpoint 4, now 3"):
        Checked(toy_config(run, **{"train.steps": 7, "transformer.depth": 3}), dropout=0.0).train()


def test_resume_none_refuses_to_overwrite(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _resume(run, **{"checkpoint.resume": "none"})


def test_explicit_resume_paths(trained, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a megadalle checkpoint"):
        ckpt_mod.read_meta(tmp_path / "empty")
    assert resolve_checkpoint(_ckpts(trained)).name == "step_00000006"
    # Resuming an explicit earlier checkpoint into a fresh run folder continues from it.
    run = tmp_path / "from3"
    s = ToyTrainer(toy_config(run, **{"checkpoint.resume": str(_ckpts(trained) / "step_00000003")}),
                   dropout=0.0).train()
    assert s.steps_run == 3
    assert losses(run)[6] == losses(trained)[6]


def test_zero0_bf16_export_holds_the_fp32_masters(tmp_path):
    from megadalle.distributed.engine import full_fp32_named_parameters
    from megadalle.tools.zero_to_safetensors import consolidate

    t = ToyTrainer(toy_config(tmp_path, **{"precision.mode": "bf16", "train.steps": 3}), dropout=0.0)
    t.train()
    masters = dict(full_fp32_named_parameters(t.engine))
    state, ckpt, meta = consolidate(_ckpts(tmp_path))
    bf16 = ckpt_mod.load_torch(ckpt / "mp_rank_00_model_states.pt")["module"]
    assert meta["precision"] == "bf16" and state.keys() == masters.keys()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], masters[k]) for k in state)
    # ... which are not the rounded 16-bit copies the model ran with.
    assert any(not torch.equal(state[k], bf16[k].float()) for k in state)
    # Without the recorded names the masters cannot be paired: refused, not guessed.
    ts = ckpt / "trainer_state.pt"
    blob = ckpt_mod.load_torch(ts)
    blob["optimizer_group_names"] = None
    torch.save(blob, ts)
    meta["files"]["trainer_state.pt"] = ts.stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="without the fp32 master weights or their names"):
        consolidate(ckpt)
