"""Aggregate per-image attribute judgements into accuracies per attribute, per split, overall."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("seen", "heldout")
# What "matches its caption" means in the headline figure: the object's shape, colour and grid
# cell (and, for pairs, their relation). Size and the exact object count are reported per
# attribute but do not fail a sample on their own.
HEADLINE = ("shape", "colour", "position", "relation")


@dataclass
class Judgement:
    """Whether one generated image shows what its caption says, attribute by attribute."""

    caption: str
    split: str  # "seen" or "heldout" (a (shape, colour) combination never shown in training)
    n_objects: int
    matches: dict[str, bool] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        judged = [self.matches[a] for a in HEADLINE if a in self.matches]
        return bool(judged) and all(judged)


def _group(judgements: list[Judgement]) -> dict:
    n = len(judgements)
    # "all" (from data.shapes.compare) is every attribute at once, reported as its own figure.
    attrs = sorted({a for j in judgements for a in j.matches if a != "all"})
    per_attr = {}
    for a in attrs:
        judged = [j.matches[a] for j in judgements if a in j.matches]
        per_attr[a] = sum(judged) / len(judged)
    return {"n": n, "accuracy": (sum(j.correct for j in judgements) / n) if n else None,
            "per_attribute": per_attr}


def summarise(judgements: list[Judgement]) -> dict:
    """{"all": group, "seen": group, "heldout": group, "single_object": {...same...}}, where
    a group is {"n", "accuracy" (every attribute right), "per_attribute"}; empty groups have
    accuracy None."""
    for j in judgements:
        if j.split not in SPLITS:
            raise ValueError(f"judgement split {j.split!r} must be one of {SPLITS}")

    def by_split(js: list[Judgement]) -> dict:
        out = {"all": _group(js)}
        for s in SPLITS:
            out[s] = _group([j for j in js if j.split == s])
        return out

    result = by_split(judgements)
    result["single_object"] = by_split([j for j in judgements if j.n_objects == 1])
    return result


def format_summary(summary: dict) -> str:
    """A few aligned text lines for the console and the .txt report."""
    lines = []
    for scope, title in (("single_object", "single-object captions"), (None, "all captions")):
        block = summary[scope] if scope else summary
        for split in ("all",) + SPLITS:
            g = block[split]
            if not g["n"]:
                continue
            attrs = "  ".join(f"{a} {v:.0%}" for a, v in g["per_attribute"].items())
            lines.append(f"{title:24s} {split:8s} n={g['n']:<4d} match {g['accuracy']:.0%}   ({attrs})")
    return "\n".join(lines)
