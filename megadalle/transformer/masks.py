"""Attention masks of the joint text+image stream: element-level definitions and block layouts.

Stream layout (S = T + N positions, T = text_len, N = grid * grid). Position p *predicts* token
x_p of [t_0 .. t_{T-1}, c_0 .. c_{N-1}] and *holds* the previous token x_{p-1}:

    position   0     1 .. T           T+1 .. T+N-1
    holds      BOS   t_0 .. t_{T-1}   c_0 .. c_{N-2}
    predicts   t_0   t_1 .. c_0 (p=T) c_1 .. c_{N-1}

so the stream is exactly 256 + 1024 = 1280 = 20 x 64 positions at full size (block-aligned),
every token is predicted (t_0 from BOS, c_0 from the position holding the last text token), and
the last image token is only ever a target.

Element-level rules (the ground truth; `allowed` spells them out one pair at a time):

* nothing sees the future: q <= p;
* text query (p < T): every earlier position (text->text causal);
* image query (p >= T, target image index j = p - T): every text position q <= T (BOS and the
  whole caption, in every layer), itself (q == p, which holds c_{j-1}), and image keys
  q = T + 1 + m (holding c_m, m < j) chosen by the layer type, always relative to the
  *target* j, so that e.g. the token right above the one being predicted is visible:

    row     j - m <= row_window (the previous row_window tokens of the target; default
            grid + 1, the paper's "previous 5" on a 4x4 grid, reaching the token one row up
            and one column left of the target)
    column  col(m) == col(j) (every token above the target in its column)
    conv    |row(m) - row(j)| <= k // 2 and |col(m) - col(j)| <= k // 2 (the causal half of
            the k x k neighbourhood around the target; k = conv_kernel, 11 in the paper)
    full    every m < j

Column layers are computed on the transposed grid: the image positions are reordered
column-major by their target (`column_permutation`), which turns the strided column pattern
into a band of contiguous key blocks, as the row pattern is in raster order. `attention_mask`
returns the mask in the order the attention kernels see it; `megadalle.transformer.attention`
applies and undoes the permutation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from megadalle.config import ATTENTION_TYPES, TransformerConfig
from megadalle.ops.layout import BlockLayout

BLOCK_SIZES = (16, 32, 64, 128)


def dalle_attention_schedule(depth: int) -> list[str]:
    """The paper's per-layer schedule (section 2.2, fig. 11): layer i (1-based) is "conv" in the
    last layer, "column" where (i - 2) % 4 == 0, "row" otherwise."""
    types = []
    for i in range(1, depth + 1):
        if i == depth:
            types.append("conv")
        elif (i - 2) % 4 == 0:
            types.append("column")
        else:
            types.append("row")
    return types


def layer_types(cfg: TransformerConfig) -> list[str]:
    """The attention type of each layer: the paper's schedule, or the configured list (repeated)."""
    if cfg.attention_schedule == "dalle":
        return dalle_attention_schedule(cfg.depth)
    parts = [p.strip() for p in cfg.attention_schedule.split(",") if p.strip()]
    return [parts[i % len(parts)] for i in range(cfg.depth)]


@dataclass(frozen=True)
class MaskGeometry:
    """Everything a mask depends on (hashable, so masks can be cached per geometry)."""

    text_len: int
    grid: int
    row_window: int
    conv_kernel: int

    def __post_init__(self) -> None:
        if self.text_len < 1 or self.grid < 1:
            raise ValueError(f"text_len and grid must be >= 1, got {self.text_len}, {self.grid}")
        if self.row_window < 1:
            raise ValueError(f"row_window must be >= 1, got {self.row_window}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd and >= 1, got {self.conv_kernel}")

    @classmethod
    def from_config(cls, cfg: TransformerConfig) -> "MaskGeometry":
        return cls(cfg.text_len, cfg.image_grid, cfg.row_window or cfg.image_grid + 1, cfg.conv_kernel)

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len


def _check_kind(kind: str) -> None:
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention type {kind!r}; choose one of {ATTENTION_TYPES}")


def allowed(g: MaskGeometry, kind: str, p: int, q: int) -> bool:
    """Whether query position p may attend to key position q: the rules, one pair at a time."""
    _check_kind(kind)
    T, W = g.text_len, g.grid
    if q > p:
        return False
    if p < T or q <= T or q == p:
        return True
    j, m = p - T, q - T - 1  # target image index of the query, image index the key holds
    if kind == "full":
        return True
    if kind == "row":
        return j - m <= g.row_window
    if kind == "column":
        return m % W == j % W
    half = g.conv_kernel // 2
    return abs(m // W - j // W) <= half and abs(m % W - j % W) <= half


def element_mask(g: MaskGeometry, kind: str) -> torch.Tensor:
    """bool [S, S] in raster order, True where query p may attend to key q (same rules, vectorised)."""
    _check_kind(kind)
    S, T, W = g.seq_len, g.text_len, g.grid
    p = torch.arange(S).view(S, 1)
    q = torch.arange(S).view(1, S)
    causal = q <= p
    always = (p < T) | (q <= T) | (q == p)
    j, m = p - T, q - T - 1
    if kind == "full":
        image = torch.ones(S, S, dtype=torch.bool)
    elif kind == "row":
        image = (j - m) <= g.row_window
    elif kind == "column":
        image = (m % W) == (j % W)
    else:
        half = g.conv_kernel // 2
        image = ((m.div(W, rounding_mode="floor") - j.div(W, rounding_mode="floor")).abs() <= half) & (
            (m % W - j % W).abs() <= half)
    return causal & (always | image)


def column_permutation(g: MaskGeometry, length: int | None = None) -> torch.Tensor:
    """long [L]: new order -> old position; image positions column-major by target, text untouched.

    For a prefix of the stream (length L < S, as in generation) the same order is restricted to
    the positions that exist, which keeps each column's positions contiguous.
    """
    T, W = g.text_len, g.grid
    L = g.seq_len if length is None else length
    # Target (row, col) of image position T + j is (j // W, j % W); column-major over the grid.
    j = torch.arange(g.image_len).view(W, W).t().reshape(-1)  # (col, row) -> raster index
    perm = torch.cat([torch.arange(T), T + j])
    return perm[perm < L]


class MaskSet:
    """One layer type's mask for one stream length, in every form a backend needs.

    Built once per (geometry, kind, length) by `mask_set` and shared by every layer of that type;
    device copies, flex BlockMasks and block layouts are made on first use and kept.
    """

    def __init__(self, g: MaskGeometry, kind: str, length: int) -> None:
        if not 1 <= length <= g.seq_len:
            raise ValueError(f"stream length {length} must be in [1, {g.seq_len}]")
        self.geometry, self.kind, self.length = g, kind, length
        raster = element_mask(g, kind)[:length, :length]
        self.raster = raster  # bool [L, L], raster order (what the KV-cached decoder uses)
        if kind == "column":
            self.perm: torch.Tensor | None = column_permutation(g, length)
            self.inv_perm: torch.Tensor | None = torch.argsort(self.perm)
            self.mask = raster[self.perm][:, self.perm]  # bool [L, L], transposed-grid order
        else:
            self.perm = self.inv_perm = None
            self.mask = raster
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}
        self._layouts: dict[int, BlockLayout] = {}
        self._flex: dict[tuple[str, int], object] = {}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """`mask`, `perm` or `inv_perm` on `device` (cached)."""
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    def layout(self, block_size: int) -> BlockLayout:
        if block_size not in self._layouts:
            self._layouts[block_size] = BlockLayout.from_dense_mask(self.mask, block_size)
        return self._layouts[block_size]

    def flex_block_mask(self, device: torch.device, block_size: int):
        key = (str(device), block_size)
        if key not in self._flex:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = self.on("mask", device)

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[q_idx, kv_idx]

            self._flex[key] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=self.length,
                                                KV_LEN=self.length, device=device, BLOCK_SIZE=block_size)
        return self._flex[key]

    def density(self) -> dict[str, float]:
        """Element density: kept pairs over all L*L pairs, over the causal pairs, and over the
        causal image->image pairs (image queries, keys holding image tokens), where the layer
        types differ."""
        T, L = self.geometry.text_len, self.length
        d = mask_density(self.raster)
        img = self.raster[T:, T + 1:]  # (image queries, keys holding image tokens)
        causal_img = torch.ones_like(img).tril(-1)
        d["image_of_causal"] = float(img.sum()) / max(int(causal_img.sum()), 1)
        return d


@functools.lru_cache(maxsize=64)
def mask_set(g: MaskGeometry, kind: str, length: int) -> MaskSet:
    _check_kind(kind)
    return MaskSet(g, kind, length)


def mask_density(mask: torch.Tensor) -> dict[str, float]:
    """Kept pairs, and their fraction of all S*S pairs and of the S(S+1)/2 causal pairs."""
    S = mask.shape[0]
    kept = int(mask.sum())
    return {"elements": kept, "of_all": kept / (S * S), "of_causal": kept / (S * (S + 1) // 2)}


def mask_report(cfg: TransformerConfig, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> dict[str, dict]:
    """Per layer type of the full stream: element densities and the block density of its layout
    at each block size (the fraction of block work a block-sparse kernel does)."""
    g = MaskGeometry.from_config(cfg)
    report = {}
    for kind in ATTENTION_TYPES:
        ms = mask_set(g, kind, g.seq_len)
        report[kind] = {**ms.density(), "block_density": {bs: ms.layout(bs).block_density for bs in block_sizes}}
    return report


def layout_for(cfg: TransformerConfig, kind: str, block_size: int | None = None) -> BlockLayout:
    """The block layout a kernel needs for one layer type of the full stream."""
    g = MaskGeometry.from_config(cfg)
    return mask_set(g, kind, g.seq_len).layout(block_size or cfg.block_size)
