"""`megadalle eval` on a random run folder (plumbing and report), and best-of-N judging on
hand-made samples."""

import json
import sys
from pathlib import Path

import pytest
import torch

from megadalle.cli import main
from megadalle.config import load_config
from megadalle.data import shapes as S
from megadalle.commands.eval import judge_results
from megadalle.eval.shapes_accuracy import eval_captions, heldout_of
from megadalle.eval.summary import summarise
from megadalle.generate.pipeline import CaptionResult

sys.path.insert(0, str(Path(__file__).parent))
from sample_run import build_random_run  # noqa: E402

torch.set_num_threads(1)


def _tensor(img):
    return torch.from_numpy(S.to_array(img)).permute(2, 0, 1).float()


def test_best_of_n_picks_the_ranked_first_image():
    cfg = load_config("tiny")
    heldout = heldout_of(cfg)
    results = []
    for text, facts in eval_captions(cfg, n_seen=3, n_heldout=2, n_pairs=1):
        right = _tensor(S.render(facts, 64))
        wrong = torch.ones_like(right)  # blank: nothing found
        # Ranked with the right image first, though it was generated second.
        results.append(CaptionResult(text, torch.stack([wrong, right]), torch.zeros(2, 64),
                                     torch.tensor([0.1, 0.9]), torch.tensor([1, 0])))
    best, every, skipped = judge_results(results, heldout)
    assert skipped == 0
    assert summarise(best)["all"]["accuracy"] == 1.0
    assert summarise(best)["single_object"]["heldout"]["n"] == 2
    assert summarise(every)["all"]["accuracy"] == 0.5
    assert results[0].meta["split"] == "seen"


def test_eval_command_writes_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    build_random_run(run)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle at the top\na photo of a dog\n")
    out = tmp_path / "ev"
    assert main(["eval", "--ckpt", str(run), "--prompt-file", str(prompts), "--n", "2", "--top", "1",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["n_captions"] == 2 and rep["captions_not_scored"] == 1
    assert rep["best_of_n"]["all"]["n"] == 1 and rep["single_sample"]["all"]["n"] == 2
    # CLIP score = 100 * mean(max(cos, 0)), recomputed from the reranker's scores in samples.json
    # (ranked best first): best-of-N takes each caption's first, single-sample every image.
    ranked = [[e["score"] for e in c["images"]] for c in json.loads((out / "samples.json").read_text())["captions"]]
    assert [len(r) for r in ranked] == [2, 2] and all(r == sorted(r, reverse=True) for r in ranked)
    assert rep["clip_score_best_of_n"] == pytest.approx(100 * sum(max(r[0], 0) for r in ranked) / 2, abs=1e-3)
    assert rep["clip_score_single_sample"] == pytest.approx(100 * sum(max(s, 0) for r in ranked for s in r) / 4,
                                                            abs=1e-3)
    assert rep["fid_is"].startswith("skipped")
    assert (out / "grid.png").is_file() and (out / "eval.txt").read_text().startswith("2 captions")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--seen", "1", "--heldout", "0", "--pairs", "0", "--n", "1",
                 "--out", str(out), "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    assert "Inception weights" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(run), "--seen", "0", "--heldout", "0", "--pairs", "0"]) == 2
