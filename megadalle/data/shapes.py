"""The built-in synthetic data set: coloured shapes on a plain background, with captions.

Everything an image shows is a small closed set of facts, so that a tiny dVAE and transformer
can learn it on a CPU in minutes and generated images can be scored against their captions:

- 4 shapes (circle, square, triangle, cross), 6 saturated colours one hue sextant apart,
- 2 sizes (small = 0.24, large = 0.34 of the image side; at 64 px a small object spans 15 px,
  about two 8x8-pixel dVAE tokens),
- one object in a cell of a 3x3 grid ("top left" ... "centre" ... "bottom right"), or two objects
  of different colours in the same row ("left of" / "right of") or column ("above" / "below").

Objects are drawn at 4x and box-filtered down: edges are antialiased by mixing with the white
background, which keeps every pixel's hue, so the analyser can segment by hue and stays robust to
the blur of dVAE reconstructions.

Generation is deterministic: scene `i` of split `s` comes from `numpy.random.default_rng([seed,
s, i])`, independent of how many scenes are generated or in which order. The compositional
held-out set is a set of (shape, colour) combinations chosen from the seed; "train" and "val"
scenes never use them, every "heldout" scene contains at least one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Saturated colours a hue sextant apart (~60 degrees), so that nearest-hue classification has
# ~25 degrees of margin either side.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "yellow": (235, 190, 0),
    "green": (20, 160, 40),
    "cyan": (0, 185, 185),
    "blue": (30, 50, 220),
    "purple": (150, 30, 190),
}
SIZES: dict[str, float] = {"small": 0.24, "large": 0.34}  # extent as a fraction of the image side
BACKGROUND = (255, 255, 255)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "heldout": 2}


def position_name(row: int, col: int) -> str:
    """(row, col) of the 3x3 grid -> "top left", "top", ..., "centre", ..., "bottom right"."""
    if row == 1 and col == 1:
        return "centre"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


POSITIONS: dict[str, tuple[int, int]] = {position_name(r, c): (r, c) for r in range(3) for c in range(3)}


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectFacts:
    """One object. Fields may be None in facts parsed from a caption that does not state them."""

    shape: str | None
    colour: str | None
    size: str | None = None
    row: int | None = None
    col: int | None = None
    # Exact centre as a fraction of the image side (rendering only; not compared).
    x: float | None = None
    y: float | None = None

    @property
    def position(self) -> str | None:
        return None if self.row is None or self.col is None else position_name(self.row, self.col)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["position"] = self.position
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ObjectFacts":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class ShapeFacts:
    """A scene: one or two objects; `relation` says where objects[0] is relative to objects[1]."""

    objects: tuple[ObjectFacts, ...]
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "relation": self.relation}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeFacts":
        return cls(tuple(ObjectFacts.from_dict(o) for o in d["objects"]), d.get("relation"))


def relation_between(a: ObjectFacts, b: ObjectFacts) -> str | None:
    """The relation of a to b when they share a row or a column; None otherwise."""
    if None in (a.row, a.col, b.row, b.col):
        return None
    if a.row == b.row and a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


# --------------------------------------------------------------------------------------------
# Held-out combinations and scene sampling
# --------------------------------------------------------------------------------------------


def heldout_combos(seed: int, fraction: float) -> frozenset[tuple[str, str]]:
    """(shape, colour) pairs never seen in training, chosen from `seed`.

    Picked so that each shape and each colour is held out as rarely as possible: every shape and
    every colour keeps appearing in training with other partners, which is what makes the
    held-out set a test of composition rather than of unseen words.
    """
    n = int(round(fraction * len(SHAPES) * len(COLOURS)))
    n = min(n, len(SHAPES) * (len(COLOURS) - 1))  # keep at least one colour per shape in train
    if n == 0:
        return frozenset()
    rng = np.random.default_rng([seed, 7919])
    chosen: list[tuple[str, str]] = []
    shape_count = {s: 0 for s in SHAPES}
    colour_count = {c: 0 for c in COLOURS}
    candidates = [(s, c) for s in SHAPES for c in COLOURS]
    order = rng.permutation(len(candidates))
    while len(chosen) < n:
        # Greedy: the unchosen combination whose shape and colour are least used so far.
        best = min((candidates[i] for i in order if candidates[i] not in chosen),
                   key=lambda sc: shape_count[sc[0]] + colour_count[sc[1]])
        chosen.append(best)
        shape_count[best[0]] += 1
        colour_count[best[1]] += 1
    return frozenset(chosen)


def _place(rng: np.random.Generator, size: str, row: int, col: int, jitter: float) -> tuple[float, float]:
    extent = SIZES[size]
    # Keep the whole object inside its cell, so that the cell is unambiguous.
    room = max(0.0, (1 / 3 - extent) / 2 - 0.01)
    j = min(jitter, room)
    x = (col + 0.5) / 3 + (rng.uniform(-j, j) if j > 0 else 0.0)
    y = (row + 0.5) / 3 + (rng.uniform(-j, j) if j > 0 else 0.0)
    return float(x), float(y)


def sample_scene(rng: np.random.Generator, split: str, heldout: frozenset[tuple[str, str]],
                 max_objects: int = 2, two_object_fraction: float = 0.3, jitter: float = 0.025) -> ShapeFacts:
    """Draw the facts of one scene for `split` ("train", "val" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    all_combos = [(s, c) for s in SHAPES for c in COLOURS]
    seen = [sc for sc in all_combos if sc not in heldout]
    if split == "heldout" and not heldout:
        raise ValueError("the heldout split is empty: data.shapes.heldout_fraction is 0")
    two = max_objects >= 2 and rng.random() < two_object_fraction
    first_pool = sorted(heldout) if split == "heldout" else seen
    first = first_pool[rng.integers(len(first_pool))]
    sizes = [tuple(SIZES)[rng.integers(len(SIZES))] for _ in range(2)]
    if not two:
        cell = int(rng.integers(9))
        row, col = divmod(cell, 3)
        x, y = _place(rng, sizes[0], row, col, jitter)
        return ShapeFacts((ObjectFacts(first[0], first[1], sizes[0], row, col, x, y),))
    # Second object: a different colour (the analyser separates objects by colour); from the seen
    # combinations except in the heldout split, where either partner may be anything.
    second_pool = [sc for sc in (all_combos if split == "heldout" else seen) if sc[1] != first[1]]
    second = second_pool[rng.integers(len(second_pool))]
    pair = [first, second]
    if rng.random() < 0.5:
        pair.reverse()
        sizes.reverse()
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    line = int(rng.integers(3))
    a, b = sorted(int(v) for v in rng.choice(3, size=2, replace=False))
    # (a, b) with a < b: objects[0] goes to a for "left of"/"above", to b otherwise.
    if relation in ("right of", "below"):
        a, b = b, a
    cells = [(line, a), (line, b)] if relation in ("left of", "right of") else [(a, line), (b, line)]
    objects = []
    for (shape, colour), size, (row, col) in zip(pair, sizes, cells):
        x, y = _place(rng, size, row, col, jitter)
        objects.append(ObjectFacts(shape, colour, size, row, col, x, y))
    return ShapeFacts(tuple(objects), relation)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4


def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":  # pointing up, filling its bounding box
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "cross":  # a plus sign with arms a third of the extent wide
        t = half / 3
        return [(cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t),
                (cx + half, cy + t), (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half),
                (cx - t, cy + t), (cx - half, cy + t), (cx - half, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill: Any) -> None:
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, half), fill=fill)


def render(facts: ShapeFacts, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels (deterministic)."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in facts.objects:
        half = SIZES[o.size] * big / 2
        # Pixel centres: the continuous coordinate u maps to pixel u*big - 0.5.
        _draw(draw, o.shape, o.x * big - 0.5, o.y * big - 0.5, half, COLOURS[o.colour])
    return img.resize((size, size), Image.Resampling.BOX)


def _resize_float(a: np.ndarray, res: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((res, res), Image.Resampling.BILINEAR))


def _soft_crop(soft: np.ndarray, res: int) -> np.ndarray | None:
    """Crop a soft mask (values in [0, 1]) to the box where it exceeds 1/2, scaled to res x res."""
    ys, xs = np.nonzero(soft > 0.5)
    if len(ys) == 0:
        return None
    return _resize_float(soft[ys.min():ys.max() + 1, xs.min():xs.max() + 1], res)


# Blur of the templates, as a fraction of the object's extent: rendered images are sharp, dVAE
# reconstructions and samples are not, and blur rounds a small triangle's corners towards a
# circle. Comparing with a template blurred the same way (and cropped at the same half level)
# keeps the shapes apart.
_TEMPLATE_BLURS = (0.0, 0.04, 0.08, 0.12, 0.16)
_TEMPLATE_RES = 24


def _templates(res: int = _TEMPLATE_RES) -> list[tuple[str, np.ndarray]]:
    out = []
    extent = 128
    big = 2 * extent
    for shape in SHAPES:
        img = Image.new("L", (big, big), 0)
        _draw(ImageDraw.Draw(img), shape, big / 2 - 0.5, big / 2 - 0.5, extent / 2, 255)
        for blur in _TEMPLATE_BLURS:
            b = img.filter(ImageFilter.GaussianBlur(blur * extent)) if blur else img
            out.append((shape, _soft_crop(np.asarray(b, dtype=np.float32) / 255, res)))
    return out


_TEMPLATES = _templates()


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_SINGLE_TEMPLATES = (
    "a {obj} {in_pos}",
    "{label}: a {obj}",
    "there is a {obj} {at_pos} of the image",
    "{in_pos}, a {obj}",
    "a picture of a {obj} {in_pos}",
    "a {obj} placed {at_pos}",
)
_PAIR_TEMPLATES = {
    "left of": ("a {a} to the left of a {b}", "a {a} left of a {b}", "a {b} to the right of a {a}",
                "on the left a {a}, on the right a {b}"),
    "right of": ("a {a} to the right of a {b}", "a {a} right of a {b}", "a {b} to the left of a {a}",
                 "on the left a {b}, on the right a {a}"),
    "above": ("a {a} above a {b}", "a {b} below a {a}", "a {a} on top of a {b}",
              "at the top a {a}, at the bottom a {b}"),
    "below": ("a {a} below a {b}", "a {b} above a {a}", "a {a} underneath a {b}",
              "at the top a {b}, at the bottom a {a}"),
}


def _in_pos(name: str) -> str:
    if name == "centre":
        return "in the centre"
    if name in ("top", "bottom"):
        return f"at the {name}"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"in the {name}"


def _at_pos(name: str) -> str:
    return "in the centre" if name == "centre" else f"at the {name}"


def _obj_phrase(o: ObjectFacts) -> str:
    return f"{o.size} {o.colour} {o.shape}"


def caption(facts: ShapeFacts, rng: np.random.Generator) -> str:
    """One caption for `facts`, its phrasing drawn from `rng`."""
    if len(facts.objects) == 1:
        o = facts.objects[0]
        pos = o.position
        label = pos.replace(" ", "-") if rng.random() < 0.5 else pos
        template = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
        return template.format(obj=_obj_phrase(o), in_pos=_in_pos(pos), at_pos=_at_pos(pos), label=label)
    a, b = facts.objects
    options = _PAIR_TEMPLATES[facts.relation]
    return options[rng.integers(len(options))].format(a=_obj_phrase(a), b=_obj_phrase(b))


_WORD = re.compile(r"[a-z]+")
_REL_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below",
              "underneath": "below", "top": "above"}


def parse_caption(text: str) -> ShapeFacts | None:
    """Read the facts stated by a caption in the shapes vocabulary (None if it names no shape).

    Unstated attributes stay None (pair captions state no grid cell; they state the relation).
    Understands every phrasing `caption` produces, in any letter case, "center"/"middle" and
    "top-left" spellings.
    """
    words = _WORD.findall(text.lower().replace("center", "centre"))
    objects: list[tuple[int, ObjectFacts]] = []
    for i, w in enumerate(words):
        if w in SHAPES:
            colour = size = None
            for prev in reversed(words[max(0, i - 3):i]):
                if prev in COLOURS and colour is None:
                    colour = prev
                elif prev in SIZES and size is None:
                    size = prev
            objects.append((i, ObjectFacts(w, colour, size)))
    if not objects:
        return None
    if len(objects) == 1:
        rest = [w for i, w in enumerate(words) if w not in SHAPES and w not in COLOURS and w not in SIZES]
        row = 0 if "top" in rest else 2 if "bottom" in rest else 1
        col = 0 if "left" in rest else 2 if "right" in rest else 1
        stated = any(w in rest for w in ("top", "bottom", "left", "right", "centre", "middle"))
        o = objects[0][1]
        if stated:
            o = dataclasses.replace(o, row=row, col=col)
        return ShapeFacts((o,))
    (ia, a), (ib, b) = objects[:2]
    between = words[ia + 1:ib]
    before = words[:ia]
    relation = None
    # "on the left a X, on the right a Y" / "at the top a X, at the bottom a Y": the first
    # object's place comes before it.
    for word, rel in (("left", "left of"), ("right", "right of"), ("top", "above"), ("bottom", "below")):
        if word in before:
            relation = rel
            break
    if relation is None:
        relation = next((_REL_WORDS[w] for w in between if w in _REL_WORDS), None)
    return ShapeFacts((a, b), relation)


# --------------------------------------------------------------------------------------------
# Analysis: image -> facts
# --------------------------------------------------------------------------------------------

# Pixels whose chroma (max - min channel, in [0, 1]) exceeds this have a reliable hue and seed
# an object (the palette's chroma is 0.55-0.85; lowered for washed-out images).
CHROMA_THRESHOLD = 0.3
_MIN_AREA_FRACTION = 0.008  # smaller colour blobs are noise (a small triangle covers ~0.029)
_SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of float RGB in [0, 1], shape (..., 3) -> (...)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


_PALETTE_HUES = _hue(np.array(list(COLOURS.values()), dtype=np.float64) / 255)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask.

    Label propagation takes as many numpy passes as the component is wide, so large images are
    labelled on a coarse grid (cells of `f` x `f` pixels, kept where any pixel is set) and the
    full-resolution mask is cut to the winning cells: objects are separated by far more than a
    cell, noise specks fall outside.
    """
    h, w = mask.shape
    f = max(1, min(h, w) // 64)
    if f > 1:
        hh, ww = h // f * f, w // f * f
        coarse = mask[:hh, :ww].reshape(hh // f, f, ww // f, f).any(axis=(1, 3))  # (h/f, w/f)
        keep = _propagate_largest(coarse)
        full = np.zeros_like(mask)
        full[:hh, :ww] = np.repeat(np.repeat(keep, f, axis=0), f, axis=1)
        return mask & full
    return _propagate_largest(mask)


def _propagate_largest(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        # Each pixel takes the largest label among itself and its 4 neighbours inside the mask.
        p = np.pad(labels, 1)
        new = np.maximum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, 0)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _classify_shape(soft: np.ndarray) -> str:
    crop = _soft_crop(soft, _TEMPLATE_RES)
    if crop is None:
        return SHAPES[0]
    errors = [(float(np.mean((crop - t) ** 2)), shape) for shape, t in _TEMPLATES]
    return min(errors)[1]


def to_array(image: Any) -> np.ndarray:
    """PIL image, uint8 HxWx3 array or float HxWx3 / 3xHxW array/tensor in [0, 1] -> float HxWx3."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    a = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {a.shape}")
    return a.astype(np.float64) / 255 if a.dtype == np.uint8 else np.clip(a.astype(np.float64), 0, 1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def analyse(image: Any) -> ShapeFacts:
    """Read an image back into its facts: each object's shape, colour, size and grid cell.

    Strongly coloured pixels are assigned to the nearest palette hue (the object "cores"); an
    object's extent is where its distance from the background colour exceeds half its own peak
    (the midpoint of a blurred edge, whatever the blur, and also where a model desaturates or
    darkens colours). Each colour's largest connected region is one object (scenes never repeat
    a colour). Its bounding box gives the cell (from the centre) and the size (from the longer
    side); the shape is the nearest template, sharp or blurred, after scaling to the same box.
    """
    rgb = to_array(image)
    h, w = rgb.shape[:2]
    side = float(max(h, w))
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    away = np.abs(rgb - background).max(-1)  # distance from the background colour, in [0, 1]
    chroma = rgb.max(-1) - rgb.min(-1)
    hue = _hue(rgb)
    dist = np.abs(hue[..., None] - _PALETTE_HUES)
    dist = np.minimum(dist, 360 - dist)
    nearest = np.argmin(dist, axis=-1)
    # Washed-out images (a model that desaturates) lower the bar for a "strong" colour, down to
    # a floor that background noise does not reach.
    strong = chroma > min(CHROMA_THRESHOLD, max(0.12, 0.5 * float(np.percentile(chroma, 99))))
    cores = [strong & (nearest == ci) for ci in range(len(COLOURS))]
    min_area = _MIN_AREA_FRACTION * h * w
    found = []
    for ci, colour in enumerate(COLOURS):
        core = cores[ci]
        if core.sum() < min_area / 2:
            continue
        peak = float(np.percentile(away[core], 90))
        # Weak edge pixels have no reliable hue: they join the colour whose core is within
        # 2 pixels, unless they are another colour's core.
        others = np.logical_or.reduce([c for k, c in enumerate(cores) if k != ci])
        region = (_dilate(core, 2) & ~others) | core
        mask = region & (away > 0.5 * peak)
        if mask.sum() < min_area:
            continue
        mask = _largest_component(mask)
        area = int(mask.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        # The soft mask of this object only, with a margin so blurred edges are kept.
        near = _dilate(mask, 2) & region
        soft = np.where(near, np.clip(away / max(peak, 1e-6), 0, 1), 0.0)
        py0, py1, px0, px1 = max(0, y0 - 3), min(h, y1 + 3), max(0, x0 - 3), min(w, x1 + 3)
        shape = _classify_shape(soft[py0:py1, px0:px1])
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        extent = max(x1 - x0, y1 - y0) / side
        size = "large" if extent > _SIZE_THRESHOLD else "small"
        row, col = min(2, int(cy * 3)), min(2, int(cx * 3))
        found.append((area, ObjectFacts(shape, colour, size, row, col, round(cx, 4), round(cy, 4))))
    # The two largest blobs, ordered left-to-right then top-to-bottom for a stable relation.
    objs = [o for _, o in sorted(found, key=lambda t: -t[0])[:2]]
    objs.sort(key=lambda o: (o.x, o.y))
    relation = relation_between(objs[0], objs[1]) if len(objs) == 2 else None
    return ShapeFacts(tuple(objs), relation)


def _pair_relation(found: ShapeFacts, order: Sequence[int]) -> str | None:
    if len(order) != 2:
        return None
    return relation_between(found.objects[order[0]], found.objects[order[1]])


def compare(expected: ShapeFacts, found: ShapeFacts) -> dict[str, bool]:
    """Score found facts against expected ones (e.g. a caption's), attribute by attribute.

    Returns booleans: `count` (same number of objects), `shape`, `colour`, `size`, `position`
    (every expected object matched in that attribute; attributes the expectation leaves None
    count as matched), `relation` (pairs), and `all` (everything above). Expected objects are
    matched to found ones by the assignment that agrees on the most attributes.
    """
    import itertools

    exp = expected.objects
    attrs = ("shape", "colour", "size", "position")

    def agree(e: ObjectFacts, f: ObjectFacts) -> dict[str, bool]:
        return {"shape": e.shape is None or e.shape == f.shape,
                "colour": e.colour is None or e.colour == f.colour,
                "size": e.size is None or e.size == f.size,
                "position": e.row is None or (e.row, e.col) == (f.row, f.col)}

    best: dict[str, bool] | None = None
    best_score = -1
    if len(found.objects) >= len(exp):
        for order in itertools.permutations(range(len(found.objects)), len(exp)):
            per = [agree(e, found.objects[i]) for e, i in zip(exp, order)]
            result = {a: all(p[a] for p in per) for a in attrs}
            if len(exp) == 2:
                result["relation"] = expected.relation is None or _pair_relation(found, order) == expected.relation
            score = sum(p[a] for p in per for a in attrs) + result.get("relation", 0)
            if score > best_score:
                best, best_score = result, score
    if best is None:  # fewer objects found than expected
        best = {a: False for a in attrs}
        if len(exp) == 2:
            best["relation"] = False
    best.setdefault("relation", True)
    best["count"] = len(found.objects) == len(exp)
    best["all"] = all(best.values())
    return best


def score_caption(image: Any, text: str) -> dict[str, bool]:
    """Analyse `image` and compare it with the facts `text` states (all False if it states none)."""
    expected = parse_caption(text)
    if expected is None:
        return {k: False for k in ("shape", "colour", "size", "position", "relation", "count", "all")}
    return compare(expected, analyse(image))


def summarise_scores(scores: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Fraction of images matching each attribute, over a list of `compare` results."""
    scores = list(scores)
    if not scores:
        return {}
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapesSample:
    key: str
    facts: ShapeFacts
    caption: str


class ShapesDataset:
    """Scenes of one split, addressable by index: `facts_and_caption(i)` is cheap (no pixels)."""

    def __init__(self, split: str, seed: int = 0, heldout_fraction: float = 0.15, image_size: int = 64,
                 max_objects: int = 2, two_object_fraction: float = 0.3):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.split, self.seed, self.image_size = split, seed, image_size
        self.max_objects, self.two_object_fraction = max_objects, two_object_fraction
        self.heldout = heldout_combos(seed, heldout_fraction)

    @classmethod
    def from_config(cls, shapes_cfg: Any, split: str, image_size: int) -> "ShapesDataset":
        return cls(split, shapes_cfg.seed, shapes_cfg.heldout_fraction, image_size,
                   shapes_cfg.max_objects, shapes_cfg.two_object_fraction)

    def key(self, i: int) -> str:
        return f"{self.split}-{i:08d}"

    def sample(self, i: int) -> ShapesSample:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        facts = sample_scene(rng, self.split, self.heldout, self.max_objects, self.two_object_fraction)
        return ShapesSample(self.key(i), facts, caption(facts, rng))

    def image(self, sample: ShapesSample) -> Image.Image:
        return render(sample.facts, self.image_size)


def combo_of(o: ObjectFacts) -> tuple[str, str]:
    return (o.shape, o.colour)


def describe_split(heldout: frozenset[tuple[str, str]]) -> str:
    return ", ".join(f"{c} {s}" for s, c in sorted(heldout)) or "(none)"


__all__ = [
    "SHAPES", "COLOURS", "SIZES", "RELATIONS", "POSITIONS", "SPLITS", "ObjectFacts", "ShapeFacts",
    "ShapesDataset", "ShapesSample", "analyse", "caption", "compare", "heldout_combos", "parse_caption",
    "position_name", "render", "sample_scene", "score_caption", "summarise_scores", "relation_between",
    "describe_split", "combo_of",
]
