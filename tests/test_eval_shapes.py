"""Shapes accuracy on hand-made cases: rendered ground truth scores 100%, wrong images do not."""

import dataclasses

import pytest
import torch

from megadalle.errors import CommandError
from megadalle.config import load_config
from megadalle.data import shapes as S
from megadalle.eval.shapes_accuracy import caption_split, eval_captions, heldout_of, judge
from megadalle.eval.summary import Judgement, summarise


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def test_rendered_ground_truth_scores_100_percent(cfg):
    heldout = heldout_of(cfg)
    cases = eval_captions(cfg, n_seen=12, n_heldout=6, n_pairs=4)
    assert len(cases) == 22
    js = [judge(S.render(facts, 64), text, heldout) for text, facts in cases]
    s = summarise(js)
    assert s["all"]["accuracy"] == 1.0
    assert s["single_object"]["seen"]["n"] == 12 and s["single_object"]["heldout"]["n"] == 6
    assert s["single_object"]["heldout"]["accuracy"] == 1.0
    assert all(v == 1.0 for v in s["all"]["per_attribute"].values())
    # A tensor image (what the dVAE decodes) is judged the same as a PIL one.
    text, facts = cases[0]
    img = torch.from_numpy(S.to_array(S.render(facts, 64))).permute(2, 0, 1).float()
    assert judge(img, text, heldout).correct


def test_wrong_images_fail_the_right_attribute(cfg):
    heldout = heldout_of(cfg)
    text, facts = eval_captions(cfg, n_seen=1, n_heldout=0, n_pairs=0)[0]
    o = facts.objects[0]
    other_colour = next(c for c in S.COLOURS if c != o.colour)
    other_shape = next(s for s in S.SHAPES if s != o.shape and {s, o.shape} != {"circle", "square"})
    row, col = (o.row + 1) % 3, o.col
    moved = dataclasses.replace(o, row=row, y=(row + 0.5) / 3)
    for changed, attr in ((dataclasses.replace(o, colour=other_colour), "colour"),
                          (dataclasses.replace(o, shape=other_shape), "shape"),
                          (moved, "position")):
        j = judge(S.render(S.ShapeFacts((changed,)), 64), text, heldout)
        assert not j.matches[attr] and not j.correct, (attr, j.matches)
    blank = torch.ones(3, 64, 64)
    assert not judge(blank, text, heldout).correct


def test_size_alone_does_not_fail_the_headline():
    j = Judgement("x", "seen", 1, {"shape": True, "colour": True, "position": True, "size": False,
                                   "count": True, "all": False})
    assert j.correct
    assert summarise([j])["all"]["per_attribute"]["size"] == 0.0


def test_split_and_bad_caption(cfg):
    heldout = heldout_of(cfg)
    shape, colour = sorted(heldout)[0]
    assert caption_split(S.parse_caption(f"a small {colour} {shape} at the top"), heldout) == "heldout"
    with pytest.raises(CommandError, match="names no shape"):
        judge(torch.ones(3, 64, 64), "a photo of a dog", heldout)
