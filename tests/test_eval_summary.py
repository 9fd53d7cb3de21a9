"""Accuracy aggregation and image files (grid, PNG, image prompt reading)."""

import pytest
import torch
from PIL import Image

from megadalle.errors import CommandError
from megadalle.eval.summary import Judgement, format_summary, summarise
from megadalle.data.images import load_image, make_grid, save_png


def test_summary_per_attribute_split_and_single_object():
    js = [
        Judgement("a red circle", "seen", 1, {"shape": True, "colour": True, "position": True}),
        Judgement("a red square", "seen", 1, {"shape": False, "colour": True, "position": True}),
        Judgement("a blue star", "heldout", 1, {"shape": True, "colour": True, "position": False}),
        Judgement("a red circle left of a blue star", "seen", 2,
                  {"shape": True, "colour": True, "position": True, "relation": True}),
    ]
    s = summarise(js)
    assert s["all"]["n"] == 4 and s["all"]["accuracy"] == 0.5
    assert s["seen"]["accuracy"] == pytest.approx(2 / 3)
    assert s["heldout"]["accuracy"] == 0.0
    assert s["single_object"]["all"]["n"] == 3
    assert s["single_object"]["all"]["accuracy"] == pytest.approx(1 / 3)
    assert s["single_object"]["seen"]["per_attribute"] == {"colour": 1.0, "position": 1.0, "shape": 0.5}
    assert s["single_object"]["all"]["per_attribute"]["position"] == pytest.approx(2 / 3)
    assert "relation" not in s["single_object"]["all"]["per_attribute"]
    assert s["all"]["per_attribute"]["relation"] == 1.0
    text = format_summary(s)
    assert "single-object captions" in text and "heldout" in text


def test_summary_of_empty_split_and_bad_split():
    s = summarise([Judgement("x", "seen", 1, {"shape": True})])
    assert s["heldout"] == {"n": 0, "accuracy": None, "per_attribute": {}}
    with pytest.raises(ValueError, match="split"):
        summarise([Judgement("x", "train", 1, {})])


def test_grid_layout_and_png_roundtrip(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 4), v / 4) for v in range(5)])
    g = make_grid(imgs, ncol=2, pad=1)
    assert g.shape == (3, 3 * 5 + 1, 2 * 5 + 1)
    assert torch.equal(g[:, 1:5, 6:10], imgs[1])  # row 0, column 1
    assert torch.equal(g[:, 11:15, 1:5], imgs[4])  # row 2, column 0
    p = save_png(g, tmp_path / "sub" / "grid.png")
    back = load_image(p, size=g.shape[1])  # square crop of an 16x11 image -> 11 wide
    assert back.shape == (3, 16, 16)
    with Image.open(p) as im:
        assert im.size == (11, 16)


def test_load_image_errors(tmp_path):
    with pytest.raises(CommandError, match="does not exist"):
        load_image(tmp_path / "none.png", 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CommandError, match="not a readable image"):
        load_image(bad, 8)
