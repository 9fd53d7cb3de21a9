"""Test helper: modules with the structure of OpenAI's `dall_e` package, to write pickles shaped
like the released `encoder.pkl` / `decoder.pkl` without having that package.

`pickle_as_dall_e(module, path)` registers these classes under the `dall_e.*` names while
torch.save runs, then removes them again, so that loading has to do without them. Their
attributes mirror the released classes (attrs fields such as `n_in`, `kw`, `use_float16`,
`device`, `requires_grad`), and forward passes follow the released code, so that the import can
be checked numerically against them.
"""

from __future__ import annotations

import math
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Conv2d(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True) -> None:
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        self.device, self.requires_grad = torch.device("cpu"), False
        w = torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw)
        self.w, self.b = nn.Parameter(w), nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        h = self.n_hid
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, h, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(h, h, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(h, h, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(h, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(EncoderBlock):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__(n_in, n_out, n_layers)
        h = self.n_hid
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, h, 1)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(h, h, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(h, h, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(h, n_out, 3))]))


class Encoder(nn.Module):
    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192) -> None:
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size, self.use_mixed_precision = input_channels, vocab_size, True
        n_layers = group_count * n_blk_per_group
        items: list = [("input", Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for g in range(group_count):
            width = 2 ** g * n_hid
            blocks: list = []
            for i in range(n_blk_per_group):
                blocks.append((f"block_{i + 1}", EncoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < group_count - 1:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            items.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        items.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_in, vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(items))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, group_count: int = 4, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2,
                 output_channels: int = 3, vocab_size: int = 8192) -> None:
        super().__init__()
        self.group_count, self.n_init, self.n_hid, self.n_blk_per_group = group_count, n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size, self.use_mixed_precision = output_channels, vocab_size, True
        n_layers = group_count * n_blk_per_group
        items: list = [("input", Conv2d(vocab_size, n_init, 1, use_float16=False))]
        n_in = n_init
        for g in range(group_count):
            width = 2 ** (group_count - 1 - g) * n_hid
            blocks: list = []
            for i in range(n_blk_per_group):
                blocks.append((f"block_{i + 1}", DecoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < group_count - 1:
                blocks.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            items.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        items.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_in, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(items))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


_HOMES = {"dall_e.utils": [Conv2d], "dall_e.encoder": [Encoder, EncoderBlock],
          "dall_e.decoder": [Decoder, DecoderBlock]}


def pickle_as_dall_e(obj: object, path: Path, zip_format: bool = True) -> Path:
    """torch.save `obj` with these classes pickled under their `dall_e.*` names."""
    saved = {}
    try:
        sys.modules["dall_e"] = types.ModuleType("dall_e")
        for mod_name, classes in _HOMES.items():
            mod = types.ModuleType(mod_name)
            for cls in classes:
                saved[cls] = cls.__module__
                cls.__module__ = mod_name
                setattr(mod, cls.__name__, cls)
            sys.modules[mod_name] = mod
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    finally:
        for cls, home in saved.items():
            cls.__module__ = home
        for name in ["dall_e", *_HOMES]:
            sys.modules.pop(name, None)
    return path
