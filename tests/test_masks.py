"""Masks against their element-level definition, and block layouts against the masks."""

import random

import pytest
import torch

from megadalle.config import ATTENTION_TYPES, load_config
from megadalle.transformer.masks import dalle_attention_schedule, layer_types
from megadalle.ops.layout import BlockLayout
from megadalle.transformer.masks import (BLOCK_SIZES, MaskGeometry, allowed, column_permutation, element_mask,
                                         mask_report, mask_set)

PAPER = MaskGeometry(text_len=256, grid=32, row_window=33, conv_kernel=11)
SMALL_GEOMETRIES = [
    MaskGeometry(1, 2, 3, 3),
    MaskGeometry(4, 4, 5, 3),  # the paper's 4x4 illustration
    MaskGeometry(3, 5, 2, 5),
    MaskGeometry(8, 6, 7, 11),  # kernel wider than the grid
    MaskGeometry(16, 8, 9, 5),
]


def _brute_force(g: MaskGeometry, kind: str, queries=None) -> torch.Tensor:
    rows = range(g.seq_len) if queries is None else queries
    return torch.tensor([[allowed(g, kind, p, q) for q in range(g.seq_len)] for p in rows])


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
@pytest.mark.parametrize("g", SMALL_GEOMETRIES, ids=lambda g: f"T{g.text_len}_g{g.grid}")
def test_vectorised_mask_equals_pairwise_definition(g, kind):
    assert torch.equal(element_mask(g, kind), _brute_force(g, kind))


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_paper_geometry_rows_match_pairwise_definition(kind):
    """32x32 image, 256 text tokens: every query row of the edges plus random rows, all keys."""
    rnd = random.Random(kind)
    T, N = PAPER.text_len, PAPER.image_len
    queries = sorted({0, 1, T - 1, T, T + 1, T + 31, T + 32, T + 33, T + N - 1} | set(rnd.sample(range(T + N), 24)))
    m = element_mask(PAPER, kind)
    assert torch.equal(m[queries], _brute_force(PAPER, kind, queries))


def _image_keys(g, m, j):
    """Image indices whose tokens the query predicting image token j sees (self excluded)."""
    T = g.text_len
    return {q - T - 1 for q in torch.nonzero(m[T + j]).flatten().tolist() if T < q < T + j}


def test_paper_structure_at_32x32():
    T, W = PAPER.text_len, PAPER.grid
    for kind in ATTENTION_TYPES:
        m = element_mask(PAPER, kind)
        assert not m.triu(1).any(), f"{kind} sees the future"
        assert m[T:, : T + 1].all(), f"{kind}: every image query sees BOS and the whole caption"
        assert torch.equal(m[:T, :T], torch.ones(T, T, dtype=torch.bool).tril()), "text is causal"
        assert m.diagonal().all()
    row, col, conv = (element_mask(PAPER, k) for k in ("row", "column", "conv"))
    for j in (1, 5, 32, 33, 34, 500, 1023):
        r, c = divmod(j, W)
        # Row: the previous 33 tokens of the target, reaching the one above and the one above-left.
        assert _image_keys(PAPER, row, j) | {j - 1} == set(range(max(0, j - 33), j))
        # Column: every token above the target in its column.
        assert _image_keys(PAPER, col, j) - {j - 1} == {rr * W + c for rr in range(r)}
        # Conv: the causal half of the 11x11 square around the target.
        want = {rr * W + cc for rr in range(r - 5, r + 1) for cc in range(c - 5, c + 6)
                if 0 <= rr and 0 <= cc < W and rr * W + cc < j}
        assert _image_keys(PAPER, conv, j) | {j - 1} == want | {j - 1}


def test_papers_4x4_figure_row_mask_sees_previous_five():
    g = MaskGeometry.from_config(load_config(overrides={"transformer.image_grid": 4, "transformer.text_len": 4,
                                                        "dvae.image_size": 32, "data.image_size": 32,
                                                        "tokenizer.text_len": 4}).transformer)
    assert g.row_window == 5
    m = element_mask(g, "row")
    # Predicting token 10 (row 2, col 2): sees tokens 5..9 -- token 6 is right above it.
    assert _image_keys(g, m, 10) | {9} == {5, 6, 7, 8, 9}


def test_schedule_is_the_papers_and_configurable():
    types = dalle_attention_schedule(64)
    assert types[63] == "conv" and types.count("conv") == 1
    assert [i + 1 for i, t in enumerate(types) if t == "column"] == list(range(2, 64, 4))
    assert layer_types(load_config(overrides={"transformer.depth": 5, "transformer.attention_schedule": "row, conv"}
                                      ).transformer) == ["row", "conv", "row", "conv", "row"]


def test_column_permutation_makes_the_column_mask_block_sparse():
    perm = column_permutation(PAPER)
    assert torch.equal(perm.sort().values, torch.arange(PAPER.seq_len))
    raster = element_mask(PAPER, "column")
    ms = mask_set(PAPER, "column", PAPER.seq_len)
    assert torch.equal(ms.mask, raster[perm][:, perm])
    # In raster order every query block of two image rows needs every column: dense blocks.
    raster_density = BlockLayout.from_dense_mask(raster, 64).block_density
    assert ms.layout(64).block_density < 0.65 * raster_density
    # Prefixes (generation) keep a valid permutation of the positions that exist.
    p = column_permutation(PAPER, 300)
    assert torch.equal(p.sort().values, torch.arange(300))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_layouts_cover_exactly_the_mask(block_size):
    for kind in ATTENTION_TYPES:
        ms = mask_set(PAPER, kind, PAPER.seq_len)
        lay = ms.layout(block_size)
        lay.validate()
        assert torch.equal(lay.to_dense_mask(), ms.mask), f"{kind} at {block_size}"
        # Each kept block holds at least one needed element; the dropped blocks hold none.
        nb = lay.n_blocks
        padded = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
        padded[: PAPER.seq_len, : PAPER.seq_len] = ms.mask
        needed = padded.view(nb, block_size, nb, block_size).any(3).any(1)
        kept = torch.zeros(nb, nb, dtype=torch.bool)
        for i in range(nb):
            kept[i, lay.col_idx[lay.row_ptr[i]:lay.row_ptr[i + 1]].long()] = True
        assert torch.equal(kept, needed)
        assert lay.block_density < 0.6 or kind == "full"


def test_mask_report_densities():
    rep = mask_report(load_config().transformer)
    assert set(rep) == set(ATTENTION_TYPES)
    assert rep["full"]["of_causal"] == 1.0 and rep["full"]["image_of_causal"] == 1.0
    for kind in ("row", "column", "conv"):
        assert rep[kind]["image_of_causal"] < 0.1, rep[kind]  # sparse image->image part
        assert rep[kind]["block_density"][64] < rep["full"]["block_density"][64]


def test_bad_geometry_and_kind_are_rejected():
    with pytest.raises(ValueError, match="conv_kernel"):
        MaskGeometry(4, 4, 5, 4)
    with pytest.raises(ValueError, match="row_window"):
        MaskGeometry(4, 4, 0, 3)
    with pytest.raises(ValueError, match="unknown attention type"):
        element_mask(SMALL_GEOMETRIES[0], "diagonal")
    with pytest.raises(ValueError, match="stream length"):
        mask_set(SMALL_GEOMETRIES[0], "row", 10_000)
