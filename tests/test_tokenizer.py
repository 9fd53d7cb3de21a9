"""Caption BPE: fixed-length encoding with 0 = padding, lowercase, dropout only in training, reload."""

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


def test_dropout_only_in_training(tok, corpus):
    caption = corpus[0]
    eval_runs = {tuple(tok.encode(caption, train=False)[0].tolist()) for _ in range(30)}
    assert len(eval_runs) == 1
    train_runs = {tuple(tok.encode(caption, train=True)[0].tolist()) for _ in range(60)}
    assert len(train_runs) > 1
    # Dropout splits merges but never changes the text.
    for run in train_runs:
        assert tok.decode(torch.tensor(run)) == caption.lower()
    zero = TextTokenizer(tok._tok, text_len=24, bpe_dropout=0.0)
    assert len({tuple(zero.encode(caption, train=True)[0].tolist()) for _ in range(30)}) == 1


def test_save_and_reload_bit_identical(tok, corpus, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(path, text_len=24, bpe_dropout=0.1)
    assert torch.equal(again.encode(corpus), tok.encode(corpus))
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    # Training-time encodings of the reloaded tokenizer still vary (dropout comes from the config).
    assert len({tuple(again.encode(corpus[0], train=True)[0].tolist()) for _ in range(60)}) > 1


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
