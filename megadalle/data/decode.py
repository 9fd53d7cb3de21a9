"""Raw sample bytes -> checked, converted values; every rejection has a named reason.

Reasons a sample is skipped (counted per shard by the loader):

    missing_image, empty_image, undecodable_image (truncated or not an image), too_small
    (shorter side < data.min_image_side), extreme_aspect (long/short side > data.max_aspect_ratio),
    missing_caption, empty_caption, bad_codes (token shards), unreadable_file, too_large (more
    than data.max_image_pixels in the image header, or a member over shards.MAX_MEMBER_BYTES:
    checked before any pixel is decoded, so one image costs at most max_image_pixels x 4 bytes)

Conversions (the sample is kept, and counted):

    mode_<MODE> (grayscale, RGBA, CMYK, palette, 16-bit ... -> 8-bit RGB; transparency is
    composited onto white, 16-bit values are scaled, not clipped), caption_not_utf8 (decoded as
    cp1252, else latin-1, so no byte is lost), exif_rotated,
    duplicate_key (a second sample with the same key in a row, kept apart)
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from megadalle.data.shards import IMAGE_EXTS, TOO_LARGE, Record, codes_from_bytes

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: above any photo a text-image set keeps


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode_caption(record: Record, conversions: list[str]) -> str:
    if "_error" in record.files:
        raise BadSample("unreadable_file", record.files["_error"].decode("utf-8", "replace"))
    if TOO_LARGE in record.files:
        raise BadSample("too_large", record.files[TOO_LARGE].decode("utf-8", "replace"))
    raw = record.files.get("txt")
    if raw is None:
        raise BadSample("missing_caption", "no .txt member")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        conversions.append("caption_not_utf8")
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    text = text.strip()
    if not text:
        raise BadSample("empty_caption", "the .txt member is empty")
    return text


def _to_rgb(img: Image.Image, conversions: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    conversions.append(f"mode_{mode.replace(';', '')}")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit data use the full 0..65535 range; "I"/"F" may be anything: scale by the maximum
        # the mode can hold, so 8-bit-range values in an "I" image are not blown out.
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(record: Record, min_side: int, max_aspect: float, conversions: list[str],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The record's image as 8-bit RGB, or BadSample with the reason it is unusable."""
    if "_error" in record.files:
        raise BadSample("unreadable_file", record.files["_error"].decode("utf-8", "replace"))
    if TOO_LARGE in record.files:
        raise BadSample("too_large", record.files[TOO_LARGE].decode("utf-8", "replace"))
    ext = next((e for e in IMAGE_EXTS if e in record.files), None)
    if ext is None:
        raise BadSample("missing_image", f"no image member (looked for {', '.join(IMAGE_EXTS)})")
    data = record.files[ext]
    if len(data) == 0:
        raise BadSample("empty_image", f"{record.key}.{ext} is zero bytes")
    try:
        with warnings.catch_warnings():
            # Decompression-bomb and EXIF warnings would otherwise flood worker stderr.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: cheap checks before decoding pixels
            if min(w, h) < min_side:
                raise BadSample("too_small", f"{w}x{h} < data.min_image_side={min_side}")
            if max(w, h) / max(1, min(w, h)) > max_aspect:
                raise BadSample("extreme_aspect", f"{w}x{h} beyond data.max_aspect_ratio={max_aspect}")
            if w * h > max_pixels:  # before decoding: a small PNG can hold a huge canvas
                raise BadSample("too_large", f"{w}x{h} is {w * h:,} pixels, over data.max_image_pixels={max_pixels:,}")
            img.load()
            rotated = ImageOps.exif_transpose(img)
            if rotated is not None and rotated.size != img.size:
                conversions.append("exif_rotated")
                img = rotated
    except BadSample:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    return _to_rgb(img, conversions)


def decode_codes(record: Record, expected_len: int | None) -> np.ndarray:
    if "_error" in record.files:
        raise BadSample("unreadable_file", record.files["_error"].decode("utf-8", "replace"))
    if TOO_LARGE in record.files:
        raise BadSample("too_large", record.files[TOO_LARGE].decode("utf-8", "replace"))
    raw = record.files.get("codes.npy")
    if raw is None:
        raise BadSample("bad_codes", "no .codes.npy member")
    try:
        codes = codes_from_bytes(raw)
    except Exception as e:
        raise BadSample("bad_codes", f"{type(e).__name__}: {e}") from None
    if expected_len is not None and codes.size != expected_len:
        raise BadSample("bad_codes", f"{codes.size} codes, expected {expected_len}")
    return codes
