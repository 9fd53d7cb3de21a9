"""`megadalle export RUN --out DIR`: one self-describing folder with everything sampling needs.

    DIR/export.json                            what the folder holds (format, version, source, step)
    DIR/README.md                              a card: model, data geometry, training, eval scores
    DIR/transformer/transformer.safetensors + transformer.yaml   (the EMA export)
    DIR/dvae/dvae.safetensors + dvae.yaml
    DIR/tokenizer.json
    DIR/clip/clip.safetensors + clip.yaml      (when the run has a reranker)

The layout is a run folder's, so everything that reads a run reads an export too;
`megadalle.Pipeline.from_pretrained(DIR)` insists on export.json. The parts are checked to fit
together before anything is written (the same check sampling makes), and the folder is written
under a temporary name and renamed, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from megadalle.errors import CommandError
from megadalle.generate.load import check_compatible, load_run_config, load_tokenizer, resolve_paths
from megadalle.run_layout import RunLayout

MANIFEST = "export.json"
FORMAT = "megadalle-export"
VERSION = 1


def export_run(run: str | Path, out: str | Path, *, dvae: str | None = None, tokenizer: str | None = None,
               clip: str | None = None, force: bool = False) -> dict[str, Any]:
    """Copy a run's models into `out` (see the module docstring); returns the manifest."""
    from megadalle.dvae.io import load_dvae_config

    paths = resolve_paths(run, dvae, tokenizer, clip)
    cfg = load_run_config(paths.transformer)
    tok = load_tokenizer(cfg, paths.tokenizer)
    check_compatible(cfg, load_dvae_config(paths.dvae), tok, paths)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise CommandError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    layout = RunLayout(out.with_name(out.name + ".tmp-export"))
    shutil.rmtree(layout.root, ignore_errors=True)
    try:
        for stage, src in (("transformer", paths.transformer), ("dvae", paths.dvae), ("clip", paths.clip)):
            if src is None:
                continue
            layout.stage(stage).mkdir(parents=True)
            for f in RunLayout(src.parent).export(stage):
                shutil.copy2(Path(src) / f.name, layout.stage(stage) / f.name)
        shutil.copy2(paths.tokenizer, layout.tokenizer)
        manifest = {"format": FORMAT, "version": VERSION, "source": str(Path(run).resolve()),
                    "parts": ["transformer", "dvae", "tokenizer"] + (["clip"] if paths.clip else []),
                    "step": _step(paths.transformer)}
        (layout.root / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (layout.root / "README.md").write_text(model_card(cfg, manifest, RunLayout(paths.run_dir)))
        if out.exists():
            shutil.rmtree(out)
        os.replace(layout.root, out)
    except OSError as e:
        shutil.rmtree(layout.root, ignore_errors=True)
        raise CommandError(f"cannot write the export to {out}: {e}") from None
    return manifest


def check_export(folder: str | Path) -> dict[str, Any]:
    """The manifest of an exported folder; a message when `folder` is not one."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CommandError(f"{folder} is not an exported model folder (no readable {MANIFEST}); make one with "
                           f"`megadalle export RUN --out DIR`, or load a run folder with Pipeline.from_run") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CommandError(f"{path} is not a {FORMAT} version {VERSION} manifest")
    return manifest


def _step(tdir: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(Path(tdir) / "transformer.safetensors"), "pt") as f:
            return int((f.metadata() or {}).get("step", ""))
    except (OSError, ValueError):
        return None


def model_card(cfg: Any, manifest: dict[str, Any], run: RunLayout) -> str:
    t, d, tr = cfg.transformer, cfg.dvae, cfg.train
    lines = [
        "# megadalle model", "",
        f"Exported from `{manifest['source']}` (transformer step {manifest['step']}). Load it with:", "",
        "```python", "from megadalle import Pipeline", "pipe = Pipeline.from_pretrained(\"THIS_FOLDER\")",
        "images = pipe([\"a caption\"], n=16, top=4)", "```", "",
        "| part | settings |", "|---|---|",
        f"| transformer | d {t.dim}, depth {t.depth}, {t.heads} heads of {t.head_dim}, attention `{t.attention_schedule}` |",
        f"| text | {t.text_len} tokens, vocabulary {t.text_vocab_size} |",
        f"| image | {d.image_size} px -> {t.image_grid}x{t.image_grid} tokens, {t.image_vocab_size} codes |",
        f"| training | {tr.steps} steps, micro batch {tr.micro_batch_size}, lr {tr.optimizer.lr}, "
        f"schedule {tr.schedule.kind}, precision {cfg.precision_for('train').mode}, EMA {tr.ema_decay} |",
        f"| reranker | {'included' if 'clip' in manifest['parts'] else 'none'} |",
    ]
    scores = run.eval / "eval.json"
    if scores.is_file():
        try:
            report = json.loads(scores.read_text())
            flat = {k: v for k, v in report.items() if isinstance(v, (int, float))}
            lines += ["", "Eval scores (`eval/eval.json` of the run):", ""]
            lines += [f"- {k}: {v:.4g}" for k, v in sorted(flat.items())]
        except ValueError:
            pass
    return "\n".join(lines) + "\n"
