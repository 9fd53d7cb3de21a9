"""Streaming loaders over shards: rank/worker sharding, a shuffle buffer, exact resume.

Two orders. The global order (data/global_order.py, `order="global"`, the default of training
streams built from a config) makes one sequence of samples per epoch from (seed, epoch, shards)
alone; rank r takes global samples i with i mod w = r, and the position is global: it resumes at
any number of ranks, workers and micro-batch split with the same global batch. Every rank walks
every shard's headers for that. The per-slot order below (`order="slots"`, evaluation streams, the
low-level builders' default) reads less, but its position belongs to one layout.

Pipeline, per (rank, DataLoader worker) "slot" (slot = rank * workers + worker):

    units of the epoch     every rank permutes the shard list with (seed, epoch); slot s takes
                           permuted[s::slots]. With fewer shards than slots every slot reads all
                           shards and keeps every slots-th record instead (balanced, more I/O).
    shuffle buffer         raw records; rng seeded by (seed, epoch, rank, worker)
    decode + check         bad samples skipped or converted and counted per shard (decode.py)
    augment                per-sample rng from (seed, epoch, shard, offset): no hidden state
    batch                  assembled in the worker; the DataLoader runs with batch_size=None

Resumable position: each batch carries its worker's state after producing it: (epoch, index of
the shard being read, byte offset of the next record, the shuffle buffer as (shard, offset)
pointers, rng state, counters). The loader keeps the last state per worker and which worker
delivers next. Because the DataLoader hands out worker batches strictly round-robin, a fresh
loader that gives worker w the saved state of "logical worker" (w + next) mod W replays exactly
the remaining batches in the same order. Resuming needs the same world size, number of
workers, batch size and shard list; a mismatch is an error that says which.

`endless=True` (training) runs epochs back to back per worker, with a new shard order and
shuffle per epoch. `endless=False` (evaluation) makes one pass, then the next `iter()` starts the
next epoch; ranks may then get different numbers of batches, so distributed evaluation should
take a fixed number of batches from an endless loader.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megadalle.config import ConfigError
from megadalle.data.augment import RECIPES, augment, to_array
from megadalle.data.decode import BadSample, decode_caption, decode_codes, decode_image
from megadalle.data.shards import ReadProblem, Record, ShardError, iter_unit_records, source_units

if TYPE_CHECKING:
    from megadalle.data.global_order import GlobalOrderLoader

log = logging.getLogger("megadalle.data")

STATE_VERSION = 1
_LOG_FIRST = 3  # per shard and reason, the first few bad samples are logged one by one


# --------------------------------------------------------------------------------------------
# Per-shard accounting
# --------------------------------------------------------------------------------------------


def _empty_unit_stats() -> dict[str, Any]:
    return {"samples": 0, "skipped": {}, "converted": {}, "problems": {}}


class ShardStats:
    """Counts per shard: good samples, skipped and converted ones by reason, shard problems."""

    def __init__(self, d: dict[str, dict] | None = None, log_problems: bool = True):
        self.d: dict[str, dict[str, Any]] = {k: {kk: (dict(vv) if isinstance(vv, dict) else vv)
                                                 for kk, vv in v.items()} for k, v in (d or {}).items()}
        self._logged: dict[tuple[str, str], int] = {}
        # In the global order every rank and worker walks every shard: one of them says so.
        self.log_problems = log_problems

    def _unit(self, unit: str) -> dict[str, Any]:
        return self.d.setdefault(unit, _empty_unit_stats())

    def _log(self, unit: str, reason: str, msg: str) -> None:
        n = self._logged.get((unit, reason), 0)
        self._logged[(unit, reason)] = n + 1
        if n < _LOG_FIRST:
            more = " (further ones counted, not logged)" if n == _LOG_FIRST - 1 else ""
            log.warning("%s: %s%s", unit, msg, more)

    def ok(self, unit: str, conversions: list[str], key: str) -> None:
        u = self._unit(unit)
        u["samples"] += 1
        for c in conversions:
            u["converted"][c] = u["converted"].get(c, 0) + 1
            self._log(unit, c, f"converted sample {key!r} ({c})")

    def skip(self, unit: str, reason: str, key: str, detail: str) -> None:
        u = self._unit(unit)
        u["skipped"][reason] = u["skipped"].get(reason, 0) + 1
        self._log(unit, reason, f"skipped sample {key!r}: {reason} ({detail})")

    def problem(self, unit: str, reason: str, detail: str) -> None:
        u = self._unit(unit)
        u["problems"][reason] = u["problems"].get(reason, 0) + 1
        if self.log_problems:
            log.warning("%s: %s, rest of the shard unreadable (%s)", unit, reason, detail)

    def to_dict(self) -> dict[str, dict]:
        return {k: {"samples": v["samples"], "skipped": dict(v["skipped"]), "converted": dict(v["converted"]),
                    "problems": dict(v["problems"])} for k, v in self.d.items()}

    @staticmethod
    def merge(parts: list[dict[str, dict]]) -> dict[str, dict]:
        """Sum the per-worker counts; shard problems seen by several workers count once."""
        out: dict[str, dict] = {}
        for part in parts:
            for unit, s in part.items():
                u = out.setdefault(unit, _empty_unit_stats())
                u["samples"] += s["samples"]
                for kind in ("skipped", "converted"):
                    for r, n in s[kind].items():
                        u[kind][r] = u[kind].get(r, 0) + n
                for r, n in s["problems"].items():
                    u["problems"][r] = max(u["problems"].get(r, 0), n)
        return out


def format_stats(stats: dict[str, dict], only_bad: bool = False) -> str:
    """A per-shard report: `shard: N samples, skipped K (reason n, ...), converted ...`."""
    lines = []
    total = {"samples": 0, "skipped": 0, "converted": 0, "problems": 0}
    for unit in sorted(stats):
        s = stats[unit]
        sk, cv, pr = (sum(s[k].values()) for k in ("skipped", "converted", "problems"))
        total["samples"] += s["samples"]
        total["skipped"] += sk
        total["converted"] += cv
        total["problems"] += pr
        if only_bad and not (sk or cv or pr):
            continue
        parts = [f"{s['samples']} samples"]
        for kind, n in (("skipped", sk), ("converted", cv), ("problems", pr)):
            if n:
                detail = ", ".join(f"{r} {c}" for r, c in sorted(s[kind].items()))
                parts.append(f"{kind} {n} ({detail})")
        lines.append(f"{unit}: " + "; ".join(parts))
    lines.append(f"total: {total['samples']} samples from {len(stats)} shard(s); skipped {total['skipped']}, "
                 f"converted {total['converted']}, shard problems {total['problems']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What to read (picklable: it travels to DataLoader workers)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    units: tuple[str, ...]
    kind: str  # "image" or "tokens"
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1000
    endless: bool = True
    drop_last: bool = False
    # images
    image_size: int = 64
    augment: str = "none"
    min_image_side: int = 16
    max_aspect_ratio: float = 4.0
    max_image_pixels: int = 64_000_000
    # tokens
    codes_len: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "tokens"):
            raise ValueError(f"kind must be 'image' or 'tokens', got {self.kind!r}")
        if self.augment not in RECIPES:
            raise ValueError(f"augment={self.augment!r}: choose one of {', '.join(RECIPES)}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if not self.units:
            raise ShardError("no shards to read")

    def fingerprint(self) -> str:
        """What a saved position depends on: the shard list and the batch layout.

        Shard names without their directory, so that a run resumes after its data moved.
        """
        names = [u.rpartition("::")[2] if "::" in u else Path(u).name for u in self.units]
        h = hashlib.sha256("\n".join(names).encode())
        h.update(f"{self.kind}|{self.batch_size}|{self.seed}|{self.world_size}|{self.shuffle_buffer}".encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Samples and batches (both orders)
# --------------------------------------------------------------------------------------------


def decode_sample(spec: StreamSpec, rec: Record, epoch: int, unit_index: int,
                  stats: ShardStats) -> dict[str, Any] | None:
    """Decode, check and augment one record; None (and counted) when it is a bad sample.

    The augmentation rng comes from (seed, epoch, shard, offset) alone, so a sample looks the same
    whichever rank or worker decodes it and whenever the run was resumed.
    """
    s = spec
    conversions: list[str] = list(rec.notes)
    try:
        if s.kind == "image":
            img = decode_image(rec, s.min_image_side, s.max_aspect_ratio, conversions, s.max_image_pixels)
            text = decode_caption(rec, conversions)
            rng = np.random.default_rng([s.seed, epoch, unit_index, rec.offset, 3])
            value = to_array(augment(img, s.image_size, s.augment, rng))
        else:
            value = decode_codes(rec, s.codes_len).astype(np.int64)
            text = decode_caption(rec, conversions)
    except BadSample as e:
        stats.skip(rec.unit, e.reason, rec.key, e.detail)
        return None
    stats.ok(rec.unit, conversions, rec.key)
    return {"value": value, "caption": text, "key": rec.key}


def collate(spec: StreamSpec, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch. It may have no row at all in the global order (every sample of a rank's
    micro-batch bad), so the empty shape is spelled out rather than left to np.stack."""
    name = "image" if spec.kind == "image" else "codes"
    if samples:
        # image: (batch, 3, H, W) float in [0, 1]; codes: (batch, grid*grid) long
        value = torch.from_numpy(np.stack([x["value"] for x in samples]))
    elif spec.kind == "image":
        value = torch.zeros((0, 3, spec.image_size, spec.image_size), dtype=torch.float32)
    else:
        value = torch.zeros((0, spec.codes_len or 0), dtype=torch.int64)
    return {name: value, "caption": [x["caption"] for x in samples], "key": [x["key"] for x in samples]}


# --------------------------------------------------------------------------------------------
# One slot's stream
# --------------------------------------------------------------------------------------------


class _SlotStream:
    """The records, samples and batches of one (rank, worker) slot, with a snapshot-able state."""

    def __init__(self, spec: StreamSpec, worker: int, workers: int, state: dict | None):
        self.spec = spec
        self.worker, self.workers = worker, workers
        self.slot = spec.rank * workers + worker
        self.unit_index = {u: i for i, u in enumerate(spec.units)}
        self.n_slots = spec.world_size * workers
        state = state or {}
        self.stats = ShardStats(state.get("stats"))
        self.done = bool(state.get("done", False))
        self._start_epoch(int(state.get("epoch", 0)))
        if "unit_pos" in state:
            self.unit_pos = state["unit_pos"]
            self.offset = state["offset"]
            self.seen = state["seen"]
            self.source_done = state["source_done"]
            self._good_in_epoch = state.get("good", 0)
            self.rng.bit_generator.state = state["rng"]
            self.buffer = [self._reread(ui, off) for ui, off in state["buffer"]]
            self.buffer = [r for r in self.buffer if r is not None]

    def _start_epoch(self, epoch: int) -> None:
        s = self.spec
        self.epoch = epoch
        perm = np.random.default_rng([s.seed, epoch, 1]).permutation(len(s.units))
        self.interleave = len(s.units) < self.n_slots
        # Indices into spec.units, in this slot's reading order for the epoch.
        self.my_units = [int(u) for u in (perm if self.interleave else perm[self.slot::self.n_slots])]
        self.unit_pos, self.offset, self.seen, self.source_done = 0, None, 0, False
        self.buffer: list[Record] = []
        self.rng = np.random.default_rng([s.seed, epoch, s.rank, self.worker, 2])
        self._iter: Iterator | None = None
        self._good_in_epoch = 0

    def _reread(self, ui: int, offset: int) -> Record | None:
        for item in iter_unit_records(self.spec.units[ui], offset):
            return item if isinstance(item, Record) else None
        return None

    def state(self) -> dict[str, Any]:
        index = self.unit_index
        return {"epoch": self.epoch, "unit_pos": self.unit_pos, "offset": self.offset, "seen": self.seen,
                "source_done": self.source_done, "good": self._good_in_epoch,
                "rng": self.rng.bit_generator.state,
                "buffer": [[index[r.unit], r.offset] for r in self.buffer],
                "stats": self.stats.to_dict(), "done": self.done}

    # ---- records ----
    def _pull(self) -> Record | None:
        """Next record of this slot from the epoch's shards, None when they are exhausted."""
        while self.unit_pos < len(self.my_units):
            if self._iter is None:
                self._iter = iter_unit_records(self.spec.units[self.my_units[self.unit_pos]], self.offset)
            for item in self._iter:
                if isinstance(item, ReadProblem):
                    self.stats.problem(item.unit, item.reason, item.detail)
                    break
                self.offset = item.end
                self.seen += 1
                if self.interleave and (self.seen - 1) % self.n_slots != self.slot:
                    continue
                return item
            self.unit_pos, self.offset, self._iter = self.unit_pos + 1, None, None
        return None

    def _next_record(self) -> Record | None:
        size = self.spec.shuffle_buffer
        while not self.source_done:
            rec = self._pull()
            if rec is None:
                self.source_done = True
                break
            if size <= 1:
                return rec
            self.buffer.append(rec)
            if len(self.buffer) >= size:
                return self._take()
        return self._take() if self.buffer else None

    def _take(self) -> Record:
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    # ---- samples ----
    def _sample(self, rec: Record) -> dict[str, Any] | None:
        return decode_sample(self.spec, rec, self.epoch, self.unit_index[rec.unit], self.stats)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(self.spec, samples)

    def batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(batch, state after it); the state resumes right after that batch."""
        if self.done:
            return
        pending: list[dict[str, Any]] = []
        while True:
            rec = self._next_record()
            if rec is None:
                if not self.spec.endless:
                    break
                if self._good_in_epoch == 0 and self.my_units:
                    raise ShardError(f"rank {self.spec.rank} worker {self.worker}: a whole epoch over "
                                     f"{len(self.my_units)} shard(s) gave no usable sample:\n"
                                     + format_stats(self.stats.to_dict(), only_bad=True))
                if not self.my_units:
                    return  # more slots than shards can only happen in interleave mode; nothing to do
                self._start_epoch(self.epoch + 1)
                continue
            sample = self._sample(rec)
            if sample is None:
                continue
            self._good_in_epoch += 1
            pending.append(sample)
            if len(pending) == self.spec.batch_size:
                yield self._collate(pending), self.state()
                pending = []
        self.done = True
        # One last item always: the state holds the counts of whatever came after the last
        # full batch (bad samples, a truncated shard), which would otherwise never be reported.
        yield (self._collate(pending) if pending and not self.spec.drop_last else None), self.state()


class _StreamDataset(IterableDataset):
    def __init__(self, spec: StreamSpec, states: list[dict | None], rotation: int, workers: int):
        super().__init__()
        self.spec, self.states, self.rotation, self.workers = spec, states, rotation, workers

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        logical = (wid + self.rotation) % self.workers
        stream = _SlotStream(self.spec, logical, self.workers, self.states[logical])
        for batch, state in stream.batches():
            yield batch, logical, state


def _identity(x):
    return x


class ResumableLoader:
    """Iterate batches; `state_dict()` / `load_state_dict()` save and restore the exact position.

    Image batches: {"image": float [B, 3, H, W] in [0, 1], "caption": [str], "key": [str]};
    token batches: {"codes": long [B, grid*grid], "caption": [str], "key": [str]}.
    `stats()` returns the per-shard counts of good, skipped and converted samples so far.
    """

    def __init__(self, spec: StreamSpec, num_workers: int = 0, pin_memory: bool = False,
                 restart_every_iter: bool = False):
        self.spec = spec
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Validation: every iter() replays the same samples from the start (epoch 0), so that
        # successive evaluations see the same batches.
        self.restart_every_iter = restart_every_iter
        self._slots = max(1, num_workers)
        self._states: list[dict | None] = [None] * self._slots
        self._next = 0
        self._epoch = 0  # finite mode: the pass the next iter() makes

    # ---- iteration ----
    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.restart_every_iter:
            self.reset()
        dataset = _StreamDataset(self.spec, list(self._states), self._next, self._slots)
        if self.num_workers == 0:
            items: Any = iter(dataset)
        else:
            items = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                               pin_memory=self.pin_memory, persistent_workers=False)
        for batch, logical, state in items:
            self._states[logical] = state
            self._next = (logical + 1) % self._slots
            if batch is not None:
                yield batch
        if not self.spec.endless:
            self._finish_pass()

    def _finish_pass(self) -> None:
        # The next iter() is the next epoch; the counts carry over.
        stats = self.stats_parts()
        self._epoch += 1
        self._states = [{"epoch": self._epoch, "stats": stats[i] if i < len(stats) else {}}
                        for i in range(self._slots)]
        self._next = 0

    def reset(self) -> None:
        """Back to the very start (epoch 0, no samples consumed, counts cleared)."""
        self._states = [None] * self._slots
        self._next = 0
        self._epoch = 0

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.spec.fingerprint(), "workers": self._slots,
                "rank": self.spec.rank, "world_size": self.spec.world_size, "next_worker": self._next,
                "pass": self._epoch, "slots": [None if s is None else dict(s) for s in self._states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict) and state.get("order") == "global":
            raise ConfigError("cannot resume the data position: it was saved in the global order and this loader "
                              "reads per-slot streams; resume with data.order=global")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ConfigError(f"data loader state version {version!r}; this megadalle reads version {STATE_VERSION}")
        problems = []
        if state["world_size"] != self.spec.world_size or state["rank"] != self.spec.rank:
            problems.append(f"rank/world size {state['rank']}/{state['world_size']} saved, "
                            f"{self.spec.rank}/{self.spec.world_size} now")
        if state["workers"] != self._slots:
            problems.append(f"data.num_workers {state['workers']} saved (0 counts as 1), {self._slots} now")
        if state["fingerprint"] != self.spec.fingerprint():
            problems.append("the shard list, batch size, seed or shuffle buffer differ")
        if problems:
            raise ConfigError("cannot resume the data position: " + "; ".join(problems)
                             + ". Resume with the settings of the saved run, or start the data stream afresh.")
        self._states = [None if s is None else dict(s) for s in state["slots"]]
        self._next = int(state["next_worker"])
        self._epoch = int(state["pass"])

    # ---- reporting ----
    def stats_parts(self) -> list[dict[str, dict]]:
        return [(s or {}).get("stats", {}) for s in self._states]

    def stats(self) -> dict[str, dict]:
        return ShardStats.merge(self.stats_parts())

    def report(self, only_bad: bool = True) -> str:
        return format_stats(self.stats(), only_bad=only_bad)

    @property
    def epoch(self) -> int:
        """The lowest epoch any worker is in (endless mode), or the pass (finite mode)."""
        epochs = [s.get("epoch", 0) for s in self._states if s]
        return min(epochs) if epochs else self._epoch


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        from megadalle.distributed.launch import discover

        env = discover()
        rank = env.rank if rank is None else rank
        world_size = env.world_size if world_size is None else world_size
    return rank, world_size


def _make_loader(spec: StreamSpec, order: str, global_batch: int | None, num_workers: int, pin_memory: bool,
                 restart_every_iter: bool) -> ResumableLoader | GlobalOrderLoader:
    if order == "slots":
        return ResumableLoader(spec, num_workers, pin_memory, restart_every_iter)
    if order != "global":
        raise ConfigError(f"data.order={order!r}: choose 'global' or 'slots'")
    if restart_every_iter or not spec.endless:
        raise ValueError("the global order is for endless training streams; evaluation reads order='slots'")
    # Imported here: global_order.py builds on this module's StreamSpec and decoding.
    from megadalle.data.global_order import GlobalOrderLoader

    # Without it the global batch is one micro-step of every rank (no accumulation).
    g = global_batch or spec.batch_size * spec.world_size
    return GlobalOrderLoader(spec, g, num_workers, pin_memory)


def image_loader(source: str | Path, batch_size: int, *, image_size: int = 64, augment: str = "none",
                 seed: int = 0, shuffle_buffer: int = 1000, endless: bool = True, drop_last: bool = False,
                 num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                 min_image_side: int = 16, max_aspect_ratio: float = 4.0, max_image_pixels: int = 64_000_000,
                 pin_memory: bool = False, restart_every_iter: bool = False, order: str = "slots",
                 global_batch: int | None = None) -> ResumableLoader | GlobalOrderLoader:
    """Image batches from a directory / glob of tar shards or an image folder.

    `batch_size` is the micro-batch. `order="global"` (endless only) returns a GlobalOrderLoader
    for `global_batch` = micro-batch x accumulation x ranks (default: no accumulation)."""
    rank, world_size = _rank_world(rank, world_size)
    spec = StreamSpec(tuple(source_units(source)), "image", batch_size, seed, rank, world_size, shuffle_buffer,
                      endless, drop_last, image_size, augment, min_image_side, max_aspect_ratio, max_image_pixels)
    return _make_loader(spec, order, global_batch, num_workers, pin_memory, restart_every_iter)


def token_loader(source: str | Path, batch_size: int, *, codes_len: int | None = None, seed: int = 0,
                 shuffle_buffer: int = 1000, endless: bool = True, drop_last: bool = False,
                 num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                 pin_memory: bool = False, restart_every_iter: bool = False, order: str = "slots",
                 global_batch: int | None = None) -> ResumableLoader | GlobalOrderLoader:
    """Token batches ({"codes", "caption", "key"}) from token shards written by `megadalle encode`;
    `order` and `global_batch` as for image_loader."""
    rank, world_size = _rank_world(rank, world_size)
    spec = StreamSpec(tuple(source_units(source)), "tokens", batch_size, seed, rank, world_size, shuffle_buffer,
                      endless, drop_last, codes_len=codes_len)
    return _make_loader(spec, order, global_batch, num_workers, pin_memory, restart_every_iter)


def _order_for(cfg: Any, split: str, endless: bool, order: str | None) -> str:
    """The order a config's stream reads: as asked, else data.order for endless training streams
    (the global order unless set), else the per-slot order (evaluation replays its own samples)."""
    if order:
        return order
    return cfg.data.order if split == "train" and endless else "slots"


def image_loader_from_config(cfg: Any, batch_size: int, split: str = "train", *, endless: bool = True,
                             rank: int | None = None, world_size: int | None = None,
                             augment: str | None = None, run_dir: str | Path | None = None,
                             global_batch: int | None = None,
                             order: str | None = None) -> ResumableLoader | GlobalOrderLoader:
    """Image batches for a run: `data.source` ("shapes": built in the run folder if missing).

    `batch_size` is the micro-batch; a training stream in the global order needs `global_batch`
    (micro-batch x accumulation x ranks) to resume at another layout of the same global batch."""
    d = cfg.data
    source = resolve_image_source(cfg, split, run_dir)
    return image_loader(source, batch_size, image_size=d.image_size, augment=augment or d.augment, seed=d.seed,
                        shuffle_buffer=d.shuffle_buffer if split == "train" else 0, endless=endless,
                        num_workers=d.num_workers, rank=rank, world_size=world_size,
                        min_image_side=d.min_image_side, max_aspect_ratio=d.max_aspect_ratio,
                        max_image_pixels=d.max_image_pixels, restart_every_iter=split != "train",
                        order=_order_for(cfg, split, endless, order), global_batch=global_batch)


def token_loader_from_config(cfg: Any, batch_size: int, split: str = "train", *, endless: bool = True,
                             rank: int | None = None, world_size: int | None = None,
                             run_dir: str | Path | None = None, global_batch: int | None = None,
                             order: str | None = None) -> ResumableLoader | GlobalOrderLoader:
    """Token batches for a run: `data.token_source`, or <run_dir>/tokens/<split>; `global_batch`
    and `order` as for image_loader_from_config."""
    from megadalle.run_layout import RunLayout

    d = cfg.data
    source = str(RunLayout.from_config(cfg, run_dir).tokens(split))
    return token_loader(source, batch_size, codes_len=cfg.transformer.image_len, seed=d.seed,
                        shuffle_buffer=d.shuffle_buffer if split == "train" else 0, endless=endless,
                        num_workers=d.num_workers, rank=rank, world_size=world_size,
                        restart_every_iter=split != "train", order=_order_for(cfg, split, endless, order),
                        global_batch=global_batch)


def resolve_image_source(cfg: Any, split: str = "train", run_dir: str | Path | None = None) -> str:
    """The shard directory (or image folder) a split reads, building the shapes data if needed."""
    d = cfg.data
    source = d.val_source if split != "train" and d.val_source else d.source
    if source == "shapes":
        from megadalle.data.shapes_shards import ensure_shapes_shards

        dirs = ensure_shapes_shards(cfg, run_dir or cfg.logging.run_dir,
                                    splits=("train",) if split == "train" else (split,))
        return str(dirs[split])
    if split != "train" and not d.val_source:
        raise ShardError(f"no validation data: data.source={d.source!r} is not 'shapes'; set data.val_source")
    return source


__all__ = ["ResumableLoader", "StreamSpec", "ShardStats", "format_stats", "decode_sample", "collate",
           "image_loader", "token_loader",
           "image_loader_from_config", "token_loader_from_config", "resolve_image_source"]
