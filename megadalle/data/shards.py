"""Shards on disk: webdataset-style tar files in the img2dataset layout, and image folders.

A shard is a plain tar whose members are grouped into samples by key: `{key}.png` (or `.jpg`,
`.jpeg`, `.webp`), `{key}.txt` (UTF-8 caption), optionally `{key}.json` (facts / metadata). The
key is the member name up to the first dot of its base name, so token shards use `{key}.codes.npy`
(uint16, the flat row-major grid of dVAE codes) and `{key}.txt`. Shards are named
`shard-000000.tar`, `shard-000001.tar`, ...; this is what img2dataset and webdataset read too.

Reading uses the small tar reader below rather than the webdataset library, because the loader
needs two things webdataset does not expose cleanly: the byte offset of every sample (the
resumable position is "shard i, byte offset o", and a shuffle buffer is saved as a list of such
offsets and re-read on resume), and a per-shard account of what went wrong (a truncated or
corrupt tar ends that shard with a count, instead of an exception inside a pipeline). Writing
uses the standard library's `tarfile`, with fixed metadata so that the same samples give the same
bytes.

Memory: whatever a shard says, reading one sample holds at most MAX_MEMBER_BYTES per member and
never more bytes than the file has left. A member's declared size is checked against the bytes
left in the file before anything is read (a forged size field is a `corrupt_tar`, not a
MemoryError); a member larger than MAX_MEMBER_BYTES is skipped on disk, not read, and its sample is
counted `too_large`. Two samples with the same key in a row are kept apart (the second is counted
`duplicate_key`), never merged. Decoding adds at most `data.max_image_pixels` x 4 bytes per image
for the decoded pixels and their RGB conversion (data/decode.py).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megadalle.config import ConfigError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SHARD_PREFIX = "shard-"
_BLOCK = 512
# Larger than any image or caption a text-image pair needs (a 64-megapixel PNG is ~100 MB at
# worst); larger members are skipped without reading them.
MAX_MEMBER_BYTES = 256 * 2**20
TOO_LARGE = "_too_large"  # Record.files key marking a member skipped for its size


class ShardError(ConfigError):
    """A shard source cannot be read at all (missing directory, no shards); says what to fix.

    A ConfigError, since it means `data.source` (or a command's argument) names the wrong
    thing: commands print it as a message, not a traceback."""


def split_key(name: str) -> tuple[str, str]:
    """`dir/abc.codes.npy` -> (`dir/abc`, `codes.npy`): the key ends at the base name's first dot."""
    base = name.rsplit("/", 1)[-1]
    stem_len = len(name) - len(base)
    if "." not in base:
        return name, ""
    dot = base.index(".")
    return name[:stem_len + dot], base[dot + 1:].lower()


@dataclass
class Record:
    """One sample as raw bytes: `files` maps extension ("png", "txt", "codes.npy") to content."""

    key: str
    files: dict[str, bytes]
    unit: str  # the shard (or folder chunk) it came from, for per-shard accounting
    offset: int  # where it starts in the unit: byte offset (tar) or index (folder)
    end: int = 0  # where the next record starts: reading on from here resumes after this one
    notes: list[str] = field(default_factory=list)  # kept but counted, e.g. "duplicate_key"


@dataclass
class ReadProblem:
    """Something wrong with a shard as a whole (it ends the shard's records at that point)."""

    unit: str
    reason: str  # "truncated_tar", "corrupt_tar", "unreadable_shard"
    detail: str


# --------------------------------------------------------------------------------------------
# Tar reading
# --------------------------------------------------------------------------------------------


class _TarBroken(Exception):
    def __init__(self, reason: str, detail: str, name: str | None = None):
        super().__init__(detail)
        # `name`: the member that was being read when the archive broke (None: between members).
        self.reason, self.detail, self.name = reason, detail, name


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156])
    except ValueError:
        return False
    # The checksum counts its own field as spaces; one pass over the block is the cheaper way.
    computed = sum(block) - sum(block[148:156]) + 8 * 32
    return stored == computed


def _pax_path(data: bytes) -> str | None:
    # Records are "<len> key=value\n".
    for line in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = line.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def iter_tar_members(f, start: int = 0, max_member: int = MAX_MEMBER_BYTES,
                     read_data: bool = True) -> Iterator[tuple[int, str, bytes | None, int]]:
    """Yield (header offset, name, data, next offset) of the regular files in an open tar.

    `data` is None for a member larger than `max_member` (skipped, not read). Raises `_TarBroken`
    where the archive is cut short, a header's checksum is wrong, or a member claims more bytes
    than the file has left. `read_data=False` steps over regular members' bytes (`data` is b""):
    the same members, offsets and errors for the price of the headers (the global order walks
    every shard on every rank this way, global_order.py).
    """
    file_size = os.fstat(f.fileno()).st_size
    pos = start
    f.seek(pos)
    long_name: str | None = None
    member_start = pos
    while True:
        block = f.read(_BLOCK)
        if len(block) == 0:
            # Writers end an archive with zero blocks; a file that stops between members was cut
            # there, and whatever followed is lost: report it.
            raise _TarBroken("truncated_tar", f"archive ends at byte {pos} without its end-of-archive marker; "
                                              f"later samples are missing")
        if len(block) < _BLOCK:
            raise _TarBroken("truncated_tar", f"header cut short at byte {pos}")
        if block == b"\0" * _BLOCK:
            return  # end-of-archive marker
        if not _header_ok(block):
            raise _TarBroken("corrupt_tar", f"bad header checksum at byte {pos}")
        if long_name is None:
            member_start = pos
        try:
            size = _octal(block[124:136])
        except ValueError:
            raise _TarBroken("corrupt_tar", f"unreadable member size at byte {pos}") from None
        kind = block[156:157]
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if block[257:262] == b"ustar" else ""
        if prefix:
            name = f"{prefix}/{name}"
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        left = file_size - (pos + _BLOCK)
        if size > left:
            # A forged size field must not make us allocate it: compare with what the file holds.
            reason = "corrupt_tar" if size > 2 ** 40 else "truncated_tar"
            raise _TarBroken(reason, f"member {name!r} at byte {pos} declares {size} bytes but only {max(left, 0)} "
                                     f"remain in the file", long_name or name)
        if size > max_member and kind not in (b"0", b"\0", b"7"):
            raise _TarBroken("corrupt_tar", f"header member {name!r} at byte {pos} is {size} bytes")
        if size > max_member:
            data = None  # too large to be a sample's member: step over it
            f.seek(padded, os.SEEK_CUR)
        elif not read_data and kind in (b"0", b"\0", b"7"):
            # The only way reading could fail here (size <= left was checked) is the padding.
            if padded > left:
                raise _TarBroken("truncated_tar", f"member {name!r} padding cut short", long_name or name)
            data = b""
            f.seek(padded, os.SEEK_CUR)
        else:
            data = f.read(size)
            if len(data) < size:
                raise _TarBroken("truncated_tar", f"member {name!r} cut short ({len(data)} of {size} bytes)",
                                 long_name or name)
            skip = padded - size
            if skip:
                pad = f.read(skip)
                if len(pad) < skip:
                    raise _TarBroken("truncated_tar", f"member {name!r} padding cut short", long_name or name)
        pos += _BLOCK + padded
        if kind in (b"L",):  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax extended header for the next member
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"g":  # pax global header: nothing we need
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if kind in (b"0", b"\0", b"7"):
            yield member_start, name, data, pos


def iter_tar_records(path: str | Path, start: int = 0, read_data: bool = True) -> Iterator[Record | ReadProblem]:
    """Samples of a tar shard from byte `start`, each a `Record`; a `ReadProblem` ends the shard.

    Members with the same key must be adjacent (as every shard writer makes them). A member
    whose extension the current record already has starts a new record with the same key, noted
    `duplicate_key`. A record whose members were cut off by a truncated archive is reported, not
    returned half-complete. `read_data=False`: the same records with empty contents (positions only).
    """
    unit = str(path)
    try:
        # The default buffer (8 KiB) also when walking: with a one-block buffer the walk of small
        # members took a quarter longer (a system call per header and per seek).
        f = open(path, "rb")
    except OSError as e:
        yield ReadProblem(unit, "unreadable_shard", str(e))
        return
    with f:
        yield from tar_records_of(f, unit, start, read_data)


def tar_records_of(f, unit: str, start: int = 0, read_data: bool = True) -> Iterator[Record | ReadProblem]:
    """iter_tar_records on a shard already open as `f` (for a reader that keeps it open)."""
    current: Record | None = None
    try:
        for offset, name, data, end in iter_tar_members(f, start, read_data=read_data):
            key, ext = split_key(name)
            duplicate = current is not None and key == current.key and ext in current.files
            if current is not None and (key != current.key or duplicate):
                yield current
                current = None
            if current is None:
                current = Record(key, {}, unit, offset, notes=["duplicate_key"] if duplicate else [])
            if data is None:
                current.files[TOO_LARGE] = f"{name} is larger than {MAX_MEMBER_BYTES} bytes".encode()
            else:
                current.files[ext] = data
            current.end = end
    except _TarBroken as e:
        detail = e.detail
        if current is not None:
            if e.name is not None and split_key(e.name)[0] == current.key:
                detail += f"; sample {current.key!r} dropped (incomplete)"
            else:  # the break came after this sample's last member
                yield current
        yield ReadProblem(unit, e.reason, detail)
        return
    except OSError as e:
        yield ReadProblem(unit, "unreadable_shard", str(e))
        return
    if current is not None:
        yield current


def read_tar_record(path: str | Path, offset: int) -> Record | ReadProblem | None:
    """The one record starting at byte `offset` (used to rebuild a saved shuffle buffer)."""
    for item in iter_tar_records(path, offset):
        return item
    return None


def list_shards(source: str | Path) -> list[str]:
    """Tar shards of a source: a directory (its `*.tar`), a glob, a brace list, or one file."""
    s = str(source)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
    if m:  # webdataset brace notation: shard-{000000..000009}.tar
        width = len(m.group(1))
        paths = [s[:m.start()] + str(i).zfill(width) + s[m.end():] for i in range(int(m.group(1)), int(m.group(2)) + 1)]
        return paths
    p = Path(s)
    if p.is_dir():
        return sorted(str(q) for q in p.glob("*.tar"))
    if any(c in s for c in "*?["):
        return sorted(glob.glob(s))
    if p.is_file():
        return [str(p)]
    raise ShardError(f"data source {s!r} does not exist; give a directory of .tar shards, a glob such as "
                     f"'dir/shard-*.tar', an image folder, or 'shapes'")


# --------------------------------------------------------------------------------------------
# Image folders: {name}.jpg beside {name}.txt
# --------------------------------------------------------------------------------------------

FOLDER_CHUNK = 1000  # samples per virtual shard of an image folder


def is_image_folder(source: str | Path) -> bool:
    p = Path(source)
    if not p.is_dir():
        return False
    if any(p.glob("*.tar")):
        return False
    return any(q.suffix.lower().lstrip(".") in IMAGE_EXTS for q in p.rglob("*") if q.is_file())


def folder_keys(root: str | Path) -> list[str]:
    """Sorted sample keys (paths relative to `root`, without extension) of an image folder.

    Every key that has an image or a caption counts, so that a caption without its image is
    reported as a bad sample rather than silently ignored.
    """
    root = Path(root)
    keys = set()
    for q in root.rglob("*"):
        if q.is_file():
            key, ext = split_key(q.relative_to(root).as_posix())
            if ext in IMAGE_EXTS or ext == "txt":
                keys.add(key)
    return sorted(keys)


def folder_units(root: str | Path, chunk: int = FOLDER_CHUNK) -> list[str]:
    """Virtual shards of an image folder: `root::start:end` ranges over its sorted keys."""
    keys = folder_keys(root)
    _FolderIndex.cache[str(root)] = keys  # a fresh listing for the loader being built
    n = len(keys)
    return [f"{root}::{i}:{min(n, i + chunk)}" for i in range(0, n, chunk)]


def _parse_folder_unit(unit: str) -> tuple[Path, int, int]:
    root, _, rng = unit.rpartition("::")
    a, b = rng.split(":")
    return Path(root), int(a), int(b)


class _FolderIndex:
    """Caches the key listing of folders so that each unit does not rescan the tree."""

    cache: dict[str, list[str]] = {}

    @classmethod
    def keys(cls, root: Path) -> list[str]:
        k = str(root)
        if k not in cls.cache:
            cls.cache[k] = folder_keys(root)
        return cls.cache[k]


def _read_folder_sample(root: Path, key: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    parent = (root / key).parent
    stem = Path(key).name
    for q in parent.glob(glob.escape(stem) + ".*"):
        k, ext = split_key(q.name)
        if k == stem and (ext in IMAGE_EXTS or ext in ("txt", "json")):
            files[ext] = q.read_bytes()
    return files


def iter_folder_records(unit: str, start: int | None = None, read_data: bool = True) -> Iterator[Record | ReadProblem]:
    root, a, b = _parse_folder_unit(unit)
    keys = _FolderIndex.keys(root)
    for i in range(a if start is None else start, b):
        if not read_data:
            yield Record(keys[i], {}, unit, i, i + 1)
            continue
        try:
            files = _read_folder_sample(root, keys[i])
        except OSError as e:
            yield Record(keys[i], {"_error": str(e).encode()}, unit, i, i + 1)
            continue
        yield Record(keys[i], files, unit, i, i + 1)


def is_folder_unit(unit: str) -> bool:
    return "::" in unit


def iter_unit_records(unit: str, start: int | None = None, read_data: bool = True) -> Iterator[Record | ReadProblem]:
    """Records of a tar shard or a folder chunk, from a saved position (None: the beginning).

    `read_data=False`: the same records and problems without their contents (positions only)."""
    if is_folder_unit(unit):
        yield from iter_folder_records(unit, start, read_data)
    else:
        yield from iter_tar_records(unit, 0 if start is None else start, read_data)


def read_unit_record(unit: str, offset: int) -> Record | ReadProblem | None:
    """The one record of a unit starting at `offset` (a position the walk or a saved state gave)."""
    for item in iter_unit_records(unit, offset):
        return item
    return None


def source_units(source: str | Path) -> list[str]:
    """Units (tar shards, or chunks of an image folder) of a data source."""
    if is_image_folder(source):
        units = folder_units(source)
    else:
        units = list_shards(source)
    if not units:
        raise ShardError(f"data source {str(source)!r} holds no .tar shards and no images; "
                         f"write shards with `megadalle data shapes --out DIR` or point at an image folder")
    return units


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def shard_name(index: int, prefix: str = SHARD_PREFIX) -> str:
    return f"{prefix}{index:06d}.tar"


def existing_shards(out_dir: str | Path, prefix: str = SHARD_PREFIX) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"(\d{6})\.tar$")
    return sorted(p for p in Path(out_dir).glob(f"{prefix}*.tar") if pattern.match(p.name))


def shard_keys(path: str | Path) -> list[str]:
    """Keys of the complete samples in a shard (e.g. to skip them when resuming an encode)."""
    return [r.key for r in iter_tar_records(path) if isinstance(r, Record)]


def written_keys(out_dir: str | Path, prefix: str = SHARD_PREFIX) -> set[str]:
    """Keys already in the complete shards of `out_dir` (`.tar.tmp` leftovers do not count)."""
    return {k for p in existing_shards(out_dir, prefix) for k in shard_keys(p)}


@dataclass
class ShardWriter:
    """Writes samples into `out_dir/shard-NNNNNN.tar`, at most `max_samples` per shard.

    Each shard is written as `.tar.tmp` and renamed when full or on `close()`, so a shard name
    on disk always means a complete shard. With `append=True` numbering continues after the
    shards already there (to resume an interrupted `megadalle encode`; `shard_keys` tells which
    samples they hold). Several writers may share a directory with distinct `prefix`es (e.g. one
    per rank: `shard-r00-`).
    """

    out_dir: str | Path
    max_samples: int = 1000
    prefix: str = SHARD_PREFIX
    append: bool = False
    written: list[Path] = field(default_factory=list)
    n_samples: int = 0

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = existing_shards(self.out_dir, self.prefix)
        if existing and not self.append:
            raise ShardError(f"{self.out_dir} already holds {len(existing)} shard(s) named {self.prefix}*.tar; "
                             f"choose an empty directory or append")
        self._index = int(existing[-1].name[len(self.prefix):len(self.prefix) + 6]) + 1 if existing else 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def _open(self) -> None:
        final = self.out_dir / shard_name(self._index, self.prefix)
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._in_shard = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / shard_name(self._index, self.prefix)
        os.replace(self._tmp, final)
        self.written.append(final)
        self._tar, self._tmp = None, None
        self._index += 1

    def write(self, key: str, files: dict[str, bytes | str]) -> None:
        """Add one sample; `files` maps extension ("png", "txt", "json", "codes.npy") to content."""
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dot in its base name")
        if self._tar is None:
            self._open()
        for ext, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # fixed metadata: same samples, same bytes
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.n_samples += 1
        if self._in_shard >= self.max_samples:
            self._finish()

    def close(self) -> list[Path]:
        self._finish()
        return self.written

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # failed mid-shard: leave no half shard under a final name
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def codes_to_bytes(codes: np.ndarray) -> bytes:
    """A code grid as `.codes.npy` bytes: uint16, flattened row-major."""
    a = np.asarray(codes)
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"codes must lie in [0, 65535] to be stored as uint16, got [{a.min()}, {a.max()}]")
    buf = io.BytesIO()
    np.save(buf, a.astype(np.uint16).reshape(-1), allow_pickle=False)
    return buf.getvalue()


def codes_from_bytes(data: bytes) -> np.ndarray:
    a = np.load(io.BytesIO(data), allow_pickle=False)
    if a.dtype != np.uint16 or a.ndim != 1:
        raise ValueError(f"codes must be a flat uint16 array, got {a.dtype} of shape {a.shape}")
    return a


class TokenShardWriter(ShardWriter):
    """Token shards for stage 2: `{key}.codes.npy` (uint16 flat grid) and `{key}.txt`."""

    def write_codes(self, key: str, codes: np.ndarray, caption: str) -> None:
        self.write(key, {"codes.npy": codes_to_bytes(codes), "txt": caption})


def write_manifest(out_dir: str | Path, info: dict) -> Path:
    path = Path(out_dir) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
