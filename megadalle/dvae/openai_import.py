"""Import OpenAI's released dVAE (`encoder.pkl`, `decoder.pkl`) without the `dall_e` package
and without running code from the pickles.

The released files are whole pickled `nn.Module`s whose classes live under `dall_e.*`. Loading
them normally would import `dall_e` and let the pickle call anything it names. Instead
`safe_unpickle.restricted_load` rebuilds tensors itself and allows exactly the class names a
dVAE pickle refers to, each mapped to an inert `PickledModule` that only receives the pickled
`__dict__`; no method of the original classes exists to be called. A pickle naming anything
else (say `os.system`) is refused before that name is ever resolved.

The parameter tree is then read from the modules' `_parameters` / `_modules` dictionaries; our
model uses the same names under `encoder.` / `decoder.` prefixes, so the mapping is a prefix.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from megadalle.errors import CommandError
from megadalle.config import ConfigError, DVAEConfig
from megadalle.dvae.io import check_state_matches, save_dvae
from megadalle.dvae.model import DiscreteVAE
from megadalle.dvae.safe_unpickle import RefusedGlobal, restricted_load

ENCODER_CLASS = "dall_e.encoder.Encoder"
DECODER_CLASS = "dall_e.decoder.Decoder"

# Every class a released dVAE pickle names. torch.nn containers are mapped to stand-ins too, so
# that no torch.nn.Module.__setstate__ runs on attacker-chosen state either.
PICKLED_CLASSES = (
    ENCODER_CLASS, "dall_e.encoder.EncoderBlock",
    DECODER_CLASS, "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)


class PickledModule:
    """Inert stand-in for a pickled module: holds its state, has no behaviour."""

    pickled_name = ""

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


def _stand_ins() -> dict[str, type]:
    return {full: type(full.rsplit(".", 1)[1], (PickledModule,), {"pickled_name": full, "__module__": __name__})
            for full in PICKLED_CLASSES}


def load_pickled_module(path: str | Path) -> PickledModule:
    """Unpickle one released module file into inert stand-ins (CPU tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{path} does not exist (expected OpenAI's encoder.pkl / decoder.pkl)")
    try:
        obj = restricted_load(path, _stand_ins())
    except RefusedGlobal as e:
        raise CommandError(
            f"refused to load {path}: it asks for {e.name}, which is not a tensor or one of the dall_e "
            f"dVAE module classes; nothing from the file was executed. Only OpenAI's released "
            f"encoder.pkl / decoder.pkl (or files of the same structure) can be imported") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, OSError, ValueError,
            TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
        raise CommandError(f"{path} is not a readable torch pickle ({type(e).__name__}: {e}); "
                           f"expected OpenAI's encoder.pkl / decoder.pkl") from None
    if not isinstance(obj, PickledModule):
        raise CommandError(f"{path} holds a {type(obj).__name__}, not a pickled dall_e module")
    return obj


def _name(obj: PickledModule) -> str:
    return obj.pickled_name


def collect_parameters(module: PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten `_parameters` / `_buffers` down the `_modules` tree into dotted names."""
    state = vars(module)
    out: dict[str, torch.Tensor] = {}
    for key in ("_parameters", "_buffers"):
        for name, t in (state.get(key) or {}).items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise CommandError(f"{prefix}{name} is a {type(t).__name__}, expected a tensor")
            out[prefix + name] = t.detach().to(torch.float32).contiguous()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PickledModule):
            raise CommandError(f"{prefix}{name} is a {type(child).__name__}, expected a module")
        out.update(collect_parameters(child, f"{prefix}{name}."))
    return out


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def infer_config(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], image_size: int) -> DVAEConfig:
    """Read the geometry off the tensor shapes (the pickles' attributes are not trusted)."""
    try:
        n_hid, channels = enc["blocks.input.w"].shape[:2]
        vocab = enc["blocks.output.conv.w"].shape[0]
        n_init, dec_vocab = dec["blocks.input.w"].shape[:2]
        out_ch, dec_hid = dec["blocks.output.conv.w"].shape[:2]
    except KeyError as e:
        raise CommandError(f"the pickles lack {e.args[0]}; they are not OpenAI dVAE encoder/decoder modules") from None
    groups, dec_groups = _count(enc, r"blocks\.group_(\d+)\."), _count(dec, r"blocks\.group_(\d+)\.")
    blocks, dec_blocks = _count(enc, r"blocks\.group_1\.block_(\d+)\."), _count(dec, r"blocks\.group_1\.block_(\d+)\.")
    pairs = {"vocab size": (vocab, dec_vocab), "n_hid": (n_hid, dec_hid), "group count": (groups, dec_groups),
             "blocks per group": (blocks, dec_blocks), "channels": (channels, out_ch // 2)}
    bad = [f"{k}: encoder {a} vs decoder {b}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise CommandError(f"encoder and decoder do not belong together ({'; '.join(bad)})")
    try:
        return DVAEConfig(image_size=image_size, channels=int(channels), n_hid=int(n_hid), n_init=int(n_init),
                          group_count=groups, n_blk_per_group=blocks, vocab_size=int(vocab))
    except ConfigError as e:
        raise CommandError(f"cannot build a dVAE config from the pickles: {e}") from None


def import_openai_dvae(encoder_pkl: str | Path, decoder_pkl: str | Path,
                       image_size: int = 256) -> tuple[DiscreteVAE, DVAEConfig]:
    enc_mod, dec_mod = load_pickled_module(encoder_pkl), load_pickled_module(decoder_pkl)
    for path, mod, want in ((encoder_pkl, enc_mod, ENCODER_CLASS), (decoder_pkl, dec_mod, DECODER_CLASS)):
        if _name(mod) != want:
            hint = " (are --encoder and --decoder swapped?)" if _name(mod) in (ENCODER_CLASS, DECODER_CLASS) else ""
            raise CommandError(f"{path} holds a {_name(mod)}, expected a {want}{hint}")
    enc, dec = collect_parameters(enc_mod), collect_parameters(dec_mod)
    cfg = infer_config(enc, dec, image_size)
    state = {f"encoder.{k}": v for k, v in enc.items()} | {f"decoder.{k}": v for k, v in dec.items()}
    model = DiscreteVAE(cfg)
    check_state_matches(model, state, f"{encoder_pkl} + {decoder_pkl}")
    model.load_state_dict(state)
    return model.eval(), cfg


def convert(encoder_pkl: str | Path, decoder_pkl: str | Path, out_dir: str | Path,
            image_size: int = 256, force: bool = False) -> tuple[Path, DVAEConfig]:
    out = Path(out_dir)
    if (out / "dvae.safetensors").exists() and not force:
        raise CommandError(f"{out} already holds a dVAE; pass --force to overwrite it or choose another --out")
    model, cfg = import_openai_dvae(encoder_pkl, decoder_pkl, image_size)
    return save_dvae(model, cfg, out), cfg
