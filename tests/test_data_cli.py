"""`megadalle data` and `megadalle tokenizer`: real commands writing real files."""

import subprocess
import sys
import tarfile

import pytest

from megadalle.cli import main
from megadalle.data.shards import Record, iter_tar_records
from megadalle.data.tokenizer import TextTokenizer


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "megadalle", "--help"], capture_output=True, text=True, check=True)
    assert "data" in out.stdout and "tokenizer" in out.stdout


def test_data_shapes_one_split(tmp_path, capsys):
    out = tmp_path / "held"
    assert main(["data", "shapes", "--out", str(out), "--n", "12", "--split", "heldout", "--preset", "tiny",
                 "--data.shapes.samples_per_shard=5"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 12 heldout images (48x48 px" in printed and "3 shard(s)" in printed
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(out / "shard-000000.tar") as tf:
        assert tf.getnames()[:3] == ["heldout-00000000.png", "heldout-00000000.txt", "heldout-00000000.json"]
    # A second run into the same folder is refused rather than mixing sets.
    assert main(["data", "shapes", "--out", str(out), "--n", "3"]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_data_shapes_whole_run_then_tokenizer(tmp_path, capsys):
    run = ["--preset", "tiny", f"--logging.run_dir={tmp_path}", "--data.shapes.n_train=40",
           "--data.shapes.n_val=6", "--data.shapes.n_heldout=6"]
    assert main(["data", "shapes", *run]) == 0
    printed = capsys.readouterr().out
    for split in ("train", "val", "heldout"):
        assert (tmp_path / "data" / "shapes" / split / "shard-000000.tar").is_file()
        assert split in printed
    assert main(["tokenizer", "train", *run]) == 0
    printed = capsys.readouterr().out
    assert "trained byte-level BPE on 40 captions" in printed and "0 caption(s) truncated" in printed
    tok = TextTokenizer.load(tmp_path / "tokenizer.json", text_len=32)
    # Trained from the shards instead: the same captions, so the same tokenizer file.
    assert main(["tokenizer", "train", "--source", str(tmp_path / "data" / "shapes" / "train"),
                 "--out", str(tmp_path / "from_shards.json"), *run]) == 0
    assert (tmp_path / "from_shards.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert main(["tokenizer", "encode", "a red circle", *run]) == 0
    printed = capsys.readouterr().out
    ids = tok.encode("a red circle")[0]
    assert str([int(i) for i in ids if i]) in printed


def test_data_check_reports_per_shard(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "shapes", "--out", str(out), "--n", "4", "--preset", "tiny"]) == 0
    # Append a sample without caption through a second shard.
    from megadalle.data.shards import ShardWriter

    with ShardWriter(out, append=True) as w:
        first = next(r for r in iter_tar_records(out / "shard-000000.tar") if isinstance(r, Record))
        w.write("nocap", {"png": first.files["png"]})
    capsys.readouterr()
    assert main(["data", "check", str(out), "--preset", "tiny", "--json", str(tmp_path / "stats.json")]) == 0
    printed = capsys.readouterr().out
    assert "shard-000001.tar: 0 samples; skipped 1 (missing_caption 1)" in printed
    assert "4 usable samples" in printed and (tmp_path / "stats.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["data", "check", "/nonexistent/dir"], "does not exist"),
    (["data", "shapes", "--n", "5"], "--n and --start need --out"),
    (["tokenizer", "encode", "--path", "/nonexistent/tok.json", "hi"], "tokenizer train"),
    (["tokenizer", "train", "--source", "/nonexistent/dir"], "does not exist"),
])
def test_user_errors_are_messages_not_tracebacks(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
