"""Tar shards: write/read round trip, naming, append, token shards, broken archives."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from megadalle.data import shards as SH
from megadalle.data.shards import Record, ReadProblem, ShardWriter, TokenShardWriter, iter_tar_records


def _png(colour=(200, 10, 10), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_layout_and_rollover(tmp_path):
    with ShardWriter(tmp_path, max_samples=3) as w:
        for i in range(7):
            w.write(f"k{i:03d}", {"png": _png((i, 0, 0)), "txt": f"caption {i}", "json": '{"i": %d}' % i})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # img2dataset layout, readable by the standard library too.
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        assert tf.getnames()[:3] == ["k000.png", "k000.txt", "k000.json"]
    records = [r for p in SH.list_shards(tmp_path) for r in iter_tar_records(p)]
    assert all(isinstance(r, Record) for r in records)
    assert [r.key for r in records] == [f"k{i:03d}" for i in range(7)]
    assert records[4].files["txt"] == b"caption 4"
    assert np.asarray(Image.open(io.BytesIO(records[4].files["png"])))[0, 0, 0] == 4


def test_positions_resume_reading_and_reread_single_records(tmp_path):
    with ShardWriter(tmp_path, max_samples=100) as w:
        for i in range(5):
            w.write(f"s{i}", {"txt": "x" * (i * 300), "png": _png()})
    path = SH.list_shards(tmp_path)[0]
    recs = list(iter_tar_records(path))
    assert [r.key for r in iter_tar_records(path, recs[2].end)] == ["s3", "s4"]
    again = SH.read_tar_record(path, recs[3].offset)
    assert again.key == "s3" and again.files == recs[3].files


def test_same_samples_same_bytes(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(tmp_path / d) as w:
            w.write("k", {"png": _png(), "txt": "hello"})
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


def test_writer_refuses_to_mix_and_appends_when_asked(tmp_path):
    with ShardWriter(tmp_path, max_samples=2) as w:
        for i in range(3):
            w.write(f"a{i}", {"txt": "t"})
    with pytest.raises(SH.ShardError, match="already holds"):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, max_samples=2, append=True) as w:
        w.write("b0", {"txt": "t"})
    assert [p.name for p in SH.existing_shards(tmp_path)] == ["shard-000000.tar", "shard-000001.tar",
                                                               "shard-000002.tar"]
    assert SH.shard_keys(tmp_path / "shard-000002.tar") == ["b0"]
    with pytest.raises(ValueError, match="no dot"):
        ShardWriter(tmp_path / "x").write("bad.key", {"txt": "t"})


def test_failed_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path) as w:
            w.write("k", {"txt": "t"})
            raise RuntimeError("encoder crashed")
    assert list(tmp_path.iterdir()) == []


def test_token_shards_round_trip(tmp_path):
    grid = np.arange(64, dtype=np.int64).reshape(8, 8) * 100
    with TokenShardWriter(tmp_path) as w:
        w.write_codes("t0", grid, "a red circle")
    (rec,) = list(iter_tar_records(SH.list_shards(tmp_path)[0]))
    assert set(rec.files) == {"codes.npy", "txt"}
    codes = SH.codes_from_bytes(rec.files["codes.npy"])
    assert codes.dtype == np.uint16 and np.array_equal(codes, grid.reshape(-1))
    with pytest.raises(ValueError, match="uint16"):
        SH.codes_to_bytes(np.array([70000]))


def test_truncated_and_corrupt_tar_are_reported_and_earlier_samples_kept(tmp_path):
    with ShardWriter(tmp_path, max_samples=100) as w:
        for i in range(4):
            w.write(f"k{i}", {"png": _png(), "txt": f"c{i}"})
    path = tmp_path / "shard-000000.tar"
    full = path.read_bytes()
    recs = list(iter_tar_records(path))
    # Cut inside the 3rd sample's image: samples 0 and 1 survive, the cut is reported.
    (tmp_path / "cut.tar").write_bytes(full[:recs[2].offset + 700])
    got = list(iter_tar_records(tmp_path / "cut.tar"))
    assert [r.key for r in got if isinstance(r, Record)] == ["k0", "k1"]
    assert isinstance(got[-1], ReadProblem) and got[-1].reason == "truncated_tar" and "k2" in got[-1].detail
    # A flipped byte in a header: checksum error, earlier samples kept.
    bad = bytearray(full)
    bad[recs[3].offset + 10] ^= 0xFF
    (tmp_path / "corrupt.tar").write_bytes(bytes(bad))
    got = list(iter_tar_records(tmp_path / "corrupt.tar"))
    assert [r.key for r in got if isinstance(r, Record)] == ["k0", "k1", "k2"]
    assert got[-1].reason == "corrupt_tar"
    # Cut exactly between two samples (no end-of-archive marker): still reported.
    (tmp_path / "cut_between.tar").write_bytes(full[:recs[2].offset])
    got = list(iter_tar_records(tmp_path / "cut_between.tar"))
    assert [r.key for r in got if isinstance(r, Record)] == ["k0", "k1"] and got[-1].reason == "truncated_tar"
    # Missing file.
    (p,) = list(iter_tar_records(tmp_path / "nope.tar"))
    assert p.reason == "unreadable_shard"


def test_list_shards_forms_and_errors(tmp_path):
    with ShardWriter(tmp_path, max_samples=1) as w:
        for i in range(3):
            w.write(f"k{i}", {"txt": "t"})
    assert len(SH.list_shards(tmp_path)) == 3
    assert len(SH.list_shards(str(tmp_path / "shard-*.tar"))) == 3
    assert len(SH.list_shards(str(tmp_path / "shard-{000000..000001}.tar"))) == 2
    with pytest.raises(SH.ShardError, match="does not exist"):
        SH.list_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SH.ShardError, match="no .tar shards"):
        SH.source_units(tmp_path / "empty")


def test_long_key_names_survive(tmp_path):
    key = "deep/" + "d" * 150 + "/sample_" + "x" * 120
    with ShardWriter(tmp_path) as w:
        w.write(key, {"txt": "long"})
    (rec,) = list(iter_tar_records(tmp_path / "shard-000000.tar"))
    assert rec.key == key and rec.files["txt"] == b"long"
