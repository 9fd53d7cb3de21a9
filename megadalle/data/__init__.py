"""Data: shards, image folders, the built-in shapes set, the streaming loader, the BPE tokenizer.

    shapes.py          facts, rendering, captions, analyser (image -> facts), held-out split
    shapes_shards.py   the shapes set as shards; `ensure_shapes_shards(cfg, run_dir)`
    shards.py          tar shard reader/writer (img2dataset layout), token shards, image folders
    decode.py          raw bytes -> checked RGB image / caption / codes, with named bad-input reasons
    augment.py         the paper's stage-1 and stage-2 augmentations, and "none"
    loader.py          per-rank/per-worker streaming loader with a shuffle buffer and exact resume
"""
