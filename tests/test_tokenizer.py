"""Caption BPE: fixed-length encoding with 0 = padding, lowercase, seeded dropout only in training, reload."""

import pytest
import torch

from megadalle.config import load_config
from megadalle.data.shapes import ShapesDataset
from megadalle.data.tokenizer import PAD, TextTokenizer, TokenizerFileError


@pytest.fixture(scope="module")
def corpus():
    ds = ShapesDataset("train", seed=0)
    return [ds.sample(i).caption for i in range(600)] + ["Ünïcödé captions — and emoji 🎨 survive", "x " * 80]


@pytest.fixture(scope="module")
def tok(corpus):
    return TextTokenizer.train(corpus, vocab_size=400, text_len=24, bpe_dropout=0.1, min_frequency=1)


def test_fixed_length_padding_and_round_trip(tok, corpus):
    ids = tok.encode(corpus[:5])
    assert ids.shape == (5, 24) and ids.dtype == torch.long
    assert tok._tok.token_to_id(PAD) == 0
    for row, caption in zip(ids, corpus[:5]):
        n = int((row != 0).sum())
        assert (row[:n] != 0).all() and (row[n:] == 0).all()  # real tokens, then padding only
        assert tok.decode(row) == caption.lower()
    assert 260 <= tok.vocab_size <= 400
    assert tok.decode(tok.encode(corpus[-2])[0]) == corpus[-2].lower()  # byte-level: anything encodes


def test_lowercase_normalisation(tok):
    assert torch.equal(tok.encode("A RED Circle In The Top Left"), tok.encode("a red circle in the top left"))


def test_truncation_is_counted(corpus):
    t = TextTokenizer.train(corpus, vocab_size=300, text_len=6, bpe_dropout=0.0, min_frequency=1)
    before = t.truncated
    ids = t.encode(["a", "a small red circle in the top left of the picture", corpus[-1]])
    assert ids.shape == (3, 6)
    assert t.truncated - before == 2 and t.stats()["encoded"] == 3
    assert (ids[1] != 0).all()


def test_dropout_only_with_seeds_and_repeatable(tok, corpus):
    caption = corpus[0]
    assert len({tuple(tok.encode(caption)[0].tolist()) for _ in range(30)}) == 1
    seeded = {tuple(tok.encode(caption, dropout_seeds=[s])[0].tolist()) for s in range(60)}
    assert len(seeded) > 1
    # The same seed gives the same segmentation, whatever else is in the batch.
    batch = tok.encode(corpus[:8], dropout_seeds=list(range(8)))
    assert torch.equal(batch, tok.encode(corpus[:8], dropout_seeds=list(range(8))))
    assert torch.equal(batch[3], tok.encode(corpus[3], dropout_seeds=[3])[0])
    # Dropout splits merges but never changes the text.
    for run in seeded:
        assert tok.decode(torch.tensor(run)) == caption.lower()
    zero = TextTokenizer(tok._tok, text_len=24, bpe_dropout=0.0)
    assert len({tuple(zero.encode(caption, dropout_seeds=[s])[0].tolist()) for s in range(30)}) == 1
    with pytest.raises(ValueError, match="2 dropout seeds for 3 captions"):
        tok.encode(corpus[:3], dropout_seeds=[1, 2])


def test_seeded_bpe_at_p0_is_the_librarys_bpe(tok, corpus):
    """Our merge loop must segment exactly as the library does when nothing is dropped, including
    the raw-text special token, normalisation and byte-level pre-tokenisation."""
    import json
    import random

    from megadalle.data.tokenizer import SeededBPEDropout

    ours = SeededBPEDropout(tok._tok, json.loads(tok._tok.to_str()))
    odd = ["a <pad> b<PAD>c <pad><pad>", "  lots   of\tspace\n\n", "ﬁ ligature ① x²", "", "aaaa bbbb"]
    for caption in corpus + odd:
        assert ours.ids(caption, 0.0, random.Random(0)) == tok._tok.encode(caption).ids, caption


def test_dropout_rate_follows_p(tok, corpus):
    """BPE dropout as Provilkov et al.: more pieces as p grows; at p close to 1 single bytes."""
    import json
    import random

    from megadalle.data.tokenizer import SeededBPEDropout

    ours = SeededBPEDropout(tok._tok, json.loads(tok._tok.to_str()))
    caption = corpus[0].lower()
    mean = {p: sum(len(ours.ids(caption, p, random.Random(s))) for s in range(200)) / 200 for p in (0.0, 0.1, 0.5)}
    assert mean[0.0] < mean[0.1] < mean[0.5]
    assert len(ours.ids(caption, 0.999999, random.Random(1))) == len(caption.encode())


def test_save_and_reload_bit_identical(tok, corpus, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(path, text_len=24, bpe_dropout=0.1)
    assert torch.equal(again.encode(corpus), tok.encode(corpus))
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    # Training-time encodings of the reloaded tokenizer still vary (dropout comes from the config).
    assert len({tuple(again.encode(corpus[0], dropout_seeds=[s])[0].tolist()) for s in range(60)}) > 1


def test_load_for_checks_the_config(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    cfg = load_config("tiny").tokenizer
    t = TextTokenizer.load_for(cfg, path)
    assert t.text_len == cfg.text_len and t.bpe_dropout == cfg.bpe_dropout
    small = load_config("tiny", overrides={"tokenizer.vocab_size": 300, "transformer.text_vocab_size": 300}).tokenizer
    with pytest.raises(TokenizerFileError, match="tokenizer.vocab_size=300"):
        TextTokenizer.load_for(small, path)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerFileError, match="does not exist.*tokenizer train"):
        TextTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="cannot be read"):
        TextTokenizer.load(tmp_path / "junk.json")
    from tokenizers import Tokenizer, models

    foreign = Tokenizer(models.BPE(vocab={"a": 0, "<pad>": 1}, merges=[]))
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(TokenizerFileError, match="id 0"):
        TextTokenizer.load(tmp_path / "foreign.json")


def test_dropout_refuses_a_bpe_it_cannot_follow(tmp_path):
    from tokenizers import Tokenizer, models

    wordpiece_like = Tokenizer(models.BPE(vocab={"<pad>": 0, "a": 1, "##b": 2}, merges=[],
                                          continuing_subword_prefix="##"))
    wordpiece_like.save(str(tmp_path / "prefix.json"))
    assert TextTokenizer.load(tmp_path / "prefix.json", bpe_dropout=0.0).vocab_size == 3  # no dropout: fine
    with pytest.raises(TokenizerFileError, match="bpe_dropout=0"):
        TextTokenizer.load(tmp_path / "prefix.json", bpe_dropout=0.1)


def test_large_batches_encode_like_small_ones(tok, corpus):
    """Above PARALLEL_MIN captions the library's parallel batch encoder is used, below it one
    caption at a time: both must give the same ids."""
    from megadalle.data.tokenizer import PARALLEL_MIN

    many = (corpus * (PARALLEL_MIN // len(corpus) + 2))[:PARALLEL_MIN + 5]
    big = tok.encode(many)
    small = torch.cat([tok.encode(many[i:i + 100]) for i in range(0, len(many), 100)])
    assert torch.equal(big, small)
