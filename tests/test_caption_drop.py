"""Caption dropout for classifier-free guidance: which captions are dropped, and that the
trainer feeds the dropped ones to the model as the null caption (all padding)."""

from __future__ import annotations

import pytest
import torch

from megadalle.training.transformer_trainer import drop_captions
from tests.trainer_toy import make_transformer_trainer, probe_batch, transformer_config


def _text(n: int) -> torch.Tensor:
    return torch.arange(1, n * 8 + 1).view(n, 8) % 97 + 1  # no padding anywhere


def test_dropped_captions_become_all_padding_and_the_rest_are_unchanged():
    text = _text(400)
    keys = [f"s{i}" for i in range(400)]
    out = drop_captions(text, keys, 0.25, seed=0, update=3)
    dropped = (out == 0).all(1)
    assert torch.equal(out[~dropped], text[~dropped])
    assert 0.18 < dropped.float().mean() < 0.32
    assert torch.equal(drop_captions(text, keys, 0.0, seed=0, update=3), text)


def test_the_choice_depends_on_seed_update_and_key_only():
    text = _text(64)
    keys = [f"s{i}" for i in range(64)]
    whole = drop_captions(text, keys, 0.5, seed=1, update=7)
    # The same samples split over two "ranks", in a different order: the same choice per key.
    halves = torch.cat([drop_captions(text[32:], keys[32:], 0.5, 1, 7), drop_captions(text[:32], keys[:32], 0.5, 1, 7)])
    assert torch.equal(torch.cat([whole[32:], whole[:32]]), halves)
    assert not torch.equal(whole, drop_captions(text, keys, 0.5, seed=1, update=8))
    assert not torch.equal(whole, drop_captions(text, keys, 0.5, seed=2, update=7))


def test_keys_must_match_the_batch():
    with pytest.raises(ValueError, match="one key per sample"):
        drop_captions(_text(3), ["a", "b"], 0.5, 0, 0)


def test_trainer_trains_dropped_samples_on_the_null_caption(tmp_path):
    """The trainer's loss with caption_drop equals the loss of the same batch with the chosen
    captions replaced by padding; in eval mode nothing is dropped."""
    cfg = transformer_config(tmp_path, 1, **{"transformer.caption_drop": 0.5})
    trainer = make_transformer_trainer(cfg)
    trainer.setup()
    batch = probe_batch(cfg)
    batch = {"text": torch.cat([batch["text"]] * 4), "codes": torch.cat([batch["codes"]] * 4),
             "key": [f"k{i}" for i in range(8)]}
    expect_text = drop_captions(batch["text"], batch["key"], 0.5, cfg.train.seed, trainer.updates)
    assert 0 < int((expect_text == 0).all(1).sum()) < 8  # the check below needs both kinds
    from megadalle.training.transformer_trainer import dalle_loss

    with torch.no_grad():
        loss, _ = trainer.compute_loss(trainer.engine, batch)
        want = dalle_loss(cfg.transformer, expect_text, batch["codes"], *trainer.engine(expect_text, batch["codes"]))
        assert torch.equal(loss, want["loss"])
        trainer.engine.module.eval()
        loss_eval, _ = trainer.compute_loss(trainer.engine, batch)
        full = dalle_loss(cfg.transformer, batch["text"], batch["codes"], *trainer.engine(batch["text"], batch["codes"]))
        assert torch.equal(loss_eval, full["loss"])
    from megadalle.distributed import engine as dist

    dist.close_distributed()
