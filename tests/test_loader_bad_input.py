"""Bad input, built as real files: each case is skipped or converted, counted per shard, and no
good sample is lost; the same for image folders."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from megadalle.data.loader import image_loader
from megadalle.data.shards import ShardWriter

SIZE = 32


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _good(i: int) -> bytes:
    return _encode(Image.new("RGB", (40, 40), (i * 20 % 256, 100, 50)))


def _bad_cases() -> dict[str, tuple[dict[str, bytes], str, str]]:
    """key -> (files, "skipped"/"converted", reason)."""
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red: must become white
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))  # left half opaque blue
    pal = Image.new("RGB", (40, 40), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    sixteen_a = np.full((40, 40), 65535, np.uint16)  # mode I;16: right half full white
    sixteen_a[:, :20] = 32768  # left half mid grey
    sixteen = Image.fromarray(sixteen_a)
    jpeg = _encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
    cap = b"a caption"
    return {
        "undecodable": ({"jpg": b"this is not a jpeg at all" * 10, "txt": cap}, "skipped", "undecodable_image"),
        "truncated_png": ({"png": _good(1)[:60], "txt": cap}, "skipped", "undecodable_image"),
        "truncated_jpg": ({"jpg": jpeg[:len(jpeg) // 2], "txt": cap}, "skipped", "undecodable_image"),
        "zero_bytes": ({"png": b"", "txt": cap}, "skipped", "empty_image"),
        "no_caption": ({"png": _good(2)}, "skipped", "missing_caption"),
        "empty_caption": ({"png": _good(3), "txt": b"  \n"}, "skipped", "empty_caption"),
        "no_image": ({"txt": cap}, "skipped", "missing_image"),
        "tiny": ({"png": _encode(Image.new("RGB", (8, 8))), "txt": cap}, "skipped", "too_small"),
        "wide": ({"png": _encode(Image.new("RGB", (400, 40))), "txt": cap}, "skipped", "extreme_aspect"),
        "latin1": ({"png": _good(4), "txt": "un caf\u00e9 cr\u00e8me".encode("latin-1")}, "converted",
                   "caption_not_utf8"),
        "gray": ({"png": _encode(Image.new("L", (40, 40), 77)), "txt": cap}, "converted", "mode_L"),
        "gray_alpha": ({"png": _encode(Image.new("LA", (40, 40), (77, 255))), "txt": cap}, "converted", "mode_LA"),
        "rgba": ({"png": _encode(rgba), "txt": cap}, "converted", "mode_RGBA"),
        "cmyk": ({"jpg": _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"), "txt": cap}, "converted",
                 "mode_CMYK"),
        "sixteen_bit": ({"png": _encode(sixteen), "txt": cap}, "converted", "mode_I16"),
        "palette": ({"png": _encode(pal), "txt": cap}, "converted", "mode_P"),
        "palette_transparent": ({"png": _encode(pal_t), "txt": cap}, "converted", "mode_P"),
    }


def _expected_counts(cases):
    skipped, converted = {}, {}
    for files, kind, reason in cases.values():
        target = skipped if kind == "skipped" else converted
        target[reason] = target.get(reason, 0) + 1
    return skipped, converted


def _read_all(source, **kw):
    loader = image_loader(source, 4, image_size=SIZE, rank=0, world_size=1, endless=False, shuffle_buffer=0, **kw)
    out = {}
    for b in loader:
        for k, img, cap in zip(b["key"], b["image"], b["caption"]):
            assert k not in out
            out[k] = (img, cap)
    return out, loader.stats()


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_case_in_a_shard_is_skipped_or_converted_and_counted(tmp_path, caplog, workers):
    cases = _bad_cases()
    with ShardWriter(tmp_path / "bad", max_samples=1000) as w:
        w.write("good_first", {"png": _good(5), "txt": "first"})
        for key, (files, _, _) in cases.items():
            w.write(key, files)
        w.write("good_last", {"png": _good(6), "txt": "last"})
    with ShardWriter(tmp_path / "bad", append=True) as w:  # a second, clean shard
        for i in range(5):
            w.write(f"clean{i}", {"png": _good(i), "txt": f"clean {i}"})
    with caplog.at_level(logging.WARNING, logger="megadalle.data"):
        got, stats = _read_all(tmp_path / "bad", num_workers=workers)
    skipped, converted = _expected_counts(cases)
    bad_shard = stats[str(tmp_path / "bad" / "shard-000000.tar")]
    assert bad_shard["skipped"] == skipped
    assert bad_shard["converted"] == converted
    clean = stats[str(tmp_path / "bad" / "shard-000001.tar")]
    assert clean == {"samples": 5, "skipped": {}, "converted": {}, "problems": {}}
    # Nothing else lost: every good and every converted sample arrives.
    kept = {k for k, (_, kind, _) in cases.items() if kind == "converted"}
    assert set(got) == kept | {"good_first", "good_last"} | {f"clean{i}" for i in range(5)}
    assert bad_shard["samples"] == len(kept) + 2
    # Never silent: each reason was logged with its shard and key (by this process when it
    # decodes; DataLoader workers log to their own stderr).
    for key, (_, _, reason) in cases.items():
        assert workers or any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records), key
    # Conversions are right, not merely RGB.
    rgba = got["rgba"][0]  # (3, H, W)
    assert rgba[:, SIZE // 2, -1].tolist() == [1.0, 1.0, 1.0]  # transparent -> white, not black
    assert rgba[2, SIZE // 2, 0] == 1.0 and rgba[0, SIZE // 2, 0] == 0.0  # opaque blue kept
    sixteen = got["sixteen_bit"][0]
    assert sixteen[0, SIZE // 2, -1] == 1.0 and abs(float(sixteen[0, SIZE // 2, 0]) - 128 / 255) < 0.01
    assert abs(float(got["gray"][0][1, 5, 5]) - 77 / 255) < 1e-6
    assert got["latin1"][1] == "un caf\u00e9 cr\u00e8me"
    cmyk = got["cmyk"][0][:, 5, 5]
    assert cmyk[0] > 0.8 and cmyk[1] < 0.2 and cmyk[2] < 0.2  # C=0 M=Y=255 is red


def test_truncated_tar_keeps_earlier_samples_and_other_shards(tmp_path):
    with ShardWriter(tmp_path, max_samples=6) as w:
        for i in range(12):
            w.write(f"k{i:02d}", {"png": _good(i), "txt": f"c{i}"})
    first = tmp_path / "shard-000000.tar"
    data = first.read_bytes()
    first.write_bytes(data[:len(data) // 2])  # cut in the middle
    got, stats = _read_all(tmp_path)
    s0 = stats[str(first)]
    assert s0["problems"] == {"truncated_tar": 1}
    assert 1 <= s0["samples"] < 6
    assert {f"k{i:02d}" for i in range(6, 12)} <= set(got)  # the other shard is untouched
    assert set(got) == {f"k{i:02d}" for i in range(s0["samples"])} | {f"k{i:02d}" for i in range(6, 12)}
    # A zero-byte shard and an unreadable one are reported, not fatal.
    (tmp_path / "shard-000002.tar").write_bytes(b"")
    (tmp_path / "shard-000003.tar").write_bytes(b"\x01" * 700)
    got2, stats2 = _read_all(tmp_path)
    assert set(got2) == set(got)
    assert stats2[str(tmp_path / "shard-000002.tar")]["problems"] == {"truncated_tar": 1}
    assert stats2[str(tmp_path / "shard-000003.tar")]["problems"] == {"corrupt_tar": 1}


def test_endless_loader_stops_with_a_message_when_nothing_is_usable(tmp_path):
    from megadalle.data.shards import ShardError

    with ShardWriter(tmp_path) as w:
        w.write("a", {"png": b"", "txt": "x"})
    loader = image_loader(tmp_path, 2, image_size=SIZE, rank=0, world_size=1, endless=True)
    with pytest.raises(ShardError, match="(?s)no usable sample.*empty_image"):
        next(iter(loader))


def test_image_folder_with_side_by_side_captions(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / f"img{i}.png").write_bytes(_good(i))
        (root / f"img{i}.txt").write_text(f"caption {i}")
    (root / "sub" / "deep.jpg").write_bytes(_encode(Image.new("RGB", (50, 40), (1, 2, 3)), "JPEG"))
    (root / "sub" / "deep.txt").write_text("deep caption")
    cases = _bad_cases()
    for key, (files, _, _) in cases.items():
        for ext, content in files.items():
            (root / f"{key}.{ext}").write_bytes(content)
    (root / "notes.md").write_text("ignored: not an image or caption")
    got, stats = _read_all(root)
    kept = {k for k, (_, kind, _) in cases.items() if kind == "converted"}
    assert set(got) == {f"img{i}" for i in range(5)} | {"sub/deep"} | kept
    assert got["sub/deep"][1] == "deep caption" and got["img3"][1] == "caption 3"
    (unit_stats,) = stats.values()
    skipped, converted = _expected_counts(cases)
    assert unit_stats["skipped"] == skipped and unit_stats["converted"] == converted


def test_image_folder_resumes_exactly(tmp_path):
    import itertools

    for i in range(23):
        (tmp_path / f"{i:03d}.png").write_bytes(_good(i))
        (tmp_path / f"{i:03d}.txt").write_text(str(i))

    def make():
        return image_loader(tmp_path, 3, image_size=SIZE, rank=0, world_size=1, shuffle_buffer=7)

    ref = [k for b in itertools.islice(iter(make()), 20) for k in b["key"]]
    a = make()
    head = [k for b in itertools.islice(iter(a), 8) for k in b["key"]]
    b = make()
    b.load_state_dict(a.state_dict())
    assert head + [k for bb in itertools.islice(iter(b), 12) for k in bb["key"]] == ref


def test_resume_where_only_bad_samples_remain_in_the_epoch(tmp_path):
    import itertools

    with ShardWriter(tmp_path) as w:
        for i in range(4):
            w.write(f"good{i}", {"png": _good(i), "txt": "ok"})
        for i in range(3):
            w.write(f"bad{i}", {"png": b"", "txt": "zero bytes"})

    def make():
        return image_loader(tmp_path, 2, image_size=SIZE, rank=0, world_size=1, shuffle_buffer=0)

    ref = [k for b in itertools.islice(iter(make()), 6) for k in b["key"]]
    a = make()
    head = [k for b in itertools.islice(iter(a), 2) for k in b["key"]]
    b = make()
    b.load_state_dict(a.state_dict())
    assert head + [k for bb in itertools.islice(iter(b), 4) for k in bb["key"]] == ref
    assert b.stats()[str(tmp_path / "shard-000000.tar")]["skipped"]["empty_image"] >= 3
