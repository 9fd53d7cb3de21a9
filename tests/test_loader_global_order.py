"""The global sample order (data/global_order.py): the same samples per global batch at every
number of ranks, workers and micro-batch split, and a position any of them resumes.

Ranks are simulated in one process: a loader per rank (rank=r, world_size=w), each read for its
micro-batches. From them the global sequence is put back together by the documented rule (global
sample i is rank i mod w's; a rank's micro-batch c holds its samples of micro-step c), so the tests
compare whole sequences, not only sets.
"""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from megadalle.config import ConfigError, load_config
from megadalle.data.global_order import GlobalOrderLoader, _RecordReader
from megadalle.data.loader import ResumableLoader, image_loader, image_loader_from_config, token_loader
from megadalle.data.shapes_shards import write_shapes_shards
from megadalle.data.shards import ShardWriter, TokenShardWriter, iter_unit_records, read_unit_record, source_units

N = 91  # 7 shards of 13: epochs end inside global batches
G = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    cfg = load_config("tiny", overrides={"data.shapes.samples_per_shard": 13})
    out = tmp_path_factory.mktemp("shapes") / "train"
    write_shapes_shards(out, "train", N, cfg.data.shapes, image_size=32)
    return out


def _images(shards, **kw):
    def make(rank, world_size, micro, workers=0, global_batch=G, **more):
        args = dict(image_size=32, augment="stage1", shuffle_buffer=16, order="global", global_batch=global_batch,
                    num_workers=workers, rank=rank, world_size=world_size, **kw)
        return image_loader(shards, micro, **{**args, **more})
    return make


def _read(make, layout, steps, state=None, global_batch=G):
    """Run `steps` global batches on the ranks of `layout` = (ranks, micro-batch, workers).

    Returns the global sequence as (key, value) per global batch, and every rank's state after."""
    w, m, workers = layout
    accum = global_batch // (m * w)
    loaders = [make(r, w, m, workers, global_batch) for r in range(w)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    per_rank = [list(itertools.islice(iter(loader), steps * accum)) for loader in loaders]
    name = "image" if "image" in per_rank[0][0] else "codes"
    seq = [(per_rank[r][c]["key"][j], per_rank[r][c][name][j])
           for c in range(steps * accum) for j in range(m) for r in range(w)]
    batches = [seq[k * global_batch:(k + 1) * global_batch] for k in range(steps)]
    for loader in loaders:
        assert loader.global_batch_index == (0 if state is None else state["samples"] // global_batch) + steps
        assert loader.micro_step == 0
    return batches, [loader.state_dict() for loader in loaders]


def _same(got, want):
    assert [[k for k, _ in b] for b in got] == [[k for k, _ in b] for b in want]
    # The pixels too: augmentation comes from the sample, not from who decodes it.
    assert all(torch.equal(a, b) for gb, wb in zip(got, want) for (_, a), (_, b) in zip(gb, wb))


# (ranks, micro-batch, workers): accumulation = G / (micro x ranks)
LAYOUTS = [(1, 2, 0), (1, 4, 2), (2, 4, 0), (2, 1, 2), (4, 2, 0), (4, 1, 1), (4, 1, 2)]


@pytest.fixture(scope="module")
def reference(shards):
    return _read(_images(shards), (1, 8, 0), 15)[0]  # 120 samples: into the second epoch


def test_one_rank_reads_every_sample_once_per_epoch_in_a_shuffled_order(reference):
    seq = [k for b in reference for k, _ in b]
    assert sorted(seq[:N]) == [f"train-{i:08d}" for i in range(N)]
    assert seq[:N] != sorted(seq[:N])
    assert seq[N:] != seq[:len(seq) - N]  # the second epoch has its own order


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_global_batches(shards, reference, layout):
    got, states = _read(_images(shards), layout, 15)
    _same(got, reference)
    assert all(s == states[0] for s in states)  # the position is the same on every rank


def test_one_rank_without_workers_keeps_the_per_slot_sequence(shards):
    # What a one-rank run read before the global order existed, it reads still.
    slots = image_loader(shards, 4, image_size=32, shuffle_buffer=16, rank=0, world_size=1)
    glob = image_loader(shards, 4, image_size=32, shuffle_buffer=16, rank=0, world_size=1, order="global")
    assert isinstance(glob, GlobalOrderLoader) and glob.elastic and not getattr(slots, "elastic", False)
    keys = [[k for b in itertools.islice(iter(x), 40) for k in b["key"]] for x in (slots, glob)]
    assert keys[0] == keys[1]


@pytest.mark.parametrize("before, after, k", [
    ((1, 8, 0), (2, 4, 0), 5),
    ((2, 2, 0), (1, 8, 0), 12),  # saved in the second epoch
    ((4, 1, 2), (2, 2, 1), 7),
    ((1, 2, 0), (4, 2, 2), 11),  # the micro-batch changes too
])
def test_resume_at_another_layout_continues_the_run(shards, reference, tmp_path, before, after, k):
    make = _images(shards)
    head, states = _read(make, before, k)
    _same(head, reference[:k])
    # Any rank's state, through a checkpoint file as the trainer writes it.
    torch.save({"data": states[-1]}, tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)["data"]
    rest, _ = _read(make, after, 15 - k, state)
    _same(rest, reference[k:])


def test_iterating_again_continues_after_the_last_delivered_batch(shards, reference):
    loader = _images(shards)(0, 1, 2, workers=2)  # workers prefetch ahead; the position must not
    first = [k for b in itertools.islice(iter(loader), 12) for k in b["key"]]
    second = [k for b in itertools.islice(iter(loader), 16) for k in b["key"]]
    assert first + second == [k for b in reference[:7] for k, _ in b]


def test_token_shards_read_the_same_way(tmp_path):
    rng = np.random.default_rng(0)
    grids = {f"t{i:03d}": rng.integers(0, 512, 16) for i in range(40)}
    with TokenShardWriter(tmp_path, max_samples=9) as w:
        for key, g in grids.items():
            w.write_codes(key, g, f"caption {key}")

    def make(rank, world_size, micro, workers=0, global_batch=4):
        return token_loader(tmp_path, micro, codes_len=16, shuffle_buffer=8, rank=rank, world_size=world_size,
                            num_workers=workers, order="global", global_batch=global_batch)

    ref, _ = _read(make, (1, 4, 0), 14, global_batch=4)  # 56 samples: into the second epoch
    seq = [k for b in ref for k, _ in b]
    assert sorted(seq[:40]) == sorted(grids)
    assert all(np.array_equal(codes.numpy(), grids[key]) for b in ref for key, codes in b)
    for layout in [(2, 2, 0), (4, 1, 2), (2, 1, 1)]:
        _same(_read(make, layout, 14, global_batch=4)[0], ref)
    head, states = _read(make, (2, 1, 0), 6, global_batch=4)
    rest, _ = _read(make, (1, 2, 1), 8, states[1], global_batch=4)
    _same(head + rest, ref)


# --------------------------------------------------------------------------------------------
# Bad samples
# --------------------------------------------------------------------------------------------

BAD = {1, 5, 6, 7, 13}  # sample indices written with an undecodable image


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    with ShardWriter(out, max_samples=12) as w:
        for i in range(24):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (10 * i, 0, 255 - 10 * i)).save(buf, format="PNG")
            w.write(f"s{i:03d}", {"png": b"not a png" if i in BAD else buf.getvalue(), "txt": f"sample {i}"})
    return out


def test_a_bad_sample_shortens_its_micro_batch_on_its_rank_only(bad_shards):
    def make(rank, world_size, micro, workers=0, global_batch=4):
        return image_loader(bad_shards, micro, image_size=16, shuffle_buffer=0, rank=rank, world_size=world_size,
                            num_workers=workers, order="global", global_batch=global_batch)

    def good_sets(layout):
        w, m, workers = layout
        loaders = [make(r, w, m, workers) for r in range(w)]
        per_rank = [list(itertools.islice(iter(x), 6 * 4 // (m * w))) for x in loaders]
        accum = 4 // (m * w)
        sets = [sorted(k for r in range(w) for b in per_rank[r][s * accum:(s + 1) * accum] for k in b["key"])
                for s in range(6)]
        skipped = sum(sum(u["skipped"].get("undecodable_image", 0) for u in x.stats().values()) for x in loaders)
        return sets, per_rank, skipped

    ref, _, skipped = good_sets((1, 4, 0))
    # One epoch in six global batches of 4: the bad samples are missing and nothing replaces them.
    assert skipped == len(BAD)
    assert sorted(int(k[1:]) for s in ref for k in s) == sorted(set(range(24)) - BAD)
    assert [len(s) for s in ref] != [4] * 6
    for layout in [(2, 2, 0), (4, 1, 0), (2, 1, 2), (4, 1, 1)]:
        sets, per_rank, skipped = good_sets(layout)
        assert sets == ref and skipped == len(BAD)
    # Four ranks of one sample: a rank whose sample is bad still gets its micro-batch, empty,
    # so that every rank makes the same number of micro-steps.
    _, per_rank, _ = good_sets((4, 1, 0))
    sizes = [[len(b["key"]) for b in batches] for batches in per_rank]
    assert sum(s.count(0) for s in sizes) == len(BAD)
    empty = next(b for batches in per_rank for b in batches if not b["key"])
    assert empty["image"].shape == (0, 3, 16, 16) and empty["caption"] == []


# --------------------------------------------------------------------------------------------
# Positions that cannot be resumed
# --------------------------------------------------------------------------------------------


def test_positions_of_other_runs_are_refused_with_the_reason(shards, tmp_path):
    make = _images(shards)
    loader = make(0, 1, 2)
    list(itertools.islice(iter(loader), 8))
    state = loader.state_dict()
    assert state["samples"] == 16 and loader.global_batch_index == 2

    def refused(other, st, *words):
        with pytest.raises(ConfigError) as e:
            other.load_state_dict(st)
        for word in words:
            assert word in str(e.value), str(e.value)

    refused(make(0, 2, 2, global_batch=16), state, "global batch 8 saved, 16 now")
    refused(make(0, 1, 2, seed=3, global_batch=16), state, "global batch 8 saved", "data.seed 0 saved, 3 now")
    refused(make(0, 1, 2, shuffle_buffer=4), state, "data.shuffle_buffer 16 saved, 4 now")
    subset = image_loader(str(shards / "shard-00000[0-3].tar"), 2, image_size=32, order="global", global_batch=8,
                          rank=0, world_size=1)
    refused(subset, state, "shard list differs (7 shard(s) saved, 4 now")
    # Damaged or foreign states.
    refused(make(0, 1, 2), None, "expected a data loader state")
    refused(make(0, 1, 2), {**state, "walk": {"epoch": 0}}, "damaged")
    refused(make(0, 1, 2), {**state, "samples": "many"}, "damaged")
    refused(make(0, 1, 2), {**state, "walk": {**state["walk"], "buffer": [[99, 0]]}}, "damaged")
    refused(make(0, 1, 2), {**state, "walk": {**state["walk"], "rng": {"state": 1}}}, "damaged")
    refused(make(0, 1, 2), {**state, "version": 7}, "version 7")
    slots = image_loader(shards, 2, image_size=32, rank=0, world_size=1)
    list(itertools.islice(iter(slots), 2))
    refused(make(0, 1, 2), slots.state_dict(), "per-slot order")
    refused(slots, state, "global order")
    # A position inside a micro-step of the new layout (saved mid-step by a smaller one).
    one = make(0, 1, 2)
    list(itertools.islice(iter(one), 1))
    refused(make(0, 2, 2), one.state_dict(), "inside a micro-step")
    with pytest.raises(ConfigError, match="not a multiple of micro-batch 2 x 2 rank"):
        make(0, 2, 2, global_batch=6)


def test_config_builders_use_the_global_order_for_training_only(tmp_path):
    cfg = load_config("tiny", overrides={"data.shapes.n_train": 24, "data.shapes.n_val": 8, "data.shapes.n_heldout": 8,
                                         "data.shapes.samples_per_shard": 8,
                                         "logging.run_dir": str(tmp_path)})
    train = image_loader_from_config(cfg, 2, "train", rank=1, world_size=2, global_batch=8)
    assert isinstance(train, GlobalOrderLoader) and train.global_batch == 8
    assert isinstance(image_loader_from_config(cfg, 2, "val", endless=False, rank=0, world_size=1), ResumableLoader)
    assert isinstance(image_loader_from_config(cfg, 2, "train", endless=False, rank=0, world_size=1), ResumableLoader)
    assert isinstance(image_loader_from_config(cfg, 2, "train", rank=0, world_size=1, order="slots"), ResumableLoader)
    with pytest.raises(ConfigError, match="data.order='random'"):
        image_loader_from_config(cfg, 2, "train", rank=0, world_size=1, order="random")
    slots = load_config("tiny", overrides={"data.order": "slots", "logging.run_dir": str(tmp_path)})
    assert isinstance(image_loader_from_config(slots, 2, "train", rank=0, world_size=1), ResumableLoader)
    with pytest.raises(ConfigError, match="data.order='shuffled': choose global or slots"):
        load_config("tiny", overrides={"data.order": "shuffled"})


def test_the_stand_in_has_the_shape_of_a_row(shards, tmp_path):
    # What the trainer runs, loss weighed 0, for a micro-batch whose samples were all bad.
    loader = image_loader(shards, 2, image_size=16, rank=0, world_size=1, order="global")
    row = next(iter(loader))
    stand_in = loader.stand_in()
    assert stand_in["image"].shape == (1, *row["image"].shape[1:]) and stand_in["image"].dtype == row["image"].dtype
    assert stand_in["caption"] == [""] and len(stand_in["key"]) == 1


def _walk(unit, read_data):
    return [(x.key, x.offset, x.end, tuple(x.notes), sorted(x.files)) if hasattr(x, "key") else (x.reason, x.detail)
            for x in iter_unit_records(unit, None, read_data=read_data)]


def test_walking_headers_finds_the_records_reading_finds(shards, tmp_path):
    # The walk steps over member bytes; it must end records, shards and damaged shards exactly
    # where reading them does, or ranks would disagree with a resumed or single-rank run.
    src = sorted(shards.glob("*.tar"))[0]
    data = src.read_bytes()
    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w") as t:
        for name, content in (("a.txt", b"x"), ("a.png", b"y" * 700), ("a.txt", b"z"), ("b.txt", b"w")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    cases = [src, dup]
    for cut in (100, 512, 1500, len(data) // 2, len(data) - 1024, len(data) - 10):
        p = tmp_path / f"cut{cut}.tar"
        p.write_bytes(data[:cut])
        cases.append(p)
    for path in cases:
        full, walked = _walk(str(path), True), _walk(str(path), False)
        assert full == walked, path
    assert any(r[3] == ("duplicate_key",) for r in _walk(str(dup), False))


def test_the_reader_that_keeps_shards_open_reads_what_a_fresh_open_reads(tmp_path):
    with ShardWriter(tmp_path, max_samples=2) as w:  # 12 shards: more than the reader keeps open
        for i in range(24):
            w.write(f"k{i:02d}", {"txt": f"caption {i}", "json": "{}"})
    units = tuple(source_units(tmp_path))
    pointers = [(ui, r.offset) for ui, u in enumerate(units) for r in iter_unit_records(u, read_data=False)]
    order = np.random.default_rng(0).permutation(len(pointers))
    reader = _RecordReader(units)
    for j in list(order) * 2:
        ui, off = pointers[j]
        got, want = reader.read(ui, off), read_unit_record(units[ui], off)
        assert (got.key, got.files, got.end) == (want.key, want.files, want.end)
        assert len(reader.files) <= reader.KEEP
    reader.close()
