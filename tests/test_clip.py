"""The contrastive reranker: loss math, model shapes, export round trip, reranking order."""

import math

import pytest
import torch
import torch.nn.functional as F

from megadalle.errors import CommandError
from megadalle.clip.loss import contrastive_loss
from megadalle.clip.model import ClipGeometry, ClipModel, load_clip, save_clip
from megadalle.clip.open_clip_loader import load_open_clip
from megadalle.clip.rerank import ClipReranker, rank, rerank
from megadalle.config import ClipConfig

torch.set_num_threads(1)
CFG = ClipConfig(dim=32, embed_dim=16, text_depth=1, heads=2, image_channels=8)
GEO = ClipGeometry(text_vocab_size=40, text_len=6, image_size=16)


def _model(seed: int = 0) -> ClipModel:
    torch.manual_seed(seed)
    return ClipModel(CFG, GEO)


def test_loss_matches_hand_computed_infonce():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, 0.4]]), dim=-1)
    log_scale = torch.tensor(math.log(10.0))
    out = contrastive_loss(img, txt, log_scale)
    logits = 10.0 * img @ txt.t()
    expected_i = -torch.log_softmax(logits, 1).diagonal().mean()
    expected_t = -torch.log_softmax(logits.t(), 1).diagonal().mean()
    assert torch.allclose(out["loss"], (expected_i + expected_t) / 2, atol=1e-6)
    assert torch.isclose(out["temperature"], torch.tensor(0.1))


def test_loss_counts_repeated_captions_as_positives():
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    same = torch.ones(2, 2, dtype=torch.bool)
    # Two identical pairs: without positives the loss is stuck at log 2; with them it is the
    # entropy of the (uniform) target, also log 2, but the *accuracy* is 1 and the gradient 0.
    with_pos = contrastive_loss(img, txt, torch.tensor(0.0), positives=same)
    assert with_pos["accuracy"] == 1.0
    assert torch.isclose(with_pos["loss"], torch.tensor(math.log(2.0)), atol=1e-6)


def test_temperature_is_capped_at_100():
    e = F.normalize(torch.randn(4, 8), dim=-1)
    out = contrastive_loss(e, e, torch.tensor(20.0))
    assert torch.isclose(out["temperature"], torch.tensor(0.01))


def test_model_shapes_and_padding():
    m = _model()
    images = torch.rand(3, 3, 16, 16)
    text = torch.tensor([[5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    img, txt = m.embed(images, text)
    assert img.shape == txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.isfinite(txt).all()
    # A row's embedding does not depend on the other rows of the batch (padding is masked).
    assert torch.allclose(m.encode_text(text[:1]), txt[:1], atol=1e-5)
    with pytest.raises(ValueError, match="text must be long"):
        m.encode_text(text[:, :4])


def test_training_separates_matched_pairs():
    """A few steps of the InfoNCE loss on colour/position toy images teach the match."""
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n=16):
        ids = torch.randint(1, 9, (n,), generator=g)
        images = torch.zeros(n, 3, 16, 16)
        for i, k in enumerate(ids.tolist()):
            colour, quadrant = k % 3, (k // 3) % 4
            r, c = divmod(quadrant, 2)
            images[i, colour, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 1.0
        text = torch.zeros(n, 6, dtype=torch.long)
        text[:, 0] = 10 + ids % 3
        text[:, 1] = 20 + (ids // 3) % 4
        return images, text

    fixed = batch(32)
    first = m.loss(*fixed)["loss"].item()
    for _ in range(40):
        loss = m.loss(*batch())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = m.loss(*fixed)
    assert last["loss"].item() < 0.6 * first
    assert last["accuracy"].item() > 0.5


def test_export_roundtrip_and_bad_files(tmp_path):
    m = _model(3)
    save_clip(m, tmp_path / "clip")
    back = load_clip(tmp_path / "clip")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(CommandError, match="clip.safetensors"):
        (tmp_path / "clip" / "clip.safetensors").unlink()
        load_clip(tmp_path / "clip")
    with pytest.raises(CommandError, match="clip.yaml"):
        load_clip(tmp_path / "nowhere")
    save_clip(m, tmp_path / "c2")
    (tmp_path / "c2" / "clip.yaml").write_text("clip: {dim: 32}\n")
    with pytest.raises(CommandError, match="not a reranker config"):
        load_clip(tmp_path / "c2")
    save_clip(_model(), tmp_path / "c3")
    (tmp_path / "c3" / "clip.safetensors").write_bytes(b"garbage")
    with pytest.raises(CommandError, match="does not match"):
        load_clip(tmp_path / "c3")


def test_rank_orders_by_score_stably():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, -1.0])
    assert rank(scores).tolist() == [1, 3, 2, 0, 4]
    with pytest.raises(ValueError):
        rank(scores.view(1, -1))


class _BrightnessScorer:
    """A scorer whose opinion is known: brighter images match better."""

    def score(self, images, captions):
        return images.mean(dim=(1, 2, 3))


def test_rerank_keeps_the_best_first():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.8, 0.5, 0.9)])
    top, scores = rerank(images, "anything", _BrightnessScorer(), top=3)
    assert top.tolist() == [3, 1, 2]
    assert scores.shape == (4,)
    with pytest.raises(ValueError, match="top=5"):
        rerank(images, "x", _BrightnessScorer(), top=5)


def test_clip_reranker_scores_in_batches():
    m = _model(1)

    def encode(captions):
        return torch.tensor([[len(c) % 40 or 1] + [0] * 5 for c in captions])

    images = torch.rand(5, 3, 16, 16)
    caps = ["a", "bb", "ccc", "dddd", "eeeee"]
    whole = ClipReranker(m, encode, batch_size=64).score(images, caps)
    parts = ClipReranker(m, encode, batch_size=2).score(images, caps)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert torch.allclose(whole, m.similarity(images, encode(caps)), atol=1e-6)


def test_open_clip_loader_errors_name_the_missing_piece(tmp_path):
    with pytest.raises(CommandError, match="does not exist"):
        load_open_clip("ViT-B-32", tmp_path / "missing.pt")
    with pytest.raises(CommandError, match="open_clip_model is empty"):
        load_open_clip("", tmp_path / "missing.pt")
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(CommandError, match="open_clip_torch"):
            load_open_clip("ViT-B-32", ckpt)
    else:
        with pytest.raises(CommandError, match="could not load"):
            load_open_clip("ViT-B-32", ckpt)
