"""The paper's discrete VAE: a convolutional encoder to a grid of categorical logits and a
decoder from (relaxed) one-hot codes back to logit-Laplace pixel statistics.

Module and parameter names follow OpenAI's released `dall_e` package
(`blocks.group_1.block_1.res_path.conv_1.w`, convolutions store `w` [out, in, k, k] and `b`),
so that importing their checkpoints is a prefix map (see `openai_import.py`).

Nothing here knows about distribution or DeepSpeed; the model only takes a `DVAEConfig`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.config import DVAEConfig
from megadalle.dvae import loss as L


def _autocast_active(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast (meta)
        return False


class Conv2d(nn.Module):
    """A 'same'-padded convolution with OpenAI's parameter names `w` and `b`.

    `fp32=True` keeps the computation in float32 whatever the surrounding precision: the paper
    runs the encoder's last conv (the 8192-way logits) and the decoder's first conv (the
    codebook applied to a softmax over 8192 codes) in fp32, because 16-bit sums over that many
    terms lose the small probabilities.
    """

    def __init__(self, n_in: int, n_out: int, kw: int, fp32: bool = False) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd for 'same' padding, got {kw}")
        self.n_in, self.n_out, self.kw, self.fp32 = n_in, n_out, kw, fp32
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.empty(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # OpenAI's initialisation: N(0, 1/fan_in), zero bias.
        if self.w.device.type != "meta":
            with torch.no_grad():
                self.w.normal_(std=1.0 / math.sqrt(self.n_in * self.kw ** 2))
                self.b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kw - 1) // 2
        autocast = _autocast_active(x.device.type)
        if self.fp32:
            if autocast:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=pad)
            return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=pad)
        if not autocast:
            # Under DeepSpeed bf16/fp16 the weights are 16-bit while the fp32 layer before
            # hands over fp32 activations: compute in the weights' precision.
            x = x.to(self.w.dtype)
        return F.conv2d(x, self.w, self.b, padding=pad)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kw={self.kw}" + (", fp32" if self.fp32 else "")


class _BottleneckBlock(nn.Module):
    """Resblock of four relu+conv pairs, hidden width n_out/4, residual scaled by 1/n_layers^2.

    Submodule names (`id_path`, `res_path.conv_1` ...) are those of OpenAI's release, so that
    imported weights load by name; subclasses differ only in the kernel sizes.
    """

    kernels: tuple[int, int, int, int]

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(self.kernels, start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(widths[i - 1], widths[i], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_BottleneckBlock):
    """relu,3x3, relu,3x3, relu,3x3, relu,1x1."""

    kernels = (3, 3, 3, 1)


class DecoderBlock(_BottleneckBlock):
    """relu,1x1, relu,3x3, relu,3x3, relu,3x3."""

    kernels = (1, 3, 3, 3)


def _widths(cfg: DVAEConfig) -> list[int]:
    # Group g (0-based) of the encoder is 2^g * n_hid wide: n_hid, 2n_hid, 4n_hid, 8n_hid.
    return [2 ** g * cfg.n_hid for g in range(cfg.group_count)]


class Encoder(nn.Module):
    """[B, C, H, W] pixels already mapped to (eps, 1-eps) -> fp32 logits [B, V, H/2^(G-1), W/2^(G-1)]."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = _widths(cfg)
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.channels, cfg.n_hid, 7))]
        n_in = cfg.n_hid
        for g, width in enumerate(widths):
            group: list[tuple[str, nn.Module]] = []
            for i in range(cfg.n_blk_per_group):
                group.append((f"block_{i + 1}", EncoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < cfg.group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(n_in, cfg.vocab_size, 1, fp32=True)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Relaxed one-hot codes [B, V, g, g] -> logit-Laplace statistics [B, 2C, g*2^(G-1), ...].

    Channels [:C] are the locations mu (in logit space), [C:] the log-scales ln b.
    """

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = list(reversed(_widths(cfg)))
        # The first conv is the codebook: a 1x1 conv over the V one-hot channels.
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.vocab_size, cfg.n_init, 1, fp32=True))]
        n_in = cfg.n_init
        for g, width in enumerate(widths):
            group: list[tuple[str, nn.Module]] = []
            for i in range(cfg.n_blk_per_group):
                group.append((f"block_{i + 1}", DecoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < cfg.group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(n_in, 2 * cfg.channels, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))
        self.init_pixel_value = cfg.init_pixel_value
        self.eps = cfg.logit_laplace_eps
        self.reset_output_bias()

    def reset_output_bias(self) -> None:
        """Output means start at `dvae.init_pixel_value` (if >= 0): the logit of the mapped value."""
        conv = self.blocks.output.conv
        if self.init_pixel_value < 0 or conv.b.device.type == "meta":
            return
        y = (1 - 2 * self.eps) * self.init_pixel_value + self.eps
        with torch.no_grad():
            conv.b[: conv.n_out // 2] = math.log(y / (1 - y))

    @property
    def codebook(self) -> Conv2d:
        return self.blocks.input

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Hard codes [B, g, g] -> statistics, without materialising the V-channel one-hot.

        Indexing the codebook's columns gives the one-hot convolution's result (one weight plus
        the bias; up to float rounding of the convolution's zero terms).
        """
        conv = self.codebook
        weight = conv.w.float().view(conv.n_out, conv.n_in)  # (n_init, V)
        h = weight[:, codes]  # (n_init, B, g, g)
        h = h.permute(1, 0, 2, 3) + conv.b.float().view(1, -1, 1, 1)  # (B, n_init, g, g)
        return self.blocks[1:](h)


class DiscreteVAE(nn.Module):
    """Encoder + decoder + the training objective (see DESIGN.md, "dVAE")."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    # ---- inference ----
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> fp32 logits [B, V, g, g]."""
        self._check_images(x)
        return self.encoder(L.map_pixels(x.float(), self.cfg.logit_laplace_eps))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> long tokens [B, g, g]: the argmax, no noise (stage-2 tokens)."""
        return self.logits(x).argmax(dim=1)

    def decode_stats(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, grid, grid], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.vocab_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.decoder.from_codes(codes.long())

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Tokens [B, g, g] (or [B, g*g]) -> images [B, C, H, W] in [0, 1]."""
        if codes.dim() == 2:
            g = self.cfg.grid_size
            codes = codes.view(codes.shape[0], g, g)  # (B, g, g) from row-major (B, g*g)
        return self.stats_to_image(self.decode_stats(codes))

    def stats_to_image(self, stats: torch.Tensor) -> torch.Tensor:
        mu = stats[:, : self.cfg.channels].float()
        return L.unmap_pixels(torch.sigmoid(mu), self.cfg.logit_laplace_eps)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.codes(x))

    # ---- training ----
    def forward(self, x: torch.Tensor, temperature: float, kl_weight: float,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.loss(x, temperature, kl_weight, noise)

    def loss(self, x: torch.Tensor, temperature: float, kl_weight: float,
             noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The paper's objective, normalised per pixel value (see `loss.elbo_terms`).

        `noise` is Gumbel noise shaped like the logits; the trainer passes noise drawn per
        sample so that results do not depend on how the batch is split over ranks.
        """
        logits = self.logits(x)  # (B, V, g, g) fp32
        if noise is None:
            noise = L.sample_gumbel(logits.shape, device=logits.device)
        z = L.gumbel_softmax(logits, temperature, noise, dim=1, hard=self.cfg.straight_through)
        stats = self.decoder(z)
        out = L.elbo_terms(x.float(), stats.float(), logits, kl_weight, self.cfg.logit_laplace_eps,
                           self.cfg.reconstruction_loss, self.cfg.gaussian_sigma)
        out["codes"] = logits.detach().argmax(dim=1)
        with torch.no_grad():
            out["recon"] = self.stats_to_image(stats.detach())
        return out

    def _check_images(self, x: torch.Tensor) -> None:
        c, s = self.cfg.channels, self.cfg.image_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"expected images [B, {c}, {s}, {s}] (dvae.image_size={s}), got {tuple(x.shape)}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
