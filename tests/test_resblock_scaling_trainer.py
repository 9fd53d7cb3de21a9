"""precision.mode=fp16_per_resblock through the real Trainer and DeepSpeed engines (ZeRO 1 and 2)."""

from __future__ import annotations

import pytest
import torch

from megadalle.distributed.engine import full_fp32_named_parameters
from megadalle.distributed.resblock_scaling import ResblockScaler
from test_resblock_scaling import poison_backward
from test_trainer import _nested_equal, _snapshot
from trainer_toy import ToyTrainer, losses, toy_config


class PoisonedToyTrainer(ToyTrainer):
    """Makes one step's backward overflow inside resblock 1 (as fp16 would), and records the
    parameters and optimizer state around it."""

    poison_at = 3

    def compute_loss(self, model, batch):
        handle = None
        if self.step + 1 == self.poison_at:
            self.before = (_params(self), _snapshot(self.engine.optimizer.state_dict()))
            handle = poison_backward(self.engine.module.resblocks[1].fc1, float("inf"))
        loss, metrics = super().compute_loss(model, batch)
        if handle is not None:
            handle.remove()
        return loss, metrics


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in full_fp32_named_parameters(trainer.engine)}


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_per_resblock_mode_trains_skips_and_resumes(tmp_path, zero):
    common = {"distributed.zero_stage": zero, "checkpoint.every_steps": 2}
    ToyTrainer(toy_config(tmp_path / "fp32", **common, **{"train.steps": 2}), dropout=0.0).train()
    ref = losses(tmp_path / "fp32")

    cfg = toy_config(tmp_path / "fp16", **common, **{"precision.mode": "fp16_per_resblock", "train.steps": 3})
    first = ToyTrainer(cfg.replace(**{"train.steps": 2}), dropout=0.0)
    first.train()
    assert isinstance(first.gradient_hook, ResblockScaler) and first.skipped == 0
    saved = first.gradient_hook.state_dict()
    got = losses(tmp_path / "fp16")
    # fp16 with per-resblock scales follows the fp32 run.
    for step in (1, 2):
        assert got[step] == pytest.approx(ref[step], rel=2e-3)

    # Resume and overflow in the last step (3): it is skipped.
    second = PoisonedToyTrainer(cfg, dropout=0.0)
    summary = second.train()
    scaler = second.gradient_hook
    assert summary.resumed_from.endswith("step_00000002")
    assert second.engine.zero_optimization_stage() == zero
    assert second.skipped == 1 and scaler.skipped == 1 and scaler.updates == 3
    # Resume restored the scales: block 1 was divided by sqrt(2) once on top of what was saved,
    # every other block grew once more.
    expect = saved["log2_scales"] + 1 / 1000
    expect[1] = saved["log2_scales"][1] - 0.5
    torch.testing.assert_close(scaler.log2_scales, expect)
    # Parameters and optimizer state are bit-identical to what step 2 left.
    params_before, opt_before = second.before
    after = _params(second)
    assert params_before.keys() == after.keys()
    assert all(torch.equal(params_before[k], after[k]) for k in after)
    assert _nested_equal(opt_before, _snapshot(second.engine.optimizer.state_dict()))
