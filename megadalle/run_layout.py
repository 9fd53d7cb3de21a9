"""Every path inside a run folder (`logging.run_dir`), in one place.

    <run>/config.yaml                 the resolved config of the last command
    <run>/tokenizer.json              the caption BPE (or tokenizer.path)
    <run>/data/shapes/<split>/        the built-in shapes shards, when data.source=shapes
    <run>/dvae/                       stage 1: checkpoints/, samples/, dvae.safetensors + dvae.yaml
    <run>/tokens/<split>/             token shards from `megadalle encode` (or data.token_source)
    <run>/transformer/                stage 2: checkpoints/, samples/, transformer.safetensors + .yaml
    <run>/clip/                       the reranker: checkpoints/, clip.safetensors + clip.yaml
    <run>/samples/, <run>/eval/       outputs of `sample` and `eval`

Every stage folder also holds `.lock` (training/run_lock.py), `metrics.jsonl`, `tb/` and, after a
rewind, `abandoned-<time>/` (training/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megadalle.config import Config

STAGES = ("dvae", "transformer", "clip")


@dataclass(frozen=True)
class RunLayout:
    root: Path
    tokenizer_path: str = ""  # tokenizer.path: a tokenizer outside the run folder
    token_source: str = ""  # data.token_source: token shards outside the run folder

    @classmethod
    def from_config(cls, cfg: Config, root: str | Path | None = None) -> "RunLayout":
        return cls(Path(root if root is not None else cfg.logging.run_dir), cfg.tokenizer.path, cfg.data.token_source)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return Path(self.tokenizer_path) if self.tokenizer_path else self.root / "tokenizer.json"

    def shapes(self, split: str | None = None) -> Path:
        base = self.root / "data" / "shapes"
        return base / split if split else base

    def stage(self, name: str) -> Path:
        """The folder a trainer owns: checkpoints, samples, metrics and its export."""
        return self.root / name

    @property
    def dvae(self) -> Path:
        return self.stage("dvae")

    @property
    def transformer(self) -> Path:
        return self.stage("transformer")

    @property
    def clip(self) -> Path:
        return self.stage("clip")

    def export(self, stage: str) -> tuple[Path, Path]:
        """A stage's exported weights and their config: <stage>/<stage>.safetensors + .yaml."""
        return self.stage(stage) / f"{stage}.safetensors", self.stage(stage) / f"{stage}.yaml"

    def tokens(self, split: str) -> Path:
        """Token shards of a split: data.token_source (a folder with <split>/ inside, or the shards
        themselves, then used for every split), else <run>/tokens/<split>."""
        if self.token_source:
            split_dir = Path(self.token_source) / split
            return split_dir if split_dir.is_dir() else Path(self.token_source)
        return self.root / "tokens" / split

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def eval(self) -> Path:
        return self.root / "eval"
