"""The figures README.md quotes agree with the benchmark JSON they name.

Every row of the "## Performance" table names, in its last column, the JSON file in
benchmarks/results/ its figure comes from (`benchmarks/X.py` -> `results/X_config.json`); the one
row that is not a benchmark (the full demo) says where it comes from instead, and must agree with
the demo section. CHECKS below says, for each row, which JSON fields give the quoted figures and how
the README rounds them; the test fails when a named JSON is missing, when a quoted figure is not
the JSON's value rounded that way, or when a row has no check. The Stage-2 training tables and the
activation-checkpointing and fp16 sentences under them are tied to train_fp32.json and
train_bf16.json the same way.

No benchmark runs here: this only reads README.md and the committed JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The text under `heading` (a '## ' line) up to the next '## ' heading."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def table_after(text: str, first_cell: str) -> list[list[str]]:
    """Rows (cells stripped) of the markdown table whose header row starts with `| first_cell |`,
    header and separator left out."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def flat(text: str) -> str:
    """Text with line breaks and runs of spaces as single spaces (the README wraps its lines)."""
    return " ".join(text.split())


def quotes(text: str, figure: str) -> bool:
    """`figure` appears in `text`, not as the tail of a longer number (0.50x is not in 10.50x)."""
    return re.search(r"(?<![\d.])" + re.escape(figure), text) is not None


def load(name: str) -> dict:
    path = RESULTS / name
    assert path.is_file(), f"README quotes {name} but benchmarks/results/{name} does not exist"
    return json.loads(path.read_text())


def named_json(cell: str) -> list[str]:
    return re.findall(r"results/([\w.+-]+\.json)", cell)


# --- the Performance table -------------------------------------------------------------------

def rng(values: list[float], digits: int) -> str:
    """A range the way the README writes one: '0.7–0.9', or one figure when both ends round alike."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _kv(d: dict) -> list[str]:
    return [f"{d['speedup_wall']:.0f}x faster (wall)", f"{d['speedup_cpu']:.0f}x (CPU time)"]


def _attention(d: dict) -> list[str]:
    masks = d["geometries"]["paper"]["masks"].values()
    out = []
    for backend, label in (("dense", "dense SDPA"), ("blocksparse", "block-sparse C++ op")):
        out.append(f"{label} {rng([m['cpu_times_s'][backend]['forward_backward'] * 1e3 for m in masks], 0)} ms")
    return out


def _blocksparse(d: dict) -> list[str]:
    masks = d["shapes"]["paper"]["masks"].values()
    fwd_bwd, fwd = [m["forward_backward_ratios"] for m in masks], [m["forward_ratios"] for m in masks]
    ref = rng([r["x_vs_ref"] for r in fwd_bwd], 1)
    slower = max(r["x_vs_ref"] for r in fwd_bwd) < 1
    return [f"fwd+bwd {ref}x" + (", i.e. slower" if slower else " faster"),
            f"forward alone {rng([r['x_vs_ref'] for r in fwd], 1)}x faster",
            f"{rng([r['x_vs_sdpa'] for r in fwd_bwd], 1)}x of dense causal SDPA fwd+bwd"]


def _zero3(precision: str) -> Callable[[dict], list[str]]:
    return lambda d: [f"{d['summary']['zero3_vs_zero0_state']:.2f}x ({precision})"]


def _actckpt(precision: str) -> Callable[[dict], list[str]]:
    return lambda d: [f"{d['summary']['actckpt_tokens_per_cpu_s_ratio']:.2f}x"
                      + (" tokens per CPU-second" if precision == "fp32" else "") + f" ({precision})"]


def _resblock(d: dict) -> list[str]:
    r = d["results"]
    return [f"{r['fp16_per_resblock']['tokens_per_s'] / r['fp16']['tokens_per_s']:.2f}x tokens/s"]


def _powersgd(d: dict) -> list[str]:
    run = next(r for r in d["runs"] if r["rank_per_shard"] == 15)  # the default split at tiny, 2 per machine
    return [f"{(1 - run['rate_matrices_measured']) * 100:.1f}% of uncompressed",
            f"{(1 - run['rate_all_measured']) * 100:.0f}% of all inter-machine bytes",
            f"loss +{run['final_loss_gap'] * 100:.1f}% after {run['steps']} steps"]


def _paper_scheme(d: dict) -> list[str]:
    r = d["runs"]
    psgd, b16, plain = r["paper_psgd"], r["paper_psgd16"], r["zero3"]
    return [f"{100 * psgd['inter_matrix_bytes'] / psgd['inter_matrix_bytes_uncompressed']:.1f}% of uncompressed",
            f"loss {100 * (psgd['final_loss'] / plain['final_loss'] - 1):+.1f}% vs plain ZeRO-3",
            f"16-bit state {100 * (b16['final_loss'] / psgd['final_loss'] - 1):+.2f}%",
            f"{sum(b16['state_bytes'].values()) / sum(psgd['state_bytes'].values()):.2f}x the per-rank state"]


def _dvae(d: dict) -> list[str]:
    return [f"{d['tiny']['seconds_per_step']:.3f} s / {d['full']['seconds_per_step']:.2f} s"]


def _dvae_recipes(d: dict) -> list[str]:
    r = d["results"]
    assert d["steps"] == 1000
    return [f"paper {r['paper']['final']['facts_agree']:.0%}",
            f"`tiny` (48 px, 12x12) {r['tiny']['final']['facts_agree']:.0%}",
            f"64 px / 8x8 {r['tiny_64px_8x8']['final']['facts_agree']:.0%}"]


def _threads(d: dict) -> list[str]:
    t = d["tokens_per_s"]
    return [f"{d['ratio_to_first']['2']:.2f}x tokens/s ({t['2'] / 1e3:.1f}k vs {t['1'] / 1e3:.1f}k)"]


def _data(d: dict) -> list[str]:
    return [f"{d['render_64px_img_per_s']:,.0f} img/s / {d['loader_img_per_s']['64px_none']['workers_0']:,.0f} img/s"]


def _bpe(d: dict) -> list[str]:
    drop, plain = d["bpe_dropout_encode_captions_per_s"], d["bpe_encode_captions_per_s"]
    return [f"{drop / plain:.2f}x captions/s ({drop / 1e3:.0f}k vs {plain / 1e3:.0f}k)"]


# "what" cell prefix -> [(JSON file, the strings the figure cell must contain)]
CHECKS: dict[str, list[tuple[str, Callable[[dict], list[str]]]]] = {
    "KV-cached vs uncached generation": [("sampling.json", _kv)],
    "attention per mask": [("attention.json", _attention)],
    "block-sparse C++ op vs its reference": [("blocksparse_fp32.json", _blocksparse)],
    "ZeRO-3 vs ZeRO-0": [("train_fp32.json", _zero3("fp32")), ("train_bf16.json", _zero3("bf16"))],
    "activation checkpointing on vs off": [("train_fp32.json", _actckpt("fp32")),
                                           ("train_bf16.json", _actckpt("bf16"))],
    "per-resblock fp16 scaling vs plain fp16": [("resblock_scaling.json", _resblock)],
    "PowerSGD inter-machine bytes": [("compression.json", _powersgd)],
    "paper scheme, PowerSGD on ZeRO-3 partitions": [("compression_paper.json", _paper_scheme)],
    "dVAE training step": [("dvae.json", _dvae)],
    "dVAE recipes": [("dvae_recipes.json", _dvae_recipes)],
    "tiny transformer, 2 torch threads vs 1": [("threads.json", _threads)],
    "data: shapes rendering / loader": [("data_pipeline.json", _data)],
    "caption BPE with our seeded dropout": [("data_pipeline.json", _bpe)],
}
# Rows that are not benchmarks: they must say so, and where the figure comes from.
NOT_BENCHMARKS = {"full demo": "demo-summary.json"}


def performance_rows() -> list[list[str]]:
    rows = table_after(section(readme(), "## Performance"), "what")
    assert rows, "no table in the Performance section"
    return rows


def _check_for(what: str) -> str:
    keys = [k for k in [*CHECKS, *NOT_BENCHMARKS] if what.startswith(k)]
    assert len(keys) == 1, f"Performance row {what!r} has no entry in CHECKS (add one: JSON file, fields, rounding)"
    return keys[0]


def test_every_performance_row_names_its_json_and_has_a_check():
    rows = performance_rows()
    seen = set()
    for row in rows:
        assert len(row) == 3, f"Performance rows have 3 cells (what | figure | script -> JSON): {row}"
        what, figure, source = row
        key = _check_for(what)
        seen.add(key)
        if key in NOT_BENCHMARKS:
            assert NOT_BENCHMARKS[key] in source and "no JSON" in source, (
                f"row {what!r} is not a benchmark: its source cell must say where the figure comes from")
            continue
        expected = sorted({name for name, _ in CHECKS[key]})
        assert sorted(set(named_json(source))) == expected, (
            f"row {what!r} must name {expected} in its script column, names {named_json(source)}")
    missing = set(CHECKS) - seen
    assert not missing, f"CHECKS has entries for rows the table no longer has: {sorted(missing)}"


@pytest.mark.parametrize("key", sorted(CHECKS))
def test_performance_figure_matches_its_json(key):
    row = next(r for r in performance_rows() if r[0].startswith(key))
    figure = row[1]
    for name, expected in CHECKS[key]:
        for text in expected(load(name)):
            assert quotes(figure, text), f"README row {key!r}: expected {text!r} (from {name}) in {figure!r}"


def test_kv_cache_figure_is_marked_as_an_estimate():
    d = load("sampling.json")
    estimated = set(d.get("estimated", []))
    assert {"speedup_wall", "speedup_cpu", "uncached.seconds", "uncached.cpu_seconds"} <= estimated
    assert d["uncached"]["method"].startswith("estimated")
    perf = flat(section(readme(), "## Performance"))
    row = next(r for r in performance_rows() if r[0].startswith("KV-cached"))
    assert "estimate" in row[1], f"the KV-cache row must say its figure is an estimate: {row[1]!r}"
    points = list(d["uncached"]["per_step_s"])
    positions = ", ".join(points[:-1]) + f" and {points[-1]} positions"
    check, cached, uncached = d["uncached"]["check"], d["cached"], d["uncached"]
    for text in (f"at {len(points)} stream lengths ({positions})", f"{d['image_tokens']} steps",
                 f"({cached['seconds']:.0f} s wall, {cached['cpu_seconds']:.0f} s CPU)",
                 f"({uncached['seconds']:.0f} s wall, {uncached['cpu_seconds']:.0f} s CPU)",
                 f"last {check['steps']} tokens", f"{check['measured_over_estimated_cpu']:.2f}x the CPU time",
                 f"{check['measured_over_estimated']:.2f}x the wall time", "`estimated`"):
        assert quotes(perf, text), f"the KV-cache note should say {text!r}"


def test_demo_row_agrees_with_the_demo_section():
    text = readme()
    row = next(r for r in performance_rows() if r[0].startswith("full demo"))
    wall, match = re.search(r"(\d+) s wall", row[1]), re.search(r"(\d+)% single-object match", row[1])
    assert wall and match, f"the demo row should give 'N s wall' and 'N% single-object match': {row[1]!r}"
    wall, match = wall.group(1), match.group(1)
    demo = section(text, "## The demo")
    assert f"the demo itself {wall} s" in demo, f"demo row says {wall} s; the demo section does not"
    assert f"single-object captions **{match}%**" in demo, f"demo row says {match}%; the demo section does not"


# --- the Stage-2 training tables and the sentences under them -------------------------------

def training_text() -> str:
    text = section(readme(), "## Stage 2 training on DeepSpeed (`megadalle train`)")
    return text[text.index("**Performance**"):]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_table_matches_its_json(precision):
    text = training_text()
    assert f"results/train_{precision}.json" in text
    d = load(f"train_{precision}.json")
    assert d["settings"]["precision"] == precision and d["settings"]["preset"] == "tiny"
    mib = 2**20
    rows = table_after(text, precision)
    names = {"ZeRO-0": "zero0", "ZeRO-1": "zero1", "ZeRO-2": "zero2", "ZeRO-3": "zero3"}
    assert [r[0] for r in rows] == list(names)
    for row in rows:
        r0 = d["results"][names[row[0]]][0]
        state = r0["params_bytes"] + r0["grads_bytes"] + r0["optimizer_bytes"]
        expected = [f"{r0['tokens_per_s']:.0f}", f"{r0['tokens_per_cpu_s']:.0f}",
                    f"{r0['peak_memory_bytes'] / mib:.0f}", f"{r0['params_bytes'] / mib:.2f}",
                    f"{r0['grads_bytes'] / mib:.2f}", f"{r0['optimizer_bytes'] / mib:.2f}", f"{state / mib:.2f}",
                    f"{d['summary'][names[row[0]] + '_vs_zero0_state']:.2f}"]
        got = [c.replace("*", "").split(" ")[0] for c in row[1:]]
        assert got == expected, f"{precision} {row[0]}: README {got}, train_{precision}.json {expected}"


def test_training_sentences_match_their_json():
    text = flat(training_text())
    for precision in ("fp32", "bf16"):
        d = load(f"train_{precision}.json")
        s, fp16 = d["summary"], d["fp16_per_resblock_vs_fp16"]
        for quoted in (f"{s['actckpt_tokens_per_cpu_s_ratio']:.2f}x tokens per CPU-second in {precision}",
                       f"wall clock {s['actckpt_tokens_per_s_ratio']:.2f}x",
                       f"{s['actckpt_peak_memory_ratio']:.2f}x peak memory",
                       f"{fp16['ratio']:.2f}x tokens/s in the {precision} run"):
            assert quotes(text, quoted), f"expected {quoted!r} (from train_{precision}.json) in the training text"
