import textwrap

import pytest

from megadalle.cli import _split_overrides, main
from megadalle.config import Config, ConfigError, PRESETS, load_config
from megadalle.transformer.masks import dalle_attention_schedule


def test_defaults_are_paper_hyperparameters():
    c = Config()
    assert (c.train.optimizer.beta1, c.train.optimizer.beta2) == (0.9, 0.96)
    assert c.train.optimizer.weight_decay == 4.5e-2 and c.train.optimizer.grad_clip == 4.0
    assert c.dvae_train.optimizer.beta2 == 0.999 and c.dvae_train.ema_decay == 0.999
    assert c.transformer.text_len == 256 and c.transformer.image_grid == 32
    assert c.dvae.vocab_size == 8192 and c.tokenizer.vocab_size == 16384


def test_precedence_cli_over_file_over_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent("""
        preset: tiny
        transformer: {depth: 6}
        train: {steps: 7, optimizer: {lr: 0.002}}
    """))
    c = load_config(file=f, overrides=["--transformer.depth=3", "train.optimizer.lr=0.003"])
    assert c.preset == "tiny"
    assert c.transformer.dim == PRESETS["tiny"]["transformer"]["dim"]  # from preset
    assert c.train.steps == 7  # from file
    assert c.transformer.depth == 3 and c.train.optimizer.lr == 0.003  # CLI wins
    # An explicit preset beats the one named in the file.
    assert load_config(preset="small", file=f).preset == "small"


def test_roundtrip_through_yaml(tmp_path):
    c = load_config("tiny", overrides={"transformer.depth": 5})
    p = c.save(tmp_path / "run" / "config.yaml")
    assert Config.load(p) == c


@pytest.mark.parametrize("override, fragment", [
    ("transformer.dim=100", "must equal heads*head_dim"),
    ("transformer.backend=cuda", "choose dense, flex or blocksparse"),
    ("transformer.depht=3", "unknown config key 'transformer.depht'"),
    ("transformer.depth=2.5", "must be an integer"),
    ("precision.mode=fp8", "choose fp32, bf16, fp16 or fp16_per_resblock"),
    ("distributed.zero_stage=4", "choose 0, 1, 2 or 3"),
    ("transformer.image_grid=16", "make them agree"),
    ("dvae.image_size=100", "divisible by 2^(group_count-1)"),
    ("train.optimizer.lr=-1", "optimizer.lr must be > 0"),
    ("checkpoint.resume", "must look like --section.key=value"),
    ("transformer.attention_schedule=row,diag", "unknown types"),
    ("logging=3", "is a section"),
])
def test_validation_messages(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(overrides=[override])
    assert fragment in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("transformer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(file=lst)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError):
        load_config(file=binary)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="13b")


def test_global_batch_arithmetic():
    c = load_config(overrides=["train.micro_batch_size=4", "train.grad_accum_steps=2"])
    assert c.train.global_batch(world_size=3) == 24
    c = c.replace(**{"train.global_batch_size": 25})
    with pytest.raises(ConfigError, match="4 x 2 x 3 = 24"):
        c.train.global_batch(world_size=3)


def test_dalle_schedule_matches_paper_rule():
    types = dalle_attention_schedule(64)
    assert types[-1] == "conv"
    for i, t in enumerate(types[:-1], start=1):
        assert t == ("column" if (i - 2) % 4 == 0 else "row")


def test_cli_overrides_split_and_errors(capsys):
    ov, unk = _split_overrides(["--a.b=1", "--c.d", "2", "--flag", "--e.f"])
    assert ov == ["--a.b=1", "--c.d=2"] and unk == ["--flag", "--e.f"]
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0
