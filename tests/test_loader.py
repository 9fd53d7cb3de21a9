"""Streaming loader: batches, rank/worker sharding, shuffling, exact resume, augmentation."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from megadalle.config import load_config
from megadalle.data import augment as A
from megadalle.data.loader import image_loader, image_loader_from_config, token_loader
from megadalle.data.shapes_shards import ensure_shapes_shards, write_shapes_shards
from megadalle.data.shards import TokenShardWriter

N = 90


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    cfg = load_config("tiny", overrides={"data.shapes.samples_per_shard": 10})
    out = tmp_path_factory.mktemp("shapes") / "train"
    write_shapes_shards(out, "train", N, cfg.data.shapes, image_size=32)
    return out  # 9 shards of 10


def _keys(loader, n_batches):
    it = iter(loader)
    return [k for b in itertools.islice(it, n_batches) for k in b["key"]]


def test_batches_have_the_documented_form(shards):
    loader = image_loader(shards, 8, image_size=32, rank=0, world_size=1, shuffle_buffer=20)
    b = next(iter(loader))
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert len(b["caption"]) == 8 and all(isinstance(c, str) and c for c in b["caption"])
    assert len(set(b["key"])) == 8


def test_finite_pass_covers_every_sample_once_and_shuffles_per_epoch(shards):
    loader = image_loader(shards, 8, image_size=32, rank=0, world_size=1, endless=False, shuffle_buffer=25)
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    assert sorted(first) == sorted(second) == [f"train-{i:08d}" for i in range(N)]
    assert first != second  # a new order each epoch
    again = image_loader(shards, 8, image_size=32, rank=0, world_size=1, endless=False, shuffle_buffer=25)
    assert [k for b in again for k in b["key"]] == first  # seeded
    other = image_loader(shards, 8, image_size=32, rank=0, world_size=1, endless=False, shuffle_buffer=25, seed=1)
    assert [k for b in other for k in b["key"]] != first


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_split_the_data_without_overlap(shards, workers):
    seen = []
    for rank in range(2):
        loader = image_loader(shards, 4, image_size=32, rank=rank, world_size=2, endless=False,
                              shuffle_buffer=10, num_workers=workers)
        seen.append([k for b in loader for k in b["key"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"train-{i:08d}" for i in range(N)]


def test_more_slots_than_shards_interleaves_records(tmp_path):
    cfg = load_config("tiny")
    write_shapes_shards(tmp_path, "train", 10, cfg.data.shapes, image_size=32)  # one shard
    seen = [[k for b in image_loader(tmp_path, 2, image_size=32, rank=r, world_size=3, endless=False,
                                     shuffle_buffer=0) for k in b["key"]] for r in range(3)]
    assert sorted(sum(seen, [])) == [f"train-{i:08d}" for i in range(10)]
    assert [len(s) for s in seen] == [4, 3, 3]


@pytest.mark.parametrize("workers, endless, k", [(0, True, 7), (2, True, 5), (2, False, 3), (0, False, 9)])
def test_resume_yields_exactly_the_remaining_samples(shards, workers, endless, k):
    def make():
        return image_loader(shards, 4, image_size=32, rank=1, world_size=2, endless=endless, shuffle_buffer=12,
                            num_workers=workers)

    total = 30 if endless else None
    reference = make()
    ref_batches = list(itertools.islice(iter(reference), total))
    ref = [kk for b in ref_batches for kk in b["key"]]
    assert len(ref_batches) > k

    first = make()
    it = iter(first)
    head = [kk for b in itertools.islice(it, k) for kk in b["key"]]
    state = first.state_dict()
    del it

    resumed = make()
    resumed.load_state_dict(state)
    rest_batches = list(itertools.islice(iter(resumed), None if total is None else total - k))
    rest = [kk for b in rest_batches for kk in b["key"]]
    assert head + rest == ref
    # Pixels too, not only keys.
    assert torch.equal(rest_batches[0]["image"], ref_batches[k]["image"])


def test_resume_survives_a_checkpoint_round_trip_and_epoch_boundaries(shards, tmp_path):
    whole = image_loader(shards, 8, image_size=32, rank=0, world_size=1, shuffle_buffer=30)
    ref = _keys(whole, 40)  # 320 samples: several epochs of 90
    loader = image_loader(shards, 8, image_size=32, rank=0, world_size=1, shuffle_buffer=30)
    head = _keys(loader, 17)
    torch.save({"data": loader.state_dict()}, tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)["data"]
    fresh = image_loader(shards, 8, image_size=32, rank=0, world_size=1, shuffle_buffer=30)
    fresh.load_state_dict(state)
    assert head + _keys(fresh, 23) == ref
    assert fresh.epoch == whole.epoch >= 2  # the same epoch count as the run that never stopped


def test_resume_after_the_data_moved(shards, tmp_path):
    import shutil

    loader = image_loader(shards, 4, image_size=32, rank=0, world_size=1, shuffle_buffer=10)
    ref = _keys(loader, 12)
    loader = image_loader(shards, 4, image_size=32, rank=0, world_size=1, shuffle_buffer=10)
    head = _keys(loader, 5)
    moved = shutil.copytree(shards, tmp_path / "elsewhere")
    resumed = image_loader(moved, 4, image_size=32, rank=0, world_size=1, shuffle_buffer=10)
    resumed.load_state_dict(loader.state_dict())
    assert head + _keys(resumed, 7) == ref


def test_resume_with_other_settings_is_refused(shards):
    loader = image_loader(shards, 4, image_size=32, rank=0, world_size=1)
    _keys(loader, 2)
    state = loader.state_dict()
    for kwargs, msg in ((dict(num_workers=2), "num_workers"), (dict(world_size=2), "world size"),
                        (dict(seed=3), "shard list, batch size, seed")):
        other = image_loader(shards, 4, image_size=32, **{"rank": 0, "world_size": 1, **kwargs})
        with pytest.raises(ValueError, match=msg):
            other.load_state_dict(state)


def test_token_loader_streams_codes_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    grids = {f"t{i:03d}": rng.integers(0, 512, 64) for i in range(30)}
    with TokenShardWriter(tmp_path, max_samples=7) as w:
        for key, g in grids.items():
            w.write_codes(key, g, f"caption {key}")
    loader = token_loader(tmp_path, 4, codes_len=64, rank=0, world_size=1, shuffle_buffer=8)
    b = next(iter(loader))
    assert b["codes"].shape == (4, 64) and b["codes"].dtype == torch.long
    for key, codes, cap in zip(b["key"], b["codes"], b["caption"]):
        assert np.array_equal(codes.numpy(), grids[key]) and cap == f"caption {key}"
    ref = _keys(token_loader(tmp_path, 4, codes_len=64, rank=0, world_size=1, shuffle_buffer=8), 20)
    first = token_loader(tmp_path, 4, codes_len=64, rank=0, world_size=1, shuffle_buffer=8)
    head = _keys(first, 6)
    second = token_loader(tmp_path, 4, codes_len=64, rank=0, world_size=1, shuffle_buffer=8)
    second.load_state_dict(first.state_dict())
    assert head + _keys(second, 14) == ref


def test_loader_from_config_builds_and_reuses_the_shapes_data(tmp_path):
    cfg = load_config("tiny", overrides={"data.shapes.n_train": 40, "data.shapes.n_val": 8, "data.shapes.n_heldout": 8,
                                         "data.shapes.samples_per_shard": 16, "logging.run_dir": str(tmp_path)})
    dirs = ensure_shapes_shards(cfg, tmp_path)
    assert set(dirs) == {"train", "val", "heldout"}
    assert len(list(dirs["train"].glob("shard-*.tar"))) == 3
    stamp = (dirs["train"] / "shard-000000.tar").stat().st_mtime_ns
    loader = image_loader_from_config(cfg, 8, "val", endless=False, rank=0, world_size=1)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"val-{i:08d}" for i in range(8)]
    # Validation restarts at every iter(), even after an evaluation stopped early.
    first = next(iter(loader))["key"]
    assert next(iter(loader))["key"] == first == keys[:8]
    train = image_loader_from_config(cfg, 8, "train", rank=0, world_size=1)
    assert next(iter(train))["key"] != next(iter(train))["key"]  # training continues instead
    assert (dirs["train"] / "shard-000000.tar").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # A changed setting rebuilds that split; a missing shard too.
    (dirs["val"] / "shard-000000.tar").unlink()
    ensure_shapes_shards(cfg, tmp_path)
    assert (dirs["val"] / "shard-000000.tar").is_file()


def _gradient(w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    return Image.fromarray(a)


def test_augmentation_recipes():
    img = _gradient(80, 60)
    for recipe in A.RECIPES:
        outs = [np.asarray(A.augment(img, 32, recipe, np.random.default_rng(s))) for s in range(12)]
        assert all(o.shape == (32, 32, 3) for o in outs)
        distinct = {o.tobytes() for o in outs}
        assert (len(distinct) == 1) == (recipe == "none")
        # Same rng seed, same result (what exact resume relies on).
        assert np.array_equal(A.augment(img, 32, recipe, np.random.default_rng(5)), outs[5])
    # Only stage 1 flips: red increases left to right unless flipped.
    flips = {r: sum(np.asarray(A.augment(img, 32, r, np.random.default_rng(s)))[16, 0, 0] >
                    np.asarray(A.augment(img, 32, r, np.random.default_rng(s)))[16, -1, 0] for s in range(20))
             for r in ("stage1", "stage2")}
    assert flips["stage2"] == 0 and 0 < flips["stage1"] < 20
    with pytest.raises(ValueError, match="unknown augmentation"):
        A.augment(img, 32, "mixup", np.random.default_rng(0))
