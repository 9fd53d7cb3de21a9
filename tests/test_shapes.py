"""The shapes data set: rendering, captions, analyser round trip, held-out split, determinism."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from megadalle.data import shapes as S
from megadalle.data.shapes import ShapesDataset, analyse, compare, parse_caption, render, score_caption


@pytest.mark.parametrize("size", [64, 128])
def test_render_analyse_round_trip_is_near_perfect(size):
    ds = ShapesDataset("train", seed=3, image_size=size, two_object_fraction=0.5)
    n = 150 if size == 64 else 60
    results = [compare(s.facts, analyse(ds.image(s))) for s in (ds.sample(i) for i in range(n))]
    summary = S.summarise_scores(results)
    assert summary["all"] >= 0.99, summary
    # Two-object scenes are in the mix and their relation is read back.
    assert any(len(ds.sample(i).facts.objects) == 2 for i in range(n))


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("degradation", ["blur+noise", "blur2", "jpeg20", "faded"])
def test_analyser_tolerates_blur_noise_and_artifacts(degradation):
    """Reconstructions and samples are blurry, noisy, washed out: the analyser must still read them."""
    ds = ShapesDataset("val", seed=1, image_size=64, two_object_fraction=0.5)
    rng = np.random.default_rng(0)

    def degrade(img):
        if degradation == "blur+noise":
            a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
            return np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
        if degradation == "blur2":
            return img.filter(ImageFilter.GaussianBlur(2.0))
        if degradation == "jpeg20":
            return _jpeg(img, 20)
        a = np.asarray(img, dtype=np.float64)  # desaturated, darker, on a grey background
        return (0.8 * (0.6 * a + 0.4 * a.mean(-1, keepdims=True)) + 10).astype(np.uint8)

    n = 80
    ok = sum(compare(s.facts, analyse(degrade(ds.image(s))))["all"] for s in (ds.sample(i) for i in range(n)))
    assert ok / n >= 0.97


def test_analyser_reads_tensors_and_reports_missing_objects():
    import torch

    facts = S.ShapeFacts((S.ObjectFacts("triangle", "blue", "large", 2, 0, 1 / 6, 5 / 6),))
    img = render(facts, 64)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    found = analyse(t)
    assert compare(facts, found)["all"]
    assert found.objects[0].position == "bottom left"
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    r = compare(facts, analyse(blank))
    assert not r["all"] and not r["count"] and not r["shape"]


def test_same_seed_same_bytes_and_different_seed_differs():
    a = ShapesDataset("train", seed=5)
    b = ShapesDataset("train", seed=5)
    c = ShapesDataset("train", seed=6)

    def png(ds, i):
        buf = io.BytesIO()
        ds.image(ds.sample(i)).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    assert [png(a, i) for i in range(5)] == [png(b, i) for i in range(5)]
    assert [a.sample(i).caption for i in range(20)] == [b.sample(i).caption for i in range(20)]
    assert [a.sample(i).caption for i in range(20)] != [c.sample(i).caption for i in range(20)]


def test_images_use_pure_palette_colours_and_large_enough_objects():
    ds = ShapesDataset("train", seed=0, image_size=64, max_objects=1)
    for i in range(20):
        s = ds.sample(i)
        a = np.asarray(ds.image(s)).reshape(-1, 3)
        colour = np.array(S.COLOURS[s.facts.objects[0].colour])
        assert (a == colour).all(-1).sum() > 0.02 * 64 * 64  # pure interior pixels present
        o = s.facts.objects[0]
        assert S.SIZES[o.size] * 64 >= 15  # about two 8-pixel tokens across


def test_heldout_combinations_never_in_train_and_always_in_heldout():
    held = S.heldout_combos(0, 0.15)
    assert len(held) == round(0.15 * len(S.SHAPES) * len(S.COLOURS))
    # Every shape and colour still appears in training with some partner.
    assert {s for s, _ in held} != set(S.SHAPES) or len(held) >= len(S.SHAPES)
    for shape in S.SHAPES:
        assert any((shape, c) not in held for c in S.COLOURS)
    train, val, heldout = (ShapesDataset(sp, seed=0, two_object_fraction=0.5) for sp in ("train", "val", "heldout"))
    for i in range(300):
        for o in train.sample(i).facts.objects + val.sample(i).facts.objects:
            assert (o.shape, o.colour) not in held
        assert any((o.shape, o.colour) in held for o in heldout.sample(i).facts.objects)
    assert S.heldout_combos(0, 0.0) == frozenset()
    with pytest.raises(ValueError, match="heldout_fraction"):
        ShapesDataset("heldout", heldout_fraction=0.0).sample(0)
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset("test")


def test_captions_vary_and_parse_back_to_their_facts():
    ds = ShapesDataset("train", seed=2, two_object_fraction=0.5)
    captions = set()
    for i in range(400):
        s = ds.sample(i)
        captions.add(s.caption.split(" ")[0])
        parsed = parse_caption(s.caption.upper() if i % 2 else s.caption)  # case does not matter
        assert parsed is not None, s.caption
        r = compare(parsed, s.facts)
        assert r["all"], (s.caption, parsed, s.facts, r)
    assert len(captions) >= 5  # several phrasings


@pytest.mark.parametrize("text, expect", [
    ("a red circle in the top left", dict(shape="circle", colour="red", position="top left")),
    ("top-left: a small red circle", dict(shape="circle", colour="red", size="small", position="top left")),
    ("there is a green square at the bottom of the image", dict(shape="square", colour="green", position="bottom")),
    ("a yellow cross in the center", dict(shape="cross", colour="yellow", position="centre")),
    ("a blue triangle", dict(shape="triangle", colour="blue", position=None)),
])
def test_parse_single(text, expect):
    f = parse_caption(text)
    o = f.objects[0]
    for k, v in expect.items():
        assert getattr(o, k) == v


@pytest.mark.parametrize("text, rel, first", [
    ("a blue square to the left of a green triangle", "left of", "square"),
    ("a blue square right of a green triangle", "right of", "square"),
    ("a red cross above a cyan circle", "above", "cross"),
    ("on the left a red cross, on the right a cyan circle", "left of", "cross"),
    ("at the top a red cross, at the bottom a cyan circle", "above", "cross"),
])
def test_parse_pairs(text, rel, first):
    f = parse_caption(text)
    assert f.relation == rel and f.objects[0].shape == first and len(f.objects) == 2


def test_score_caption_against_images():
    facts = S.ShapeFacts((S.ObjectFacts("square", "blue", "large", 1, 0, 1 / 6, 0.5),
                          S.ObjectFacts("triangle", "green", "small", 1, 2, 5 / 6, 0.5)), "left of")
    img = render(facts, 64)
    assert score_caption(img, "a blue square to the left of a green triangle")["all"]
    wrong = score_caption(img, "a blue square to the right of a green triangle")
    assert not wrong["all"] and not wrong["relation"] and wrong["shape"] and wrong["colour"]
    assert not score_caption(img, "a red square to the left of a green triangle")["colour"]
    assert score_caption(img, "nothing in the vocabulary") == {k: False for k in
                                                                ("shape", "colour", "size", "position",
                                                                 "relation", "count", "all")}
    single = S.ShapeFacts((S.ObjectFacts("circle", "red", "small", 0, 2, 5 / 6, 1 / 6),))
    img1 = render(single, 64)
    r = score_caption(img1, "a red circle in the top left")
    assert r["shape"] and r["colour"] and not r["position"] and not r["all"]
