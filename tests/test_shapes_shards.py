"""Building the shapes shards of a run: reuse, rebuild on change, ranks racing to build it."""

import subprocess
import sys

from megadalle.config import load_config
from megadalle.data.shapes_shards import ensure_shapes_shards
from megadalle.data.shards import Record, iter_tar_records, read_manifest

OVERRIDES = {"data.shapes.n_train": 30, "data.shapes.n_val": 5, "data.shapes.n_heldout": 5,
             "data.shapes.samples_per_shard": 8}


def _contents(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_concurrent_builders_agree_and_leave_no_debris(tmp_path):
    code = ("import sys; from megadalle.config import load_config; "
            "from megadalle.data.shapes_shards import ensure_shapes_shards; "
            f"cfg = load_config('tiny', overrides={OVERRIDES!r}); "
            "ensure_shapes_shards(cfg, sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    root = tmp_path / "data" / "shapes"
    assert sorted(p.name for p in root.iterdir()) == ["heldout", "train", "val"]  # no .tmp leftovers
    # Same as a build in this process.
    cfg = load_config("tiny", overrides=OVERRIDES)
    other = ensure_shapes_shards(cfg, tmp_path / "again")
    assert _contents(root / "train") == _contents(other["train"])
    keys = [r.key for p in sorted((root / "train").glob("*.tar")) for r in iter_tar_records(p)
            if isinstance(r, Record)]
    assert keys == [f"train-{i:08d}" for i in range(30)]


def test_changed_settings_rebuild_and_zero_counts_skip_splits(tmp_path):
    cfg = load_config("tiny", overrides=OVERRIDES)
    first = ensure_shapes_shards(cfg, tmp_path)
    before = _contents(first["train"])
    cfg2 = load_config("tiny", overrides={**OVERRIDES, "data.shapes.seed": 1})
    second = ensure_shapes_shards(cfg2, tmp_path)
    assert _contents(second["train"]) != before and read_manifest(second["train"])["seed"] == 1
    cfg3 = load_config("tiny", overrides={**OVERRIDES, "data.shapes.n_heldout": 0,
                                          "data.shapes.heldout_fraction": 0.0})
    assert set(ensure_shapes_shards(cfg3, tmp_path / "x")) == {"train", "val"}
    # Image size follows data.image_size unless data.shapes.image_size is set.
    cfg4 = load_config("tiny", overrides={**OVERRIDES, "data.shapes.image_size": 32})
    assert read_manifest(ensure_shapes_shards(cfg4, tmp_path / "y")["val"])["image_size"] == 32
