"""Block-sparse layout: the contract between the transformer's masks and the attention kernels.

An element-level boolean mask (True = query may attend to key) over a sequence is cut into
square blocks of `block_size`. A block that is all False is dropped; a block that is all True
is "full"; any other block is "partial" and carries its own (block_size x block_size) element
mask. The kept blocks of each query-block row are stored CSR-style:

    row_ptr     int32 [n_q_blocks + 1]   kept blocks of query block i: row_ptr[i]:row_ptr[i+1]
    col_idx     int32 [nnz]              key-block index of each kept block, ascending per row
    partial_idx int32 [nnz]              -1 for a full block, else an index into block_masks
    block_masks bool  [n_partial, bs, bs] element masks of the partial blocks

Sequences whose length is not a multiple of block_size are padded with masked-out elements
(`seq_len` keeps the true length), so every kernel sees whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class LayoutArrays(NamedTuple):
    """The layout's arrays on one device, plus the transposed (CSC) copy used by backward passes:
    key block j is kept by query blocks t_row_idx[t_col_ptr[j]:t_col_ptr[j+1]] (ascending), whose
    element masks are block_masks[t_partial_idx[...]] (still indexed [query row, key col])."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    partial_idx: torch.Tensor
    block_masks: torch.Tensor
    t_col_ptr: torch.Tensor
    t_row_idx: torch.Tensor
    t_partial_idx: torch.Tensor


@dataclass(frozen=True)
class BlockLayout:
    seq_len: int
    block_size: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    partial_idx: torch.Tensor
    block_masks: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return (self.seq_len + self.block_size - 1) // self.block_size

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @property
    def block_density(self) -> float:
        """Kept blocks over all blocks: the fraction of block work a kernel does."""
        return self.nnz / float(self.n_blocks**2)

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_size: int) -> "BlockLayout":
        """Build the layout from an element-level (seq, seq) boolean mask."""
        if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a square bool (seq, seq) tensor, got {tuple(mask.shape)} {mask.dtype}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        seq = mask.shape[0]
        nb = (seq + block_size - 1) // block_size
        padded = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
        padded[:seq, :seq] = mask.cpu()
        # (nq, bs, nk, bs) -> (nq, nk, bs, bs)
        blocks = padded.view(nb, block_size, nb, block_size).permute(0, 2, 1, 3)
        any_ = blocks.flatten(2).any(-1)
        all_ = blocks.flatten(2).all(-1)
        row_ptr = [0]
        cols, pidx, pmasks = [], [], []
        for i in range(nb):
            for j in torch.nonzero(any_[i]).flatten().tolist():
                cols.append(j)
                if all_[i, j]:
                    pidx.append(-1)
                else:
                    pidx.append(len(pmasks))
                    pmasks.append(blocks[i, j].clone())
            row_ptr.append(len(cols))
        block_masks = (torch.stack(pmasks) if pmasks
                       else torch.zeros(0, block_size, block_size, dtype=torch.bool))
        return cls(seq, block_size, torch.tensor(row_ptr, dtype=torch.int32),
                   torch.tensor(cols, dtype=torch.int32), torch.tensor(pidx, dtype=torch.int32), block_masks)

    def to_dense_mask(self) -> torch.Tensor:
        """The element-level mask this layout allows (inverse of from_dense_mask)."""
        bs, nb = self.block_size, self.n_blocks
        out = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
        for i in range(nb):
            for k in range(int(self.row_ptr[i]), int(self.row_ptr[i + 1])):
                j = int(self.col_idx[k])
                p = int(self.partial_idx[k])
                out[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True if p < 0 else self.block_masks[p]
        return out[: self.seq_len, : self.seq_len]

    def validate(self) -> None:
        """Raise ValueError with a clear message if the arrays are not a consistent layout."""
        nb = self.n_blocks
        rp, ci, pi = self.row_ptr, self.col_idx, self.partial_idx
        for name, t in (("row_ptr", rp), ("col_idx", ci), ("partial_idx", pi)):
            if t.dtype != torch.int32 or t.dim() != 1:
                raise ValueError(f"layout.{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
        if rp.numel() != nb + 1:
            raise ValueError(f"layout.row_ptr has {rp.numel()} entries; expected n_blocks + 1 = {nb + 1}")
        if int(rp[0]) != 0 or int(rp[-1]) != ci.numel() or bool((rp[1:] < rp[:-1]).any()):
            raise ValueError("layout.row_ptr must start at 0, be non-decreasing and end at len(col_idx)")
        if pi.numel() != ci.numel():
            raise ValueError("layout.partial_idx must have one entry per col_idx entry")
        if ci.numel() and (int(ci.min()) < 0 or int(ci.max()) >= nb):
            raise ValueError(f"layout.col_idx values must be in [0, {nb})")
        for i in range(nb):
            row = ci[int(rp[i]):int(rp[i + 1])]
            if row.numel() > 1 and bool((row[1:] <= row[:-1]).any()):
                raise ValueError(f"layout.col_idx of query block {i} must be strictly ascending")
        bm = self.block_masks
        if bm.dtype != torch.bool or bm.dim() != 3 or tuple(bm.shape[1:]) != (self.block_size, self.block_size):
            raise ValueError(f"layout.block_masks must be bool (n, {self.block_size}, {self.block_size})")
        if pi.numel() and (int(pi.max()) >= bm.shape[0] or int(pi.min()) < -1):
            raise ValueError(f"layout.partial_idx values must be -1 or in [0, {bm.shape[0]})")

    # ---- derived arrays, computed once per layout (the dataclass is frozen; the cache is not a field)

    def _cache(self) -> dict:
        cache = self.__dict__.get("_derived")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_derived", cache)
        return cache

    def validate_once(self) -> None:
        """validate(), remembered: kernels call this on every use of a layout."""
        cache = self._cache()
        if not cache.get("valid"):
            self.validate()
            cache["valid"] = True

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_col_ptr, t_row_idx, t_partial_idx): the CSC of the kept blocks, on the CPU."""
        cache = self._cache()
        if "transposed" not in cache:
            nb = self.n_blocks
            rows = torch.repeat_interleave(torch.arange(nb, dtype=torch.int64),
                                           (self.row_ptr[1:] - self.row_ptr[:-1]).long())
            cols = self.col_idx.long()
            # Stable sort by column keeps the query blocks of each column ascending.
            order = torch.sort(cols * nb + rows).indices
            counts = torch.bincount(cols, minlength=nb)
            col_ptr = torch.zeros(nb + 1, dtype=torch.int32)
            col_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
            cache["transposed"] = (col_ptr, rows[order].to(torch.int32).contiguous(),
                                   self.partial_idx[order].contiguous())
        return cache["transposed"]

    def arrays(self, device: torch.device | str = "cpu") -> LayoutArrays:
        """All index arrays (and the transposed copy) on `device`, copied there once."""
        device = torch.device(device)
        key = ("arrays", device.type, device.index)
        cache = self._cache()
        if key not in cache:
            t = self.transposed()
            cache[key] = LayoutArrays(*(a.to(device).contiguous() for a in
                                        (self.row_ptr, self.col_idx, self.partial_idx, self.block_masks, *t)))
        return cache[key]

    def dense_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """to_dense_mask() on `device`, computed once."""
        device = torch.device(device)
        key = ("dense", device.type, device.index)
        cache = self._cache()
        if key not in cache:
            cache[key] = self.to_dense_mask().to(device)
        return cache[key]
