"""The global sample order: one sequence of samples per epoch, whatever the number of ranks.

The sequence depends on (seed, epoch, shard list, shuffle buffer) and nothing else:

    shards of the epoch    the shard list permuted with (seed, epoch), read one after the other
                           as ONE stream of records
    shuffle buffer         ONE buffer of record pointers (shard, offset); rng seeded by
                           (seed, epoch) only. Seeded as the per-slot order seeds rank 0's only
                           worker, so that a one-rank run with 0 or 1 workers sees the very samples
                           it saw in the per-slot order
    epochs                 run back to back: global sample i is the i-th record out of the buffer,
                           counting from the start of epoch 0

Global batch k is samples [k G, (k+1) G), G = micro-batch x accumulation x ranks. Global sample i
belongs to rank i mod w (the convention of training/striped_stream.py), and a rank's micro-batch c
holds its samples among [c S, (c+1) S), S = micro-batch x w: one micro-step of every rank
together. The accumulation steps of one optimizer step are consecutive micro-steps, so global batch
k is the same set of samples for every split of G into micro-batch x accumulation x ranks.
DataLoader workers of a rank split the rank's micro-batches: worker j makes micro-batches
c0 + j, c0 + j + W, ... (c0: where the iteration starts), which the DataLoader's round robin
hands out in order.

Cost against the per-slot order. Every worker of every rank walks the whole stream, as pointers:
tar headers are read and member bytes stepped over (shards.py, `read_data=False`), and only the
rank's own records are read again in full (from a kept-open file) and decoded. Decoding stays
once per sample in the whole job; what the global order adds is the walk of every record on
every worker (world x workers walks in all; what the walk reads is the headers plus whatever the
8 KiB read buffer and the file system's readahead take with them, i.e. everything for small
members such as token shards: I/O x world x workers there) and a second read of the own records.
A worker walks G records per optimizer step whatever the number of ranks, and decodes
G / (w W) of them. Measured (benchmarks/results/data_pipeline_orders.json; CPU time per rank,
shards in the page cache, micro-batch 16): a record's walk costs 15-20 us, about what reading it
whole costs (Python's header parsing, not the bytes, dominates); global / per-slot samples per
rank at 1 and 4 ranks: 256 px stage-1 images x0.95 / x1.00, 64 px images without augmentation
x0.82 / x0.65, token shards x0.70 / x0.42. The walk costs as much as the decoding at about 116
ranks (256 px), 10 (64 px) and 4 (tokens); in absolute terms it is G x ~20 us per step and worker
(20 ms at G = 1024), which only a model faster than its data notices. A per-shard index of
offsets would make the walk nearly free; not done. In exchange the shuffle is a true global one
over one buffer (the per-slot order shuffles each slot's shards in its own buffer), and the
buffer holds pointers, not bytes, so it can be made much larger.

Bad samples. A rank decodes only its own samples, so it cannot replace a bad one with the next
sample: that one belongs to another rank, which decodes it itself. The rule: a bad sample is
dropped and its micro-batch is one row shorter on that rank. The good samples of global batch k
are then the same set for every split of G. A micro-batch whose samples are all bad is still
delivered, with no row (keys []), because every rank must make the same number of micro-steps; the
trainer runs `stand_in()` (one row of zeros) in its place and weighs its loss by 0.

Position. The state is global: the number of samples consumed and the walk's state at that point
(epoch, shard being read and offset, the buffer as (shard, offset) pointers, rng state); no I/O
rebuilds it. It is the same on every rank and loads at any number of ranks, workers and micro-batch
split with the same G, seed, shards and shuffle buffer. Counts of good and bad samples are per
rank (each decodes its own) and are not part of it: they start afresh on resume.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megadalle.config import ConfigError
from megadalle.data.loader import ShardStats, StreamSpec, collate, decode_sample, format_stats
from megadalle.data.shards import (ReadProblem, Record, ShardError, is_folder_unit, iter_unit_records,
                                   read_unit_record, tar_records_of)

GLOBAL_STATE_VERSION = 1

# (unit index, byte offset or folder index, notes such as "duplicate_key"): what the buffer holds
Pointer = tuple[int, int, tuple[str, ...]]


def shard_names_digest(units: tuple[str, ...]) -> str:
    """The shard list without directories, so that a run resumes after its data moved."""
    names = [u.rpartition("::")[2] if "::" in u else Path(u).name for u in units]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The walk: records of every epoch in the global order, as pointers
# --------------------------------------------------------------------------------------------


class GlobalWalk:
    """Pointers in the global order of one epoch, with a state every rank shares."""

    def __init__(self, units: tuple[str, ...], seed: int, shuffle_buffer: int, stats: ShardStats):
        self.units, self.seed, self.size, self.stats = units, seed, shuffle_buffer, stats
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.units))
        self.order = [int(u) for u in perm]
        self.unit_pos, self.offset, self.source_done, self.emitted = 0, None, False, 0
        self.buffer: list[Pointer] = []
        # (rank 0, worker 0) in the seed: the per-slot order's seed for a one-rank, one-worker run.
        self.rng = np.random.default_rng([self.seed, epoch, 0, 0, 2])
        self._iter: Iterator | None = None

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "unit_pos": self.unit_pos, "offset": self.offset,
                "source_done": self.source_done, "emitted": self.emitted, "rng": self.rng.bit_generator.state,
                "buffer": [[ui, off, *([list(notes)] if notes else [])] for ui, off, notes in self.buffer]}

    def restore(self, state: dict[str, Any]) -> None:
        self.start_epoch(int(state["epoch"]))
        self.unit_pos, self.emitted = int(state["unit_pos"]), int(state["emitted"])
        self.offset = None if state["offset"] is None else int(state["offset"])
        self.source_done = bool(state["source_done"])
        self.rng.bit_generator.state = state["rng"]
        self.buffer = [(int(p[0]), int(p[1]), tuple(p[2]) if len(p) > 2 else ()) for p in state["buffer"]]
        if not 0 <= self.unit_pos <= len(self.units) or any(not 0 <= p[0] < len(self.units) for p in self.buffer):
            raise ValueError("a shard index lies outside the shard list")

    def _pull(self) -> Pointer | None:
        """Next record of the epoch's shards in reading order, None when they are exhausted."""
        while self.unit_pos < len(self.order):
            ui = self.order[self.unit_pos]
            if self._iter is None:
                self._iter = iter_unit_records(self.units[ui], self.offset, read_data=False)
            for item in self._iter:
                if isinstance(item, ReadProblem):
                    self.stats.problem(item.unit, item.reason, item.detail)
                    break
                self.offset = item.end
                return ui, item.offset, tuple(item.notes)
            self.unit_pos, self.offset, self._iter = self.unit_pos + 1, None, None
        return None

    def next(self) -> Pointer | None:
        """The epoch's next pointer out of the shuffle buffer; None at the end of the epoch.

        The same buffer discipline as the per-slot order (fill to `size`, then take a random one),
        which is what makes a one-rank run's sequence equal in both orders."""
        ptr = self._next()
        if ptr is not None:
            self.emitted += 1
        return ptr

    def _next(self) -> Pointer | None:
        while not self.source_done:
            ptr = self._pull()
            if ptr is None:
                self.source_done = True
                break
            if self.size <= 1:
                return ptr
            self.buffer.append(ptr)
            if len(self.buffer) >= self.size:
                return self._take()
        return self._take() if self.buffer else None

    def _take(self) -> Pointer:
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()


class _RecordReader:
    """One record at a (shard, offset), with the last few shards kept open: a rank's own records
    come from the few shards the shuffle buffer spans, and opening a file per sample took about
    as long as reading the sample."""

    KEEP = 8

    def __init__(self, units: tuple[str, ...]):
        self.units = units
        self.files: dict[int, Any] = {}  # unit index -> open file, least recently used first

    def read(self, ui: int, offset: int) -> Record | ReadProblem | None:
        unit = self.units[ui]
        if is_folder_unit(unit):
            return read_unit_record(unit, offset)
        f = self.files.pop(ui, None)
        if f is None:
            try:
                f = open(unit, "rb")
            except OSError as e:
                return ReadProblem(unit, "unreadable_shard", str(e))
        self.files[ui] = f
        if len(self.files) > self.KEEP:
            self.files.pop(next(iter(self.files))).close()
        return next(tar_records_of(f, unit, offset), None)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# --------------------------------------------------------------------------------------------
# One worker of one rank
# --------------------------------------------------------------------------------------------


class _RankStream:
    """Walks the global order and decodes this rank's samples of the micro-steps this worker makes."""

    def __init__(self, spec: StreamSpec, worker: int, workers: int, position: dict | None, stats: dict):
        self.spec, self.worker, self.workers = spec, worker, workers
        self.step = spec.batch_size * spec.world_size  # S: samples of one micro-step of every rank
        self.stats = ShardStats(stats, log_problems=spec.rank == 0 and worker == 0)
        self.walk = GlobalWalk(spec.units, spec.seed, spec.shuffle_buffer, self.stats)
        self.reader = _RecordReader(spec.units)
        self.samples = 0  # global samples the walk has handed out: the index of the next one
        if position is not None:
            self.samples = int(position["samples"])
            self.walk.restore(position["walk"])
        self._tried = self._good = 0  # this worker's decodes in the current epoch

    def position(self) -> dict[str, Any]:
        return {"samples": self.samples, "walk": self.walk.state()}

    def _next_pointer(self) -> tuple[int, Pointer]:
        while True:
            ptr = self.walk.next()
            if ptr is not None:
                self.samples += 1
                return self.walk.epoch, ptr
            self._next_epoch()

    def _next_epoch(self) -> None:
        w = self.walk
        if w.emitted == 0:
            raise ShardError(f"a whole epoch over {len(self.spec.units)} shard(s) gave no record:\n"
                             + format_stats(self.stats.to_dict(), only_bad=True))
        if self._tried and not self._good:
            raise ShardError(f"rank {self.spec.rank} worker {self.worker}: none of the {self._tried} samples it "
                             f"decoded in epoch {w.epoch} was usable:\n"
                             + format_stats(self.stats.to_dict(), only_bad=True))
        self._tried = self._good = 0
        w.start_epoch(w.epoch + 1)

    def _decode(self, epoch: int, ptr: Pointer) -> dict[str, Any] | None:
        ui, offset, notes = ptr
        rec = self.reader.read(ui, offset)
        self._tried += 1
        if not isinstance(rec, Record):  # the shard changed on disk since the walk passed it
            self.stats.skip(self.spec.units[ui], "reread_failed", f"@{offset}", "no record at this offset any more")
            return None
        rec.notes = list(notes)  # read on its own, the second of a duplicate key does not know it
        sample = decode_sample(self.spec, rec, epoch, ui, self.stats)
        self._good += sample is not None
        return sample

    def batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, dict]]]:
        """(micro-batch, position after it, counts so far), endlessly."""
        s, rank, world = self.step, self.spec.rank, self.spec.world_size
        c = self.samples // s + self.worker  # the global micro-step this worker makes next
        try:
            while True:
                while self.samples < c * s:  # other workers' micro-steps: walk, do not decode
                    self._next_pointer()
                pointers = [self._next_pointer() for _ in range(s)]
                # Global sample i goes to rank i mod w; the micro-step starts at a multiple of w.
                samples = [self._decode(e, p) for e, p in pointers[rank::world]]
                batch = collate(self.spec, [x for x in samples if x is not None])
                yield batch, self.position(), self.stats.to_dict()
                c += self.workers
        finally:
            self.reader.close()


class _GlobalDataset(IterableDataset):
    def __init__(self, spec: StreamSpec, position: dict | None, stats: list[dict], workers: int):
        super().__init__()
        self.spec, self.position, self.stats, self.workers = spec, position, stats, workers

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        stream = _RankStream(self.spec, wid, self.workers, self.position, self.stats[wid])
        for batch, position, stats in stream.batches():
            yield batch, wid, position, stats


def _identity(x):
    return x


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class GlobalOrderLoader:
    """This rank's micro-batches of the global order, endlessly; a position any layout resumes.

    Batches as ResumableLoader's ({"image" | "codes", "caption", "key"}), `micro_batch` rows or
    fewer (bad samples dropped, see the module docstring). `state_dict()` is the same on every
    rank; `load_state_dict()` takes it at any number of ranks, workers and micro-batch split with
    the same global batch, seed, shards and shuffle buffer.
    """

    elastic = True  # the trainer's test for a position that loads at another number of ranks

    def __init__(self, spec: StreamSpec, global_batch: int, num_workers: int = 0, pin_memory: bool = False):
        if not spec.endless:
            raise ValueError("the global order is for endless training streams; evaluation reads the per-slot "
                             "order (order='slots')")
        step = spec.batch_size * spec.world_size
        if global_batch < 1 or global_batch % step:
            raise ConfigError(f"global batch {global_batch} is not a multiple of micro-batch {spec.batch_size} x "
                              f"{spec.world_size} rank(s) = {step}; it must be micro-batch x accumulation x ranks")
        self.spec, self.global_batch = spec, global_batch
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._workers = max(1, num_workers)
        self.reset()

    def reset(self) -> None:
        """Back to the very start (epoch 0, no samples consumed, counts cleared)."""
        self._position: dict[str, Any] | None = None
        self._stats: list[dict] = [{} for _ in range(self._workers)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _GlobalDataset(self.spec, self._position, list(self._stats), self._workers)
        if self.num_workers == 0:
            items: Any = iter(dataset)
        else:
            items = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                               pin_memory=self.pin_memory, persistent_workers=False)
        for batch, wid, position, stats in items:
            # Only delivered batches move the position: what workers prefetched is made again.
            self._position, self._stats[wid] = position, stats
            yield batch

    def stand_in(self) -> dict[str, Any]:
        """A one-row batch of zeros with an empty caption, in place of a micro-batch that came
        with no row: the trainer runs it so that every rank takes part in every micro-step's
        collectives, and weighs its loss by 0 (training/trainer.py)."""
        s = self.spec
        if s.kind == "image":
            value = torch.zeros((1, 3, s.image_size, s.image_size), dtype=torch.float32)
        else:
            value = torch.zeros((1, s.codes_len or 1), dtype=torch.int64)
        return {"image" if s.kind == "image" else "codes": value, "caption": [""], "key": ["<stand-in>"]}

    # ---- where it is ----
    @property
    def samples_consumed(self) -> int:
        """Global samples (of every rank) before the next micro-batch."""
        return 0 if self._position is None else int(self._position["samples"])

    @property
    def global_batch_index(self) -> int:
        """The global batch the next micro-batch belongs to (= global batches done, at a step's end)."""
        return self.samples_consumed // self.global_batch

    @property
    def micro_step(self) -> int:
        """Which micro-step of that global batch comes next (0 at an optimizer step's boundary)."""
        return self.samples_consumed % self.global_batch // (self.spec.batch_size * self.spec.world_size)

    @property
    def epoch(self) -> int:
        return 0 if self._position is None else int(self._position["walk"]["epoch"])

    # ---- state ----
    def _identity_fields(self) -> dict[str, Any]:
        s = self.spec
        return {"kind": s.kind, "shards": shard_names_digest(s.units), "n_shards": len(s.units), "seed": s.seed,
                "shuffle_buffer": s.shuffle_buffer, "global_batch": self.global_batch}

    def state_dict(self) -> dict[str, Any]:
        p = self._position
        return {"version": GLOBAL_STATE_VERSION, "order": "global", **self._identity_fields(),
                "samples": self.samples_consumed, "walk": None if p is None else p["walk"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_version(state)
        problems = _mismatches(state, self._identity_fields())
        if problems:
            raise ConfigError("cannot resume the data position: " + "; ".join(problems)
                              + ". Resume with the settings of the saved run, or start the data stream afresh.")
        self._position = _parse_position(state, self.spec)
        self._stats = [{} for _ in range(self._workers)]

    # ---- reporting ----
    def stats(self) -> dict[str, dict]:
        """This rank's counts since it was built or resumed (each rank decodes its own samples)."""
        return ShardStats.merge(self._stats)

    def report(self, only_bad: bool = True) -> str:
        return format_stats(self.stats(), only_bad=only_bad)


def _check_version(state: Any) -> None:
    if not isinstance(state, dict):
        raise ConfigError(f"cannot resume the data position: expected a data loader state (a dict), got "
                          f"{type(state).__name__}")
    if state.get("order") != "global":
        raise ConfigError("cannot resume the data position: it was saved by the per-slot order (data.order=slots), "
                          "which only the same ranks, workers and batch size can continue; resume with "
                          "data.order=slots, or start the data stream afresh")
    if state.get("version") != GLOBAL_STATE_VERSION:
        raise ConfigError(f"data loader state version {state.get('version')!r}; this megadalle reads global-order "
                          f"version {GLOBAL_STATE_VERSION}")


def _mismatches(state: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the saved run and this one, each in the words of its setting."""
    out = []
    if state.get("global_batch") != now["global_batch"]:
        out.append(f"global batch {state.get('global_batch')} saved, {now['global_batch']} now (micro-batch x "
                   f"accumulation x ranks must stay {state.get('global_batch')})")
    if state.get("shards") != now["shards"]:
        out.append(f"the shard list differs ({state.get('n_shards')} shard(s) saved, {now['n_shards']} now, "
                   f"or other names)")
    for key, setting in (("seed", "data.seed"), ("shuffle_buffer", "data.shuffle_buffer"), ("kind", "kind")):
        if state.get(key) != now[key]:
            out.append(f"{setting} {state.get(key)!r} saved, {now[key]!r} now")
    return out


def _parse_position(state: dict[str, Any], spec: StreamSpec) -> dict[str, Any] | None:
    """The saved position, checked to be whole and to fall on a micro-step of this layout."""
    try:
        samples, walk = int(state["samples"]), state["walk"]
        if walk is None:
            if samples:
                raise ValueError("samples consumed but no walk state")
            return None
        GlobalWalk(spec.units, spec.seed, spec.shuffle_buffer, ShardStats()).restore(walk)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"cannot resume the data position: the saved state is damaged ({type(e).__name__}: {e}); "
                          f"start the data stream afresh") from None
    step = spec.batch_size * spec.world_size
    if samples % step:
        raise ConfigError(f"cannot resume the data position: it was saved after {samples} samples, inside a "
                          f"micro-step of this run ({spec.batch_size} x {spec.world_size} rank(s) = {step}); "
                          f"save at an optimizer step's boundary")
    return {"samples": samples, "walk": walk}


__all__ = ["GlobalOrderLoader", "GlobalWalk", "shard_names_digest"]
